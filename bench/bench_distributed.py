"""Data-parallel throughput: samples/s for 1, 2 and 3 gloo processes on this machine, and the cost
of the collectives per step; writes ``bench/results/distributed.md``.

``python -m bench.bench_distributed [--steps 300] [--batch 32]``. Each process trains
``DistributedTrainer`` (norm ``ema_batch``, hidden 64x64) on its own ``--batch`` synthetic records
per step (no Kafka: the broker's cost is in ``bench/results/kafka.md``), one torch thread each.
Measured per step on rank 0: the whole step, the gradient all-reduce, the JSON exchange; the rest
of the collectives (synchronized moments, standardizer, metric rows) are inside "step - compute".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stream_trainer.distributed import DistributedTrainer, init_process_group, world_from_env
from stream_trainer.records import Record
from stream_trainer.threads import pin_threads
from stream_trainer.training import IncrementalTrainer, TrainerConfig

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.md"


def _records(rank: int, step: int, batch: int) -> list[Record]:
    out = []
    for k in range(batch):
        i = (step * 1000 + rank * batch + k) * 7919
        x = [math.sin(i * 0.001 * (j + 1)) for j in range(16)]
        out.append(Record({**{f"x{j}": v for j, v in enumerate(x)}, "y": int(sum(x) > 0)}))
    return out


def _worker(rank: int, world: int, port: int, steps: int, batch: int, out: str) -> None:
    pin_threads(1)
    env = {"WORLD_SIZE": str(world), "RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    comm = init_process_group(world_from_env(env), timeout_seconds=120)
    config = TrainerConfig(target="y", hidden=(64, 64), norm="ema_batch", seed=1)
    trainer = DistributedTrainer(IncrementalTrainer(config), comm)
    data = [_records(rank, s, batch) for s in range(steps + 20)]
    for s in range(20):  # warm-up
        trainer.step(data[s])
    trainer.gradient_sync.seconds, trainer.exchange_seconds = 0.0, 0.0
    comm.all_reduce_(torch.zeros(1))
    t0 = time.perf_counter()
    learn = 0.0
    for s in range(20, steps + 20):
        report = trainer.step(data[s])
        learn += report.learn_seconds + report.predict_seconds
    elapsed = time.perf_counter() - t0
    if rank == 0:
        Path(out).write_text(json.dumps({
            "world": world, "steps": steps, "batch": batch, "elapsed": elapsed,
            "samples_per_s": world * batch * steps / elapsed,
            "step_ms": 1000 * elapsed / steps,
            "allreduce_ms": 1000 * trainer.gradient_sync.seconds / steps,
            "exchange_ms": 1000 * trainer.exchange_seconds / steps,
            "predict_learn_ms": 1000 * learn / steps,
        }))  # fmt: skip
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(world: int, steps: int, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        mp.start_processes(_worker, args=(world, _free_port(), steps, batch, out), nprocs=world,
                           start_method="spawn", join=True)  # fmt: skip
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    rows = [measure(w, args.steps, args.batch) for w in (1, 2, 3)]
    lines = [
        "# Data-parallel training (gloo, localhost)",
        "",
        f"`python -m bench.bench_distributed --steps {args.steps} --batch {args.batch}` on "
        f"{os.cpu_count()} cores: each process trains on its own {args.batch} records per step "
        "(hidden 64x64, `ema_batch`, one torch thread), no Kafka.",
        "",
        "| processes | samples/s | ms/step | predict+learn ms | grad all-reduce ms | exchange ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world']} | {r['samples_per_s']:.0f} | {r['step_ms']:.2f} | "
            f"{r['predict_learn_ms']:.2f} | {r['allreduce_ms']:.3f} | {r['exchange_ms']:.3f} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
