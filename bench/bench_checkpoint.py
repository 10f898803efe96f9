"""Checkpoint save/load time against a raw Redis SET/GET of the same bytes, in the same run.

Usage: ``.venv/bin/python bench/bench_checkpoint.py [--repeats N] [--out FILE.md]``

Starts a private redis-server (``$REDIS_SERVER`` or ``redis-server`` on PATH) with persistence
off. For each model size the checkpoint holds the parameters plus an Adam-like state of twice
that (``exp_avg`` and ``exp_avg_sq``), all float32. Reported: medians over the repeats.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
import torch

from stream_trainer.checkpoints import (
    Checkpoint,
    CheckpointCodec,
    LocalDirCheckpointStore,
    RedisCheckpointStore,
)

SIZES = (1_000_000, 10_000_000)


def _median_s(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _checkpoint(parameters: int) -> Checkpoint:
    gen = torch.Generator().manual_seed(0)
    return Checkpoint(
        tensors={
            "model.weight": torch.randn(parameters, generator=gen),
            "optim.exp_avg": torch.randn(parameters, generator=gen),
            "optim.exp_avg_sq": torch.rand(parameters, generator=gen),
        },
        state={"labels": ["a", "b"], "scaler": {"mean": [0.0] * 16}},
        offsets={f"events:{p}": 1_000_000 + p for p in range(12)},
        samples=10**9,
        step=10**6,
        config_fingerprint="bench",
        writer_id="bench",
        epoch=0,
    )


def _start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = (
        os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.01)
    client.close()
    return process, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/checkpoint.md"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    process, port = _start_redis(work)
    url = f"redis://127.0.0.1:{port}/0"
    rows = []
    try:
        raw = redis.Redis(port=port)
        for parameters in SIZES:
            checkpoint = _checkpoint(parameters)
            codec = CheckpointCodec()  # default 64 MiB parts, no HMAC
            payload = codec.encode(checkpoint).manifest.size_bytes
            blob = os.urandom(1024) * (payload // 1024 + 1)
            blob = blob[:payload]
            repeats = args.repeats if parameters < 5_000_000 else max(3, args.repeats - 2)
            raw_set = _median_s(lambda: raw.set("bench:raw", blob), repeats)  # noqa: B023
            raw_get = _median_s(lambda: raw.get("bench:raw"), repeats)
            raw.delete("bench:raw")
            with RedisCheckpointStore.from_url(url, codec=codec, keep=2) as store:
                redis_save = _median_s(lambda: store.save(checkpoint), repeats)  # noqa: B023
                redis_load = _median_s(store.load_latest, repeats)
            with LocalDirCheckpointStore(
                work / f"local-{parameters}", codec=codec, keep=2
            ) as local:
                local_save = _median_s(lambda: local.save(checkpoint), repeats)  # noqa: B023
                local_load = _median_s(local.load_latest, repeats)
            encode = _median_s(lambda: codec.encode(checkpoint), repeats)  # noqa: B023
            rows.append(
                (
                    parameters,
                    payload,
                    repeats,
                    raw_set,
                    raw_get,
                    redis_save,
                    redis_load,
                    local_save,
                    local_load,
                    encode,
                )
            )
            print(rows[-1], flush=True)
        raw.close()
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(work, ignore_errors=True)
    _write(args.out, rows, " ".join([Path(sys.executable).name, *sys.argv]))
    return 0


def _write(out: Path, rows: list[tuple], command: str) -> None:
    uname = " ".join(platform.uname())
    lines = [
        "# Checkpoint save/load benchmark",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- machine: `{uname}`, nproc {os.cpu_count()}",
        f"- torch {torch.__version__}, redis-py {redis.__version__}, local Redis over TCP loopback",
        "- checkpoint = parameters + Adam-like state of 2x (exp_avg, exp_avg_sq), float32;"
        " default 64 MiB parts; no HMAC; medians of the repeats",
        "- raw = one `SET`/`GET` of a bytes value of the same payload size;"
        " ratio = store time / raw time (target <= 1.5)",
        "- local dir = `LocalDirCheckpointStore` with fsync on",
        "",
        "| params | payload MiB | repeats | raw SET s | Redis save s | save ratio | raw GET s"
        " | Redis load s | load ratio | local save s | local load s | encode only s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, size, n, rset, rget, rsave, rload, lsave, lload, enc in rows:
        lines.append(
            f"| {p / 1e6:.0f}M | {size / 2**20:.1f} | {n} | {rset:.3f} | {rsave:.3f} |"
            f" {rsave / rset:.2f} | {rget:.3f} | {rload:.3f} | {rload / rget:.2f} |"
            f" {lsave:.3f} | {lload:.3f} | {enc:.3f} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
