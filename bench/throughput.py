"""Prequential throughput (samples/s) and accuracy of the trainer beside other learners, same run.

On the first ``--records`` rows of a stream held in memory (parsing the file is not timed), at
batch sizes 1 and 64, one process, one torch thread, repeats interleaved across learners:

* **ours**: ``IncrementalTrainer(TrainerConfig())`` (current defaults: MLP, norm, Adam, lr)
  through :func:`stream_trainer.evaluation.evaluate_stream`: checks, feature encoding, serving
  forward, metrics, training step;
* **bare loop**: the same ``StreamMLP`` and optimizer (same lr, same gradient clipping) on tensors
  encoded before the clock starts: eval forward, count hits, train forward/backward/step; nothing
  else. The ceiling for our per-step overhead; once more with ``norm="none"`` (deep-river's
  architecture) to show what the norm layers cost;
* **deep-river**: ``StandardScaler | deep_river.classification.Classifier`` with an MLP of the
  same widths (no norm layer), same optimizer and lr, run in its own environment
  (:mod:`bench.envs`, :mod:`bench.deep_river_job`);
* **river LogisticRegression / ARF**: through the trainer's river-baseline hooks
  (:mod:`stream_trainer.training.river_baselines`), which learn one record at a time whatever the
  batch size.

The breakdown row splits our step time into serving forward, learning (forward, backward,
optimizer) and the rest (checks, encoding, metrics, batching), from ``StepReport`` timings.

    python -m bench throughput
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import (
    DOCS,
    RESULTS,
    ROOT,
    md_table,
    meta_lines,
    run_meta,
    set_single_thread,
    write_json,
)

__all__ = ["add_arguments", "render", "run"]

OUT_JSON = RESULTS / "throughput.json"
PLOT = DOCS / "bench_throughput.png"
SOURCE = ("/work/shared/data/weather.csv", "target")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=SOURCE[0])
    p.add_argument("--target", default=SOURCE[1])
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--sizes", default="1,64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-deep-river", action="store_true", help="skip deep-river (no venv needed)")
    p.add_argument("--no-arf", action="store_true", help="skip river's ARF (the slowest)")
    p.add_argument("--no-plot", action="store_true")


def _records(source: str, target: str, n: int) -> list[Any]:
    import itertools

    from stream_trainer.records import Record
    from stream_trainer.sources import open_source

    return [
        r for r in itertools.islice(open_source(source, target=target), n) if isinstance(r, Record)
    ]


def _ours(records: list[Any], target: str, size: int, seed: int) -> dict[str, float]:
    from stream_trainer.evaluation import evaluate_stream
    from stream_trainer.sources import BatchSizes
    from stream_trainer.training import IncrementalTrainer, TrainerConfig

    trainer = IncrementalTrainer(TrainerConfig(target=target, seed=seed))
    r = evaluate_stream(
        records, trainer, batch_sizes=BatchSizes.parse(size), seed=seed, progress=False
    ).report
    return {"samples_per_second": r["samples_per_second"], "accuracy": r["accuracy"]}


def _river(name: str, records: list[Any], target: str, size: int, seed: int) -> dict[str, float]:
    from stream_trainer.evaluation import evaluate_stream
    from stream_trainer.sources import BatchSizes
    from stream_trainer.training import TrainerConfig
    from stream_trainer.training.river_baselines import RiverLearner

    learner = RiverLearner(name, TrainerConfig(target=target, seed=seed))
    r = evaluate_stream(
        records, learner, batch_sizes=BatchSizes.parse(size), seed=seed, progress=False
    ).report
    return {"samples_per_second": r["samples_per_second"], "accuracy": r["accuracy"]}


def _encoded(records: list[Any], target: str) -> tuple[Any, Any, int]:
    import numpy as np
    import torch

    from stream_trainer.features import FeatureEncoder
    from stream_trainer.training.labels import canonical_class

    enc = FeatureEncoder(target=target)
    x = enc.fit_transform([r.value for r in records])  # whole prefix at once: timing only
    labels = [canonical_class(r.value[target]) for r in records]
    classes = sorted(set(labels))
    y = np.asarray([classes.index(c) for c in labels], dtype=np.int64)
    return torch.from_numpy(x), torch.from_numpy(y), len(classes)


def _bare(
    x: Any, y: Any, n_classes: int, size: int, seed: int, norm: str | None = None
) -> dict[str, float]:
    import torch
    from torch import nn

    from stream_trainer.model import StreamMLP
    from stream_trainer.training import TrainerConfig

    c = TrainerConfig(target="y", seed=seed)
    torch.manual_seed(seed)
    model = StreamMLP(
        x.shape[1], n_classes, hidden=c.hidden, norm=norm or c.norm, activation=c.activation
    )
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(c.optimizer)
    opt = (
        opt_cls(model.parameters(), lr=c.lr)
        if opt_cls
        else torch.optim.SGD(model.parameters(), lr=c.lr, momentum=0.9)
    )
    hits = 0
    t0 = time.perf_counter()
    for i in range(0, len(x), size):
        xb, yb = x[i : i + size], y[i : i + size]
        model.eval()
        with torch.no_grad():
            hits += int((model(xb).argmax(1) == yb).sum())
        model.train()
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
    return {"samples_per_second": len(x) / (time.perf_counter() - t0), "accuracy": hits / len(x)}


def _breakdown(records: list[Any], target: str, size: int, seed: int) -> dict[str, float]:
    from stream_trainer.sources import iter_batches
    from stream_trainer.training import IncrementalTrainer, TrainerConfig

    trainer = IncrementalTrainer(TrainerConfig(target=target, seed=seed))
    pred = learn = 0.0
    t0 = time.perf_counter()
    for batch in iter_batches(records, iter(lambda: size, None)):
        rep = trainer.step(batch)
        pred += rep.predict_seconds
        learn += rep.learn_seconds
        trainer.metrics()
    total = time.perf_counter() - t0
    return {
        "predict": pred / total,
        "learn": learn / total,
        "other": 1 - (pred + learn) / total,
        "us_per_step": 1e6 * total / max(1, trainer.steps),
    }


def _deep_river(data: Path, size: int, repeats: int, seed: int) -> dict[str, Any]:
    from bench.envs import deep_river_python
    from stream_trainer.training import TrainerConfig

    c = TrainerConfig(target="y")
    cmd = [
        str(deep_river_python()),
        str(ROOT / "bench" / "deep_river_job.py"),
        "--data",
        str(data),
        "--batch",
        str(size),
        "--hidden",
        ",".join(map(str, c.hidden)),
        "--optimizer",
        c.optimizer,
        "--lr",
        str(c.lr),
        "--grad-clip",
        str(c.grad_clip or 0),
        "--repeats",
        str(repeats),
        "--seed",
        str(seed),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    set_single_thread()
    from tqdm import tqdm

    from stream_trainer.training import TrainerConfig

    sizes = [int(s) for s in args.sizes.split(",")]
    records = _records(args.source, args.target, args.records)
    x, y, n_classes = _encoded(records, args.target)
    c = TrainerConfig(target=args.target)
    meta = run_meta(
        argv,
        seeds=[args.seed],
        limits={"stream": f"{args.source} first {len(records)} records (in memory)"},
        notes=f"median of {args.repeats} repeats, interleaved; 1 torch thread; "
        f"ours and bare loop: hidden {list(c.hidden)}, norm {c.norm}, "
        f"{c.optimizer} lr {c.lr}, grad clip {c.grad_clip}",
    )
    learners = ["ours", "bare loop", "bare loop, norm none"]
    if not args.no_deep_river:
        from bench.envs import ensure_deep_river

        meta["deep_river_env"] = ensure_deep_river(quiet=True)
        learners.append("deep-river")
    learners.append("river LogisticRegression")
    if not args.no_arf:
        learners.append("river ARF")
    raw: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "stream.jsonl"
        with data.open("w") as f:
            for r in records:
                v = dict(r.value)
                label = v.pop(args.target)
                f.write(json.dumps({"x": v, "y": label}) + "\n")
        jobs = [
            (rep, name, size) for rep in range(args.repeats) for size in sizes for name in learners
        ]
        for rep, name, size in tqdm(jobs, desc="throughput", unit="run"):
            if name == "deep-river":
                if rep > 0:
                    continue  # one subprocess runs all repeats (import cost is not timed)
                res = _deep_river(data, size, args.repeats, args.seed)
                for s in res.pop("samples_per_second_all"):
                    raw.setdefault((name, size), []).append({**res, "samples_per_second": s})
                continue
            if name == "ours":
                res = _ours(records, args.target, size, args.seed)
            elif name == "bare loop":
                res = _bare(x, y, n_classes, size, args.seed)
            elif name == "bare loop, norm none":
                res = _bare(x, y, n_classes, size, args.seed, norm="none")
            else:
                res = _river(name.split()[-1], records, args.target, size, args.seed)
            raw.setdefault((name, size), []).append(res)
        breakdown = {size: _breakdown(records, args.target, size, args.seed) for size in sizes}
    rows = []
    for (name, size), rs in raw.items():
        rows.append(
            {
                "learner": name,
                "size": size,
                "samples_per_second": statistics.median(r["samples_per_second"] for r in rs),
                "all": [r["samples_per_second"] for r in rs],
                "accuracy": statistics.median(r["accuracy"] for r in rs),
            }
        )
    data_out = {"meta": meta, "rows": rows, "breakdown": {str(k): v for k, v in breakdown.items()}}
    write_json(OUT_JSON, data_out)
    if not args.no_plot:
        plot(data_out)
    return data_out


def _get(rows: list[dict[str, Any]], learner: str, size: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["learner"] == learner and r["size"] == size), None)


def plot(data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    sizes = sorted({r["size"] for r in rows})
    learners = list(dict.fromkeys(r["learner"] for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        vals = [(_get(rows, n, size) or {}).get("samples_per_second", 0) for n in learners]
        bars = ax.barh(
            learners, vals, color=["tab:blue" if n == "ours" else "tab:gray" for n in learners]
        )
        for b, n in zip(bars, learners, strict=True):
            r = _get(rows, n, size)
            if r:
                ax.text(
                    b.get_width(),
                    b.get_y() + b.get_height() / 2,
                    f" {r['samples_per_second']:.0f}/s, acc {100 * r['accuracy']:.1f}%",
                    va="center",
                    fontsize=8,
                )
        ax.set_xscale("log")
        ax.set_xlim(right=max([*vals, 1]) * 6)
        ax.set_title(f"batch size {size}")
        ax.set_xlabel("prequential samples/s (median)")
        ax.invert_yaxis()
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def render(data: dict[str, Any]) -> str:
    meta, rows = data["meta"], data["rows"]
    sizes = sorted({r["size"] for r in rows})
    learners = list(dict.fromkeys(r["learner"] for r in rows))
    lines = ["## Throughput beside other learners", "", *meta_lines(meta)]
    if "deep_river_env" in meta:
        e = meta["deep_river_env"]
        lines.append(
            f"- deep-river {e.get('deep_river')} with river {e.get('river')} and torch "
            f"{e.get('torch')} in `.bench-venvs/deep-river` (installed `--no-deps`)"
        )
    lines += ["", "![throughput](docs/bench_throughput.png)", ""]
    header = ["learner"]
    for z in sizes:
        header += [f"b={z} samples/s", f"b={z} ours ÷ it", f"b={z} acc %"]
    table = []
    for n in learners:
        cells = [n]
        for z in sizes:
            r, ours = _get(rows, n, z), _get(rows, "ours", z)
            if r is None:
                cells += ["", "", ""]
                continue
            ratio = ours["samples_per_second"] / r["samples_per_second"] if ours else float("nan")
            cells += [
                f"{r['samples_per_second']:,.0f}",
                f"{ratio:.2f}x",
                f"{100 * r['accuracy']:.1f}",
            ]
        table.append(cells)
    lines += [
        md_table(header, table),
        "",
        "*ours ÷ it* = our samples/s divided by that learner's (above 1: we are faster). "
        "Accuracy is prequential over the same records.",
        "",
    ]
    checks = []
    for z, other, goal, text in (
        (64, "bare loop", 0.8, "of the bare loop at batch 64"),
        (1, "deep-river", 2.0, "x deep-river at batch 1"),
    ):
        ours, r = _get(rows, "ours", z), _get(rows, other, z)
        if ours and r:
            ratio = ours["samples_per_second"] / r["samples_per_second"]
            verdict = "met" if ratio >= goal else "**not met**"
            checks.append(f"- target ≥ {goal} {text}: measured {ratio:.2f}: {verdict}")
    lines += checks
    bd = data.get("breakdown", {})
    if bd:
        lines += ["", "Where our step time goes (share of wall time over the stream, one run):", ""]
        lines.append(
            md_table(
                [
                    "batch",
                    "µs/step",
                    "serve forward",
                    "learn (fwd+bwd+opt)",
                    "checks, encoding, metrics",
                ],
                [
                    [
                        k,
                        f"{v['us_per_step']:.0f}",
                        f"{100 * v['predict']:.0f}%",
                        f"{100 * v['learn']:.0f}%",
                        f"{100 * v['other']:.0f}%",
                    ]
                    for k, v in bd.items()
                ],
            )
        )
    return "\n".join(lines) + "\n"
