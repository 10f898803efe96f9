"""The default MLP against river's learners on streams beyond the test suite.

Issue #2 asks the default learner for "at least river's LogisticRegression on the same stream"
and says it is checked on streams that are not in the repository. The accuracy grid
(``python -m bench accuracy``) compares norms with each other; this script compares the default
trainer (``TrainerConfig()``, ``ema_batch``) with ``river:LogisticRegression`` and ``river:ARF``
under the same protocol (:func:`stream_trainer.evaluation.evaluate_stream`, first batch unscored
as in river) on river's bundled datasets, ``weather.csv`` and river's synthetic generators (those
of ``synth:`` and seven more built here: STAGGER, Sine, Mixed, RandomTree, Waveform, a moving
Hyperplane and LED without drift; first 5,000 records each), at batch size 1 and at ``1:64``.
A second column runs the trainer with ``linear_expert=False`` (the MLP alone), which shows what
the linear expert of :mod:`stream_trainer.training.mixture` adds.

    python bench/bench_baselines.py            # seed 0, writes bench/results/baselines.md
    python bench/bench_baselines.py --seed 1 --no-arf --out bench/results/baselines_seed1.md
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import RESULTS, SHARED_DATA, md_table, write_script_result  # noqa: E402

# (source, records read): the synthetic generators are endless.
STREAMS: dict[str, tuple[str, int | None]] = {
    "Phishing": ("river:Phishing", None),
    "Bananas": ("river:Bananas", None),
    "ImageSegments": ("river:ImageSegments", None),
    "weather": (str(SHARED_DATA / "weather.csv"), None),
    "Agrawal f1": ("synth:agrawal?function=1", 5000),
    "Agrawal drift": ("synth:agrawal_drift?position=2500&width=500", 5000),
    "RBF drift": ("synth:rbf_drift", 5000),
    "SEA": ("synth:sea", 5000),
    "SEA drift": ("synth:sea_drift?position=2500&width=500", 5000),
    "Hyperplane": ("synth:hyperplane", 5000),
    "LED drift": ("synth:led_drift", 5000),
    # river generators that `synth:` does not offer, built here (see _generator_records)
    "STAGGER": ("generator:STAGGER", 5000),
    "Sine": ("generator:Sine", 5000),
    "Mixed": ("generator:Mixed", 5000),
    "RandomTree": ("generator:RandomTree", 5000),
    "Waveform": ("generator:Waveform", 5000),
    "Hyperplane moving": ("generator:HyperplaneMoving", 5000),
    "LED": ("generator:LED", 5000),
}


def _generator(name: str) -> Any:
    from river.datasets import synth

    builders = {
        "STAGGER": lambda: synth.STAGGER(seed=0),
        "Sine": lambda: synth.Sine(seed=0),
        "Mixed": lambda: synth.Mixed(seed=0),
        "RandomTree": lambda: synth.RandomTree(seed_tree=0, seed_sample=0),
        "Waveform": lambda: synth.Waveform(seed=0),
        "HyperplaneMoving": lambda: synth.Hyperplane(seed=0, mag_change=0.001),
        "LED": lambda: synth.LED(seed=0, noise_percentage=0.1),
    }
    return builders[name]()


def _generator_records(name: str, limit: int | None) -> list[Any]:
    """The first ``limit`` records of a river generator as JSON-like records (booleans, which
    JSON would keep but our records treat as categories, become the strings "True"/"False";
    the label goes in ``target``)."""
    from stream_trainer.records import Record

    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, bool) else v

    out = []
    for i, (x, y) in enumerate(itertools.islice(_generator(name), limit)):
        value = {str(k): plain(v) for k, v in x.items()}
        value["target"] = plain(y)
        out.append(Record(value, offset=i))
    return out


LEARNERS = ("mlp", "mlp-alone", "LogisticRegression", "ARF")
"""``mlp``: ``TrainerConfig()`` (the MLP with its linear expert, as served); ``mlp-alone``: the
same with ``linear_expert=False``; river's two learners."""


def accuracy(
    source: str, limit: int | None, sizes: str, learner: str, seed: int = 0
) -> tuple[float, float]:
    """Prequential accuracy and wall seconds of one learner on one stream, one thread."""
    from stream_trainer.evaluation import evaluate_stream
    from stream_trainer.sources import BatchSizes, default_target, open_source
    from stream_trainer.threads import pin_threads
    from stream_trainer.training import IncrementalTrainer, TrainerConfig
    from stream_trainer.training.river_baselines import RiverLearner

    pin_threads(1)
    generated = source.startswith("generator:")
    target = "target" if generated else default_target(source) or "target"
    config = TrainerConfig(target=target, seed=seed, linear_expert=learner != "mlp-alone")
    model = (
        IncrementalTrainer(config) if learner.startswith("mlp") else RiverLearner(learner, config)
    )
    start = time.perf_counter()
    records = (
        iter(_generator_records(source.split(":", 1)[1], limit))
        if generated
        else open_source(source, target=target)
    )
    result = evaluate_stream(
        records,
        model,
        batch_sizes=BatchSizes.parse(sizes),
        seed=seed,
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
    parser.add_argument("--seed", type=int, default=0, help="trainer and batch-size seed")
    parser.add_argument("--no-arf", action="store_true", help="leave out river's ARF (slowest)")
    parser.add_argument("--out", type=Path, default=RESULTS / "baselines.md")
    args = parser.parse_args(argv)
    names = [n for n in args.streams.split(",") if n]
    unknown = sorted(set(names) - set(STREAMS))
    if unknown:
        parser.error(f"unknown streams {unknown}; known: {', '.join(STREAMS)}")
    sizes = args.sizes.split(",")
    learners = [lr for lr in LEARNERS if not (args.no_arf and lr == "ARF")]
    jobs = [(n, s, lr) for n in names for s in sizes for lr in learners]
    results: dict[tuple[str, str, str], tuple[float, float]] = {}
    context = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        futures = {}
        for job in jobs:
            source, limit = STREAMS[job[0]]
            if args.limit is not None:
                limit = min(limit or args.limit, args.limit)
            futures[job] = pool.submit(accuracy, source, limit, job[1], job[2], args.seed)
        for i, job in enumerate(jobs, 1):
            results[job] = futures[job].result()
            print(f"[{i}/{len(jobs)}] {job}: {results[job][0]:.4f}", file=sys.stderr)
    rows = []
    for name in names:
        for size in sizes:
            acc = {lr: results[(name, size, lr)][0] for lr in learners}
            diff = 100 * (acc["mlp"] - acc["LogisticRegression"])
            alone = 100 * (acc["mlp-alone"] - acc["LogisticRegression"])
            mark = f"{diff:+.2f}" if diff >= 0 else f"**{diff:+.2f}**"
            cells = [f"{100 * acc[lr]:.2f}" for lr in learners]
            rows.append([name, size, *cells, mark, f"{alone:+.2f}"])
    under = sum(1 for r in rows if r[-2].startswith("**"))
    under_alone = sum(1 for r in rows if r[-1].startswith("-"))
    wall = {lr: sum(t for (_, _, name), (_, t) in results.items() if name == lr) for lr in learners}
    header = ["stream", "batch", "ours", "MLP alone", "LR", *(["ARF"] if "ARF" in learners else [])]
    limits = ", ".join(
        f"{n}: {STREAMS[n][0]}" + (f" (first {STREAMS[n][1]})" if STREAMS[n][1] else "")
        for n in names
    )
    write_script_result(
        "bench/bench_baselines.py",
        argv,
        args.out,
        "The default MLP against river's learners" + (f", seed {args.seed}" if args.seed else ""),
        [
            f"- streams: {limits}" + (f"; all capped at {args.limit}" if args.limit else ""),
            "- ours: `TrainerConfig()` defaults (`ema_batch`, 2 x 64, Adam 3e-3, the linear "
            "expert served in a mixture with the MLP); *MLP alone*: the same with "
            "`linear_expert=False`; river: `LogisticRegression` (one-vs-rest)"
            + (" and `ARF`" if "ARF" in learners else "")
            + ", same protocol (`evaluate_stream`, first batch unscored), "
            + f"seed {args.seed} (trainer init and batch sizes), one thread",
            "- cells: prequential accuracy %; *ours - LR* in points, **bold** where ours is under",
            "",
            md_table([*header, "ours - LR", "MLP alone - LR"], rows),
            "",
            f"Ours is under river's LogisticRegression in {under} of {len(rows)} cells "
            f"(the MLP alone: {under_alone}).",
            "",
            f"Wall time over all cells, s (one process each, {args.workers} at a time): "
            + ", ".join(f"{lr} {wall[lr]:.0f}" for lr in learners)
            + ".",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
