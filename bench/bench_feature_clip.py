"""What clipping the feature statistics costs a step at batch size 1 (no broker needed).

The trainer steps one record at a time over a seeded stream (3 numeric features, 1 category), with
the running statistics clipping new values (``WARMUP`` = 16, the default) and without (``WARMUP``
set past the stream's length); the two alternate, and each figure is the median of ``--rounds``
rounds, in microseconds of CPU per record after a warm-up of 200 records. BLAS, OpenMP and torch
run one thread each.

    python bench/bench_feature_clip.py
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import stream_trainer.features.standardizer as standardizer  # noqa: E402
from stream_trainer.records import Record  # noqa: E402
from stream_trainer.threads import pin_threads  # noqa: E402
from stream_trainer.training import IncrementalTrainer, TrainerConfig  # noqa: E402

WARM_UP = 200


def _records(n: int, seed: int = 5) -> list[Record]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x1, x2, x3 = rng.random(), rng.random(), rng.gauss(0.0, 1.0)
        color = rng.choice(("red", "green", "blue"))
        label = int(x1 + x2 + (0.5 if color == "red" else 0.0) > 1.2)
        out.append(Record({"x1": x1, "x2": x2, "x3": x3, "color": color, "label": label}))
    return out


def _per_record_us(records: list[Record], warmup: int) -> float:
    standardizer.WARMUP = warmup
    trainer = IncrementalTrainer(TrainerConfig(target="label", task="classification", seed=3))
    for record in records[:WARM_UP]:
        trainer.step([record])
    start = time.process_time()
    for record in records[WARM_UP:]:
        trainer.step([record])
    return (time.process_time() - start) / (len(records) - WARM_UP) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    pin_threads(1)
    records = _records(args.records)
    default = standardizer.WARMUP
    times: dict[str, list[float]] = {"clipping": [], "no clipping": []}
    for _ in range(args.rounds):
        times["clipping"].append(_per_record_us(records, default))
        times["no clipping"].append(_per_record_us(records, len(records) + 1))
    standardizer.WARMUP = default
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, value in medians.items():
        print(f"{name:12s} {value:7.1f} us/record (median of {args.rounds} interleaved rounds)")
    print(f"ratio        {medians['clipping'] / medians['no clipping']:7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
