"""Latency of ``POST /predict`` while the service trains: a bounded open-loop load on loopback.

Starts ``stream-trainer run --serve-predictions`` as a child process on a generated CSV (batch
sizes ``--batch-sizes``, default 1:64; local checkpoints at the default interval), waits until it
has a model, measures its training rate for ``--seconds`` without requests, then sends
``--rate`` one-record requests per second for ``--seconds`` from ``--clients`` keep-alive
connections and measures again. The load is open-loop: request *i* is due at ``start + i / rate``
and its latency runs from that time to the end of its answer, so a server that falls behind is
charged for the queue it causes (no coordinated omission). The service must still be training at
the end of the load (the CSV is long enough), else the run fails.

    python bench/bench_predict.py            # writes bench/results/predict.md
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import RESULTS, md_table, write_script_result  # noqa: E402

TARGET_P99_MS = 20.0
FEATURES = 8


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` records of ``FEATURES`` numbers and a colour; the label a noisy linear rule."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, FEATURES))
    colour = rng.integers(0, 3, size=rows)
    weights = rng.normal(size=FEATURES)
    label = (x @ weights + 0.5 * colour + rng.normal(scale=0.5, size=rows) > 0).astype(int)
    names = ["red", "green", "blue"]
    with path.open("w") as out:
        out.write(",".join([*(f"x{j}" for j in range(FEATURES)), "colour", "label"]) + "\n")
        for i in range(rows):
            values = ",".join(f"{v:.5f}" for v in x[i])
            out.write(f"{values},{names[colour[i]]},{label[i]}\n")


def query(i: int) -> bytes:
    value = {f"x{j}": math.sin(i + j) for j in range(FEATURES)}
    value["colour"] = ("red", "green", "blue")[i % 3]
    return json.dumps(value).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Client:
    """One keep-alive connection to the service."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            return 0, b""


def samples_seen(client: Client) -> int:
    status, body = client.call("GET", "/model")
    if status != 200:
        status, body = client.call("GET", "/model")  # once more on a fresh connection
    if status != 200:
        raise RuntimeError(f"GET /model answered {status}: {body[:200]!r}")
    return int(json.loads(body)["model"]["samples_seen"])


def wait_for_model(client: Client, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Until ``/model`` reports samples seen: a request that times out while the first steps run
    (they may compile the engine's kernels, holding the model) is asked again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with status {process.returncode}")
        status, body = client.call("GET", "/model")
        if status == 200 and json.loads(body)["model"]["samples_seen"] > 0:
            return
        time.sleep(0.2)
    raise RuntimeError("the service had no model in time")


def training_rate(client: Client, seconds: float) -> float:
    before, t0 = samples_seen(client), time.perf_counter()
    time.sleep(seconds)
    after, t1 = samples_seen(client), time.perf_counter()
    return (after - before) / (t1 - t0)


def load(port: int, rate: float, seconds: float, clients: int) -> dict[str, Any]:
    """Open-loop load (module docstring): latencies in seconds and status counts."""
    total = int(rate * seconds)
    due: queue.Queue[tuple[int, float] | None] = queue.Queue()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def worker() -> None:
        client = Client(port)
        while (item := due.get()) is not None:
            i, at = item
            status, _ = client.call("POST", "/predict", query(i))
            done = time.perf_counter()
            with lock:
                latencies.append(done - at)
                statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    for i in range(total):
        at = start + i / rate
        pause = at - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        due.put((i, at))
    for _ in threads:
        due.put(None)
    for t in threads:
        t.join(timeout=30)
    elapsed = time.perf_counter() - start
    return {"latencies": latencies, "statuses": statuses, "elapsed": elapsed, "sent": total}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--clients", type=int, default=4, help="keep-alive connections")
    parser.add_argument("--batch-sizes", default="1:64")
    parser.add_argument(
        "--records",
        type=int,
        default=4_000_000,
        help="rows of the CSV: enough that the service is still training when the load ends",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "predict.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        work = Path(tmp)
        data = work / "data.csv"
        write_csv(data, args.records)
        port = free_port()
        command = [
            sys.executable, "-m", "stream_trainer", "run",
            "--source", str(data), "--target", "label", "--task", "classification",
            "--batch-sizes", args.batch_sizes,
            "--checkpoint", f"file://{work / 'checkpoints'}",
            "--dead-letter", str(work / "dead-letters.jsonl"),
            "--metrics-address", f"127.0.0.1:{port}",
            "--serve-predictions", "--no-progress", "--log-level", "WARNING",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen(command, cwd=work, env=env)
        try:
            client = Client(port)
            deadline = time.monotonic() + 60
            while client.call("GET", "/healthz")[0] != 200:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the service did not start")
                time.sleep(0.2)
            wait_for_model(client, process, timeout=180)
            idle_rate = training_rate(client, args.seconds)
            before, t0 = samples_seen(client), time.perf_counter()
            result = load(port, args.rate, args.seconds, args.clients)
            after, t1 = samples_seen(client), time.perf_counter()
            if process.poll() is not None:
                raise RuntimeError("the service stopped training before the load ended")
        finally:
            process.terminate()
            process.wait(timeout=60)
    latencies = result["latencies"]
    ok = result["statuses"].get(200, 0)
    ms = [1000 * v for v in latencies]
    p50, p90, p99 = (percentile(ms, q) for q in (0.5, 0.9, 0.99))
    loaded_rate = (after - before) / (t1 - t0)
    row = [
        f"{args.rate:g}",
        f"{result['sent']:,}",
        f"{ok:,}",
        f"{ok / result['elapsed']:.1f}",
        f"{p50:.2f}",
        f"{p90:.2f}",
        f"{p99:.2f}",
        f"{max(ms):.2f}",
        f"{idle_rate:,.0f}",
        f"{loaded_rate:,.0f}",
    ]
    verdict = "under" if p99 < TARGET_P99_MS else "**over**"
    write_script_result(
        "bench/bench_predict.py",
        argv,
        args.out,
        "POST /predict latency while training",
        [
            f"- service: `stream-trainer run --serve-predictions` in its own process on a "
            f"{args.records:,}-row CSV ({FEATURES} numbers and a colour), batch sizes "
            f"{args.batch_sizes}, local checkpoints every 1,000 records, one torch thread",
            f"- load: {args.rate:g} one-record requests/s for {args.seconds:g} s, open loop "
            f"(latency from each request's due time), {args.clients} keep-alive connections on "
            "loopback from this process; training rate from `GET /model` over the same length "
            "without requests, then during them",
            f"- target: p99 under {TARGET_P99_MS:g} ms; this run is {verdict} it; statuses "
            f"{dict(sorted(result['statuses'].items()))}",
            "",
            md_table(
                [
                    "req/s asked",
                    "sent",
                    "answered 200",
                    "req/s answered",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "max ms",
                    "train samples/s idle",
                    "train samples/s under load",
                ],
                [row],
            ),
        ],
    )
    print(f"median latency {statistics.median(ms):.2f} ms", file=sys.stderr)
    return 0 if ok == result["sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
