"""Learning rate and width around the defaults, for the recommendation of defaults.

Same runs as :mod:`bench.accuracy` (same cache, same streams and limits) for one norm at a time,
over learning rates x hidden widths (two hidden layers), at variable batch sizes ``1:64`` (what a
Kafka consumer delivers) and at batch size 1, unless ``--sizes`` says otherwise; *best* is per
batch size. Results: ``bench/results/sweep.json``,
``docs/bench_sweep.png``.

    python -m bench sweep
    python -m bench sweep --norms ema_batch --lrs 0.001,0.003 --widths 32,64 --seeds 0
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from bench._common import (
    DOCS,
    RAW,
    RESULTS,
    STREAMS,
    compact_rows,
    csv_list,
    md_table,
    mean_std,
    meta_lines,
    run_meta,
    worker_map,
    write_json,
)

__all__ = ["add_arguments", "render", "run"]

OUT_JSON = RESULTS / "sweep.json"
PLOT = DOCS / "bench_sweep.png"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", default=",".join(STREAMS))
    p.add_argument("--norms", default="ema_batch,layer")
    p.add_argument("--lrs", default="0.001,0.003,0.01")
    p.add_argument("--widths", default="32,64,128", help="width of both hidden layers")
    p.add_argument("--sizes", default="1:64,1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit", type=int, help="records per stream (default: each stream's own)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-plot", action="store_true")


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    from bench.accuracy import AccuracyRun, execute

    streams = csv_list(args.streams)
    seeds = [int(s) for s in csv_list(args.seeds)]
    limits = {s: args.limit or STREAMS[s][2] for s in streams}
    tasks = [
        AccuracyRun(s, n, z, seed, limits[s], str(RAW / "accuracy"), float(lr), (int(w), int(w)))
        for z in csv_list(args.sizes)
        for n in csv_list(args.norms)
        for lr in csv_list(args.lrs)
        for w in csv_list(args.widths)
        for s in streams
        for seed in seeds
    ]
    meta = run_meta(
        argv,
        seeds=seeds,
        limits={s: f"{STREAMS[s][0]} first {limits[s]} records" for s in streams},
    )
    rows = []
    start = time.perf_counter()
    with worker_map(args.workers) as imap, tqdm(total=len(tasks), unit="run", desc="sweep") as bar:
        for row in imap(execute, tasks):
            rows.append(row)
            bar.update(1)
    meta["wall_seconds"] = time.perf_counter() - start
    data = {"meta": meta, "rows": compact_rows(rows), "summary": summarize(rows)}
    write_json(OUT_JSON, data)
    if not args.no_plot:
        plot(data)
    return data


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, float, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["norm"], r["size"], r["lr"], r["hidden"][0]), []).append(r)
    out = []
    for (norm, size, lr, width), rs in sorted(groups.items()):
        entry: dict[str, Any] = {"norm": norm, "size": size, "lr": lr, "width": width}
        per_stream = []
        for stream in dict.fromkeys(r["stream"] for r in rs):
            m, sd = mean_std(r["accuracy"] for r in rs if r["stream"] == stream)
            entry[stream] = {"accuracy": m, "std": sd}
            per_stream.append(m)
        entry["mean"] = sum(per_stream) / len(per_stream)
        out.append(entry)
    return out


def plot(data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = data["summary"]
    panels = list(dict.fromkeys((r["norm"], r["size"]) for r in summary))
    lrs = sorted({r["lr"] for r in summary})
    widths = sorted({r["width"] for r in summary})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (norm, size) in zip(axes[0], panels, strict=True):
        for w in widths:
            ys = [
                100
                * next(
                    (
                        r["mean"]
                        for r in summary
                        if r["norm"] == norm
                        and r["size"] == size
                        and r["lr"] == lr
                        and r["width"] == w
                    ),
                    float("nan"),
                )
                for lr in lrs
            ]
            ax.plot(lrs, ys, marker="o", label=f"width {w}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"{norm}, batch {size}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("prequential accuracy %, mean over streams")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def render(data: dict[str, Any]) -> str:
    meta, summary = data["meta"], data["summary"]
    streams = [s for s in STREAMS if any(s in r for r in summary)]
    lines = ["## Learning rate and width", "", *meta_lines(meta)]
    lines += [
        "- `TrainerConfig()` defaults except `norm`, `lr`, `hidden=(w, w)` and `seed`; "
        "cells: prequential accuracy %, mean ± sd over seeds; *mean*: over streams; "
        "stream_trainer source hash "
        + ", ".join(sorted({r.get("code_version", "?") for r in data["rows"]})),
        "",
        "![lr and width](docs/bench_sweep.png)",
        "",
    ]
    best: dict[str, float] = {}
    for r in summary:
        best[r["size"]] = max(best.get(r["size"], 0.0), r["mean"])
    rows = []
    for r in sorted(summary, key=lambda r: (r["size"], -r["mean"])):
        cells = [
            f"{100 * r[s]['accuracy']:.1f} ± {100 * r[s]['std']:.1f}" if s in r else ""
            for s in streams
        ]
        mean = f"{100 * r['mean']:.1f}"
        rows.append(
            [
                f"`{r['norm']}`",
                r["size"],
                r["lr"],
                r["width"],
                *cells,
                f"**{mean}**" if r["mean"] == best[r["size"]] else mean,
            ]
        )
    lines += [md_table(["norm", "batch", "lr", "width", *streams, "mean"], rows), ""]
    return "\n".join(lines)
