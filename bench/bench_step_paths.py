"""The trainer's numpy step against its PyTorch step, and what decides GELU's kernel.

1. *Trainer alone*: ``IncrementalTrainer(TrainerConfig()).step`` over batches of ``weather.csv``
   held in memory (checks, encoding, serving, metrics, learning), once with the numpy step
   (:mod:`stream_trainer.model.numpy_step`, the default) and once with ``numpy_step = False`` (the
   hand-differentiated PyTorch step), samples/s, median of ``--repeats`` runs interleaved.
2. *GELU*: microseconds per call of scipy's ``erf`` (the core of the numpy GELU) and of
   PyTorch's ``F.gelu`` on a zero-copy view, on ``(rows, 64)`` float32 arrays: why the numpy step
   hands activations from 4,096 elements on to PyTorch's kernel.

    python bench/bench_step_paths.py            # writes bench/results/step_paths.md
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    RESULTS,
    md_table,
    set_single_thread,
    write_script_result,
)

SOURCE = ("/work/shared/data/weather.csv", "target")


def _records(n: int) -> list[Any]:
    from stream_trainer.records import Record
    from stream_trainer.sources import open_source

    source = open_source(SOURCE[0], target=SOURCE[1])
    return [r for r in itertools.islice(source, n) if isinstance(r, Record)]


def trainer_rate(records: list[Any], size: int, numpy_step: bool) -> float:
    """Samples/s of the default trainer stepping through ``records`` in batches of ``size`` (the
    first batch, which builds the model, is not timed)."""
    from stream_trainer.training import IncrementalTrainer, TrainerConfig

    trainer = IncrementalTrainer(TrainerConfig(target=SOURCE[1], seed=0))
    trainer.numpy_step = numpy_step
    trainer.step(records[:size])
    batches = [records[i : i + size] for i in range(size, len(records) - size + 1, size)]
    start = time.perf_counter()
    for batch in batches:
        trainer.step(batch)
    return sum(map(len, batches)) / (time.perf_counter() - start)


def gelu_costs(rows: int, repeats: int) -> dict[str, float]:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from scipy.special import erf

    z = np.random.default_rng(0).normal(size=(rows, 64)).astype(np.float32)
    loops = max(20, 20_000 // rows)

    def per_call(action: Any) -> float:
        return statistics.median(timeit.repeat(action, number=loops, repeat=repeats)) / loops * 1e6

    return {
        "scipy erf (numpy GELU's core)": per_call(lambda: erf(z * 0.7071067811865476)),
        "PyTorch F.gelu on a view": per_call(lambda: F.gelu(torch.from_numpy(z)).numpy()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=6000)
    parser.add_argument("--sizes", default="1,16,64,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "step_paths.md")
    args = parser.parse_args(argv)
    set_single_thread()
    sizes = [int(s) for s in args.sizes.split(",")]
    records = _records(args.records)
    trainer_rate(records[:200], 2, True)  # imports and first-use costs outside the timings
    rows = []
    for size in sizes:
        # batch size 1 steps through fewer records: the same order of wall time per cell
        subset = records[: 1500 if size == 1 else len(records)]
        rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for numpy_step in (True, False):
                rates[numpy_step].append(trainer_rate(subset, size, numpy_step))
            print(f"size {size}: {rates}", file=sys.stderr)
        fast, slow = statistics.median(rates[True]), statistics.median(rates[False])
        rows.append([str(size), f"{fast:,.0f}", f"{slow:,.0f}", f"{fast / slow:.2f}"])
    gelu = {r: gelu_costs(r, 7) for r in (1, 64, 512)}
    names = list(gelu[1])
    write_script_result(
        "bench/bench_step_paths.py",
        argv,
        args.out,
        "The numpy step against the PyTorch step",
        [
            f"- trainer alone: `TrainerConfig()` defaults on {SOURCE[0]} (first {args.records} "
            f"records, 1,500 at batch size 1), median of {args.repeats} interleaved runs; "
            "one torch thread",
            "",
            md_table(
                ["batch", "numpy step samples/s", "PyTorch step samples/s", "numpy ÷ PyTorch"],
                rows,
            ),
            "",
            "GELU kernels, µs per call on `(rows, 64)` float32 (median of 7 timings):",
            "",
            md_table(
                ["kernel", *(f"{r} x 64" for r in gelu)],
                [[n, *(f"{gelu[r][n]:.1f}" for r in gelu)] for n in names],
            ),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
