"""The default MLP against river's learners on streams beyond the test suite.

Issue #2 asks the default learner for "at least river's LogisticRegression on the same stream"
and says it is checked on streams that are not in the repository. The accuracy grid
(``python -m bench accuracy``) compares norms with each other; this script compares the default
trainer (``TrainerConfig()``, ``ema_batch``) with ``river:LogisticRegression`` and ``river:ARF``
under the same protocol (:func:`stream_trainer.evaluation.evaluate_stream`, first batch unscored
as in river) on river's bundled datasets, ``weather.csv`` and river's synthetic generators, at
batch size 1 and at ``1:64``, seed 0.

    python bench/bench_baselines.py            # writes bench/results/baselines.md
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import RESULTS, md_table, write_script_result  # noqa: E402

# (source, records read): the synthetic generators are endless.
STREAMS: dict[str, tuple[str, int | None]] = {
    "Phishing": ("river:Phishing", None),
    "Bananas": ("river:Bananas", None),
    "ImageSegments": ("river:ImageSegments", None),
    "weather": ("/work/shared/data/weather.csv", None),
    "Agrawal f1": ("synth:agrawal?function=1", 5000),
    "Agrawal drift": ("synth:agrawal_drift?position=2500&width=500", 5000),
    "RBF drift": ("synth:rbf_drift", 5000),
    "SEA": ("synth:sea", 5000),
    "SEA drift": ("synth:sea_drift?position=2500&width=500", 5000),
    "Hyperplane": ("synth:hyperplane", 5000),
    "LED drift": ("synth:led_drift", 5000),
}
LEARNERS = ("mlp", "LogisticRegression", "ARF")


def accuracy(source: str, limit: int | None, sizes: str, learner: str) -> tuple[float, float]:
    """Prequential accuracy and wall seconds of one learner on one stream, seed 0, one thread."""
    import torch

    from stream_trainer.evaluation import evaluate_stream
    from stream_trainer.sources import BatchSizes, default_target, open_source
    from stream_trainer.training import IncrementalTrainer, TrainerConfig
    from stream_trainer.training.river_baselines import RiverLearner

    torch.set_num_threads(1)
    target = default_target(source) or "target"
    config = TrainerConfig(target=target, seed=0)
    model = IncrementalTrainer(config) if learner == "mlp" else RiverLearner(learner, config)
    start = time.perf_counter()
    result = evaluate_stream(
        open_source(source, target=target),
        model,
        batch_sizes=BatchSizes.parse(sizes),
        seed=0,
        limit=limit,
        progress=False,
    )
    return float(result.report["accuracy"]), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default=",".join(STREAMS), help="comma-separated names")
    parser.add_argument("--sizes", default="1,1:64")
    parser.add_argument("--limit", type=int, default=None, help="cap on records per stream")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "baselines.md")
    args = parser.parse_args(argv)
    names = [n for n in args.streams.split(",") if n]
    unknown = sorted(set(names) - set(STREAMS))
    if unknown:
        parser.error(f"unknown streams {unknown}; known: {', '.join(STREAMS)}")
    sizes = args.sizes.split(",")
    jobs = [(n, s, lr) for n in names for s in sizes for lr in LEARNERS]
    results: dict[tuple[str, str, str], tuple[float, float]] = {}
    context = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        futures = {}
        for job in jobs:
            source, limit = STREAMS[job[0]]
            if args.limit is not None:
                limit = min(limit or args.limit, args.limit)
            futures[job] = pool.submit(accuracy, source, limit, job[1], job[2])
        for i, job in enumerate(jobs, 1):
            results[job] = futures[job].result()
            print(f"[{i}/{len(jobs)}] {job}: {results[job][0]:.4f}", file=sys.stderr)
    rows = []
    for name in names:
        for size in sizes:
            ours, lr, arf = (results[(name, size, lr)][0] for lr in LEARNERS)
            diff = 100 * (ours - lr)
            rows.append(
                [
                    name,
                    size,
                    f"{100 * ours:.2f}",
                    f"{100 * lr:.2f}",
                    f"{100 * arf:.2f}",
                    f"{diff:+.2f}" if diff >= 0 else f"**{diff:+.2f}**",
                ]
            )
    under = sum(1 for r in rows if r[-1].startswith("**"))
    wall = {lr: sum(t for (_, _, name), (_, t) in results.items() if name == lr) for lr in LEARNERS}
    limits = ", ".join(
        f"{n}: {STREAMS[n][0]}" + (f" (first {STREAMS[n][1]})" if STREAMS[n][1] else "")
        for n in names
    )
    write_script_result(
        "bench/bench_baselines.py",
        argv,
        args.out,
        "The default MLP against river's learners",
        [
            f"- streams: {limits}" + (f"; all capped at {args.limit}" if args.limit else ""),
            "- ours: `TrainerConfig()` defaults (`ema_batch`, 2 x 64, Adam 3e-3); river: "
            "`LogisticRegression` (one-vs-rest) and `ARF`, same protocol (`evaluate_stream`, "
            "first batch unscored), seed 0, one thread",
            "- cells: prequential accuracy %; *ours - LR* in points, **bold** where ours is under",
            "",
            md_table(["stream", "batch", "ours", "LR", "ARF", "ours - LR"], rows),
            "",
            f"Ours is under river's LogisticRegression in {under} of {len(rows)} cells.",
            "",
            "Wall time over all cells, s (one process each, two at a time): "
            + ", ".join(f"{lr} {wall[lr]:.0f}" for lr in LEARNERS)
            + ".",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
