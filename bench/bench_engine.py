"""The compiled step engine against the autograd step, its stacked members, and its compile cache.

1. *Trainer alone*: ``IncrementalTrainer(TrainerConfig()).step`` over batches of ``weather.csv``
   held in memory (checks, encoding, serving, metrics, learning), with ``engine="auto"`` (the
   compiled engine, :mod:`stream_trainer.engine`) and ``engine="torch"`` (autograd), samples/s,
   median of ``--repeats`` runs interleaved.
2. *Stacked members*: one serve + learn call of the engine alone on the default architecture
   (8 inputs, 2 classes, 2x64, ``ema_batch``, GELU, skip), µs per step for ``K = 1`` and
   ``K = 4`` members, interleaved, medians; the ratio is what a mixture of four time scales costs.
3. *Members in the trainer*: the default trainer (``member_momenta`` members) against the same
   trainer with one member (the first momentum), samples/s at batch sizes 1 and 64, interleaved,
   medians; the ratio is what the default's self-tuning costs per step.
4. *Compile cache*: wall time of a fresh process that builds the engine and takes one step, with
   an empty numba cache directory and then with the one the first run filled.

BLAS and torch run one thread each.

    python bench/bench_engine.py            # writes bench/results/engine.md
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    RESULTS,
    SHARED_DATA,
    md_table,
    set_single_thread,
    write_script_result,
)

SOURCE = (str(SHARED_DATA / "weather.csv"), "target")
_FIRST_STEP = """
import time
t0 = time.perf_counter()
import numpy as np, torch
from stream_trainer.engine.compiled import CompiledEngine
from stream_trainer.model import StreamMLP
model = StreamMLP(8, 2, hidden=(64, 64), norm="ema_batch", activation="gelu", skip=True)
engine = CompiledEngine.build([model], [torch.optim.Adam(model.parameters())])
x = np.zeros((1, 8), np.float32)
engine.serve(x); engine.learn(x, np.zeros(1, np.int64), regression=False, max_norm=5.0)
print(time.perf_counter() - t0)
"""


def _records(n: int) -> list[Any]:
    from stream_trainer.records import Record
    from stream_trainer.sources import open_source

    source = open_source(SOURCE[0], target=SOURCE[1])
    return [r for r in itertools.islice(source, n) if isinstance(r, Record)]


def trainer_rate(
    records: list[Any], size: int, engine: str, momenta: tuple[float, ...] | None = None
) -> float:
    """Samples/s of the default trainer (with ``momenta`` as its members, ``None``: the default
    ones) stepping through ``records`` in batches of ``size`` (the first batch, which builds the
    model, is not timed)."""
    from stream_trainer.training import IncrementalTrainer, TrainerConfig

    config = TrainerConfig(target=SOURCE[1], seed=0, engine=engine)
    if momenta is not None:
        config = dataclasses.replace(config, member_momenta=momenta)
    trainer = IncrementalTrainer(config)
    trainer.step(records[:size])
    batches = [records[i : i + size] for i in range(size, len(records) - size + 1, size)]
    start = time.perf_counter()
    for batch in batches:
        trainer.step(batch)
    return sum(map(len, batches)) / (time.perf_counter() - start)


def member_cost(members: int, rows: int, steps: int) -> float:
    """µs per serve + learn call of ``members`` stacked default MLPs on ``rows`` rows."""
    import numpy as np
    import torch

    from stream_trainer.engine.compiled import CompiledEngine
    from stream_trainer.model import StreamMLP

    models = [
        StreamMLP(8, 2, hidden=(64, 64), norm="ema_batch", activation="gelu", skip=True)
        for _ in range(members)
    ]
    optimizers = [torch.optim.Adam(m.parameters(), lr=3e-3) for m in models]
    engine = CompiledEngine.build(models, optimizers)
    assert engine is not None
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 8)).astype(np.float32)
    y = rng.integers(0, 2, size=rows)
    for _ in range(10):
        engine.serve(x)
        engine.learn(x, y, regression=False, max_norm=5.0)
    start = time.perf_counter()
    for _ in range(steps):
        engine.serve(x)
        engine.learn(x, y, regression=False, max_norm=5.0)
    return (time.perf_counter() - start) / steps * 1e6


def first_step_seconds(cache: Path) -> float:
    """Wall time of a fresh process's imports, engine build and first step."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_STEP], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=6000)
    parser.add_argument("--sizes", default="1,16,64,512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--member-steps", type=int, default=2000, help="at batch 1 (64: / 6)")
    parser.add_argument("--cache-runs", type=int, default=3, help="0: skip the cache timing")
    parser.add_argument("--out", type=Path, default=RESULTS / "engine.md")
    args = parser.parse_args(argv)
    set_single_thread()
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    records = _records(args.records)
    trainer_rate(records[:200], 2, "auto")  # imports and compilation outside the timings
    rows = []
    for size in sizes:
        # batch size 1 steps through fewer records: the same order of wall time per cell
        subset = records[: 1500 if size == 1 else len(records)]
        rates: dict[str, list[float]] = {"auto": [], "torch": []}
        for _ in range(args.repeats):
            for engine in rates:
                rates[engine].append(trainer_rate(subset, size, engine))
        fast, slow = statistics.median(rates["auto"]), statistics.median(rates["torch"])
        print(f"batch {size}: engine {fast:,.0f}, autograd {slow:,.0f} samples/s", file=sys.stderr)
        rows.append([str(size), f"{fast:,.0f}", f"{slow:,.0f}", f"{fast / slow:.2f}"])
    member_rows = []
    for batch in (1, 64):
        costs: dict[int, list[float]] = {1: [], 4: []}
        for _ in range(args.repeats):
            for k in costs:
                steps = args.member_steps if batch == 1 else max(1, args.member_steps // 6)
                costs[k].append(member_cost(k, batch, steps))
        one, four = statistics.median(costs[1]), statistics.median(costs[4])
        member_rows.append([str(batch), f"{one:.1f}", f"{four:.1f}", f"{four / one:.2f}"])
    from stream_trainer.training import TrainerConfig

    default = TrainerConfig().member_momenta
    trainer_member_rows = []
    for batch in (1, 64):
        subset = records[: 1500 if batch == 1 else len(records)]
        member_rates: dict[tuple[float, ...], list[float]] = {default[:1]: [], default: []}
        for _ in range(args.repeats):
            for momenta in member_rates:
                member_rates[momenta].append(trainer_rate(subset, batch, "auto", momenta))
        one, many = (statistics.median(member_rates[m]) for m in (default[:1], default))
        trainer_member_rows.append([str(batch), f"{one:,.0f}", f"{many:,.0f}", f"{one / many:.2f}"])
    cache_line = []
    if args.cache_runs > 0:
        with tempfile.TemporaryDirectory() as cache:
            cold = first_step_seconds(Path(cache))
            runs = [first_step_seconds(Path(cache)) for _ in range(args.cache_runs)]
        cache_line = [
            "",
            f"A fresh process's imports, engine build and first step: {cold:.1f} s with an empty "
            f"numba cache, {statistics.median(runs):.1f} s with the cache the first run wrote "
            f"(median of {args.cache_runs}).",
        ]
    write_script_result(
        "bench/bench_engine.py",
        argv,
        args.out,
        "The compiled engine against the autograd step",
        [
            f"- trainer alone: `TrainerConfig()` defaults on {SOURCE[0]} (first {args.records} "
            f"records, 1,500 at batch size 1), median of {args.repeats} interleaved runs; "
            "one torch thread, one BLAS thread",
            "",
            md_table(
                ["batch", "engine samples/s", "autograd samples/s", "engine ÷ autograd"],
                rows,
            ),
            "",
            "Stacked members, engine alone, µs per serve + learn step "
            f"(median of {args.repeats} interleaved runs):",
            "",
            md_table(["batch", "K = 1", "K = 4", "K = 4 ÷ K = 1"], member_rows),
            "",
            f"Members in the trainer: the default (`member_momenta` = {list(default)}) against "
            f"one member (momentum {default[:1][0] if default else 'default'}), samples/s, "
            f"median of {args.repeats} interleaved runs:",
            "",
            md_table(
                ["batch", "one member", f"default, {max(1, len(default))} members", "cost ratio"],
                trainer_member_rows,
            ),
            *cache_line,
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
