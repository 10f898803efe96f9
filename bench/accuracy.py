"""Prequential accuracy against batch size, per normalization layer, per stream.

The streaming counterpart of the group-norm paper's figure (error against batch size, one line per
norm): every (stream, norm, batch size, seed) is one run of :func:`stream_trainer.evaluation.
evaluate_stream` with the trainer's **current defaults** (``TrainerConfig()``) except ``norm`` and
``seed``. Batch sizes are fixed 1, 2, 4, 8, 16, 32, 64 and variable ``1:64`` (log-uniform, seeded).
The seed sets the model initialisation and the variable batch-size draws; the data are the same for
every seed (synth streams use their own ``seed=1``).

Each run is cached as one JSON file under ``bench/results/raw/accuracy/`` (git-ignored), keyed by
the run, the record limit and the trainer configuration's fingerprint, so an interrupted grid
resumes and a change of the trainer's defaults re-runs what it touches. The aggregate (mean and
standard deviation over seeds) is written to ``bench/results/accuracy.json`` and plotted to
``docs/bench_accuracy.png``.

    python -m bench accuracy                        # full grid, 2 workers
    python -m bench accuracy --streams phishing --norms batch,layer --sizes 1,64 --seeds 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import (
    DOCS,
    NORMS,
    RAW,
    RESULTS,
    STREAMS,
    code_version,
    compact_rows,
    csv_list,
    md_table,
    mean_std,
    meta_lines,
    read_json,
    run_meta,
    set_single_thread,
    worker_map,
    write_json,
)

__all__ = ["SIZES", "AccuracyRun", "add_arguments", "render", "run"]

SIZES = ("1", "2", "4", "8", "16", "32", "64", "1:64")
OUT_JSON = RESULTS / "accuracy.json"
PLOT = DOCS / "bench_accuracy.png"


@dataclass(frozen=True)
class AccuracyRun:
    stream: str
    norm: str
    size: str
    seed: int
    limit: int
    cache: str = str(RAW / "accuracy")  # not part of the key
    lr: float | None = None  # None: the trainer's default (both are in the config fingerprint)
    hidden: tuple[int, ...] | None = None

    def key(self, fingerprint: str) -> str:
        text = json.dumps(
            [
                self.stream,
                STREAMS[self.stream][0],
                self.norm,
                self.size,
                self.seed,
                self.limit,
                fingerprint,
                code_version(),
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _config(task: AccuracyRun, target: str) -> Any:
    from stream_trainer.training import TrainerConfig

    overrides: dict[str, Any] = {}
    if task.lr is not None:
        overrides["lr"] = task.lr
    if task.hidden is not None:
        overrides["hidden"] = task.hidden
    return TrainerConfig(target=target, norm=task.norm, seed=task.seed, **overrides)


def execute(task: AccuracyRun) -> dict[str, Any]:
    """One prequential run (in a worker process); returns the result row."""
    set_single_thread()
    from stream_trainer.evaluation import evaluate_stream
    from stream_trainer.sources import BatchSizes, open_source
    from stream_trainer.training import IncrementalTrainer

    spec, target, _ = STREAMS[task.stream]
    config = _config(task, target)
    path = Path(task.cache) / f"{task.key(config.fingerprint())}.json"
    if path.exists():
        return read_json(path)
    start = time.perf_counter()
    result = evaluate_stream(
        open_source(spec, target=target),
        IncrementalTrainer(config),
        batch_sizes=BatchSizes.parse(task.size),
        seed=task.seed,
        limit=task.limit,
        progress=False,
    )
    r = result.report
    row = {
        "stream": task.stream,
        "source": spec,
        "norm": task.norm,
        "size": task.size,
        "seed": task.seed,
        "limit": task.limit,
        "samples": r["samples"],
        "accuracy": r.get("accuracy"),
        "rolling_accuracy": r.get("rolling_accuracy"),
        "log_loss": r.get("log_loss"),
        "samples_per_second": r["samples_per_second"],
        "wall_seconds": time.perf_counter() - start,
        "lr": config.lr,
        "hidden": list(config.hidden),
        "optimizer": config.optimizer,
        "fingerprint": config.fingerprint(),
        "code_version": code_version(),
    }
    write_json(path, row)
    return row


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", default=",".join(STREAMS), help=f"subset of {','.join(STREAMS)}")
    p.add_argument("--norms", default=",".join(NORMS))
    p.add_argument("--sizes", default=",".join(SIZES), help="fixed sizes and MIN:MAX specs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--limit", type=int, help="records per stream (default: each stream's own, see tables)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-plot", action="store_true")


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    streams, norms, sizes = csv_list(args.streams), csv_list(args.norms), csv_list(args.sizes)
    seeds = [int(s) for s in csv_list(args.seeds)]
    for s in streams:
        if s not in STREAMS:
            raise SystemExit(f"unknown stream {s!r}; known: {', '.join(STREAMS)}")
    limits = {s: args.limit or STREAMS[s][2] for s in streams}
    # Slow runs (batch size 1) first so the two workers finish together.
    tasks = [
        AccuracyRun(s, n, z, seed, limits[s], str(RAW / "accuracy"))
        for z in sorted(sizes, key=lambda z: int(z.split(":")[0]) * (1 if ":" not in z else 8))
        for s in streams
        for n in norms
        for seed in seeds
    ]
    meta = run_meta(
        argv,
        seeds=seeds,
        limits={s: f"{STREAMS[s][0]} first {limits[s]} records" for s in streams},
        workers=args.workers,
    )
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    bar = tqdm(total=len(tasks), unit="run", desc="accuracy")
    with worker_map(args.workers) as imap, bar:
        for row in imap(execute, tasks):
            rows.append(row)
            bar.update(1)
            bar.set_postfix(last=f"{row['stream']}/{row['norm']}/{row['size']}", refresh=False)
    meta["wall_seconds"] = time.perf_counter() - start
    meta["code_versions"] = sorted({r["code_version"] for r in rows})
    meta["trainer_defaults"] = (
        {k: rows[0][k] for k in ("lr", "hidden", "optimizer")} if rows else {}
    )
    data = {
        "meta": meta,
        "rows": compact_rows(
            sorted(rows, key=lambda r: (r["stream"], r["norm"], r["size"], r["seed"]))
        ),
        "summary": summarize(rows),
    }
    write_json(OUT_JSON, data)
    if not args.no_plot:
        plot(data)
    return data


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["stream"], r["norm"], r["size"]), []).append(r)
    out = []
    for (stream, norm, size), rs in sorted(groups.items()):
        acc, sd = mean_std(r["accuracy"] for r in rs)
        out.append(
            {
                "stream": stream,
                "norm": norm,
                "size": size,
                "accuracy": acc,
                "std": sd,
                "n": len(rs),
                "error": 1 - acc,
                "samples_per_second": sorted(r["samples_per_second"] for r in rs)[len(rs) // 2],
            }
        )
    return out


def _x(size: str) -> float:
    return 128.0 if ":" in size else float(size)


def plot(data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = data["summary"]
    streams = [s for s in STREAMS if any(r["stream"] == s for r in summary)]
    norms = list(dict.fromkeys(r["norm"] for r in summary))
    fig, axes = plt.subplots(1, len(streams), figsize=(4.2 * len(streams), 4.2), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, stream in zip(axes[0], streams, strict=True):
        for i, norm in enumerate(norms):
            rs = [r for r in summary if r["stream"] == stream and r["norm"] == norm]
            fixed = sorted((r for r in rs if ":" not in r["size"]), key=lambda r: _x(r["size"]))
            xs = [_x(r["size"]) for r in fixed]
            ys = [100 * r["error"] for r in fixed]
            sd = [100 * r["std"] for r in fixed]
            style = {"color": colors(i), "lw": 2.2 if norm in ("batch", "ema_batch") else 1.2}
            ax.plot(xs, ys, marker="o", ms=3, label=norm, **style)
            ax.fill_between(
                xs,
                [y - s for y, s in zip(ys, sd, strict=True)],
                [y + s for y, s in zip(ys, sd, strict=True)],
                color=colors(i),
                alpha=0.08,
            )
            for r in rs:
                if ":" in r["size"]:
                    ax.errorbar(
                        [_x(r["size"])],
                        [100 * r["error"]],
                        yerr=[100 * r["std"]],
                        marker="s",
                        ms=4,
                        color=colors(i),
                        capsize=2,
                    )
        limit = next(r["limit"] for r in data["rows"] if r["stream"] == stream)
        ax.set_title(f"{stream} (first {limit})", fontsize=10)
        ax.set_xscale("log", base=2)
        ticks = [1, 2, 4, 8, 16, 32, 64, 128]
        ax.set_xticks(ticks, [*map(str, ticks[:-1]), "1:64"])
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("prequential error, % (mean ± sd over seeds)")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle("Streaming error vs batch size, one line per normalization layer", fontsize=11)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def render(data: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    meta, summary = data["meta"], data["summary"]
    streams = [s for s in STREAMS if any(r["stream"] == s for r in summary)]
    sizes = [z for z in SIZES if any(r["size"] == z for r in summary)]
    lines = ["## Accuracy against batch size", "", *meta_lines(meta)]
    d = meta.get("trainer_defaults", {})
    lines += [
        f"- trainer: `TrainerConfig()` defaults (hidden {d.get('hidden')}, {d.get('optimizer')}, "
        f"lr {d.get('lr')}), only `norm` and `seed` set; grid wall time "
        f"{meta.get('wall_seconds', 0) / 60:.1f} min on {meta.get('workers')} workers; "
        f"stream_trainer source hash {', '.join(meta.get('code_versions', []))} "
        "(runs are cached per hash under `bench/results/raw/`)",
        "- cells: prequential accuracy % (test-then-train over the whole prefix), mean ± sd "
        "over seeds; **bold** = best norm in the column",
        "",
        "![error vs batch size](docs/bench_accuracy.png)",
        "",
    ]
    for stream in streams:
        rs = {(r["norm"], r["size"]): r for r in summary if r["stream"] == stream}
        norms = list(dict.fromkeys(r["norm"] for r in summary if r["stream"] == stream))
        best = {
            z: max((rs[(n, z)]["accuracy"] for n in norms if (n, z) in rs), default=0)
            for z in sizes
        }
        rows = []
        for n in norms:
            cells = []
            for z in sizes:
                r = rs.get((n, z))
                if r is None:
                    cells.append("")
                    continue
                cell = f"{100 * r['accuracy']:.1f} ± {100 * r['std']:.1f}"
                cells.append(f"**{cell}**" if r["accuracy"] == best[z] else cell)
            rows.append([f"`{n}`", *cells])
        lines += [f"### {stream}: {meta['limits'].get(stream, '')}", ""]
        lines += [md_table(["norm", *[f"b={z}" for z in sizes]], rows), ""]
    return "\n".join(lines)
