"""Train/serve gap: what a norm layer does differently in training mode and when serving one record.

For every norm and seed, a trainer with the current defaults learns prequentially from the first
``--train`` records of a stream at batch size 64 (and, separately, at variable sizes ``1:64``).
Then, with the model frozen, the next ``--serve`` records are cut into batches of the training
sizes and for each batch:

* **layer gap**: :meth:`IncrementalTrainer.train_serve_gap`: per norm layer, mean
  |training-mode output - serving-mode output| on that batch (averaged over layers and batches);
* **output gap**: mean |softmax in training mode on the batch - softmax served| (model state is
  restored after each training-mode forward), and the share of records whose predicted class
  differs between the two;
* **accuracy**: served one record at a time (``predict_many([record])``, eval mode, the service's
  path), against the training-mode accuracy on the same batches (what a loop that scores its
  training forward pass would report) and the prequential accuracy over the training prefix.

    python -m bench gap
    python -m bench gap --streams weather --norms batch,ema_batch --seeds 0
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench._common import (
    DOCS,
    NORMS,
    RESULTS,
    STREAMS,
    md_table,
    mean_std,
    meta_lines,
    run_meta,
    set_single_thread,
    write_json,
)

__all__ = ["add_arguments", "render", "run"]

OUT_JSON = RESULTS / "gap.json"
PLOT = DOCS / "bench_gap.png"
TRAIN_SIZES = ("64", "1:64")


@dataclass(frozen=True)
class GapRun:
    stream: str
    norm: str
    size: str
    seed: int
    train: int
    serve: int


def _encode(trainer: Any, batch: list[Any]) -> Any:
    """The trainer's encoding of ``batch`` with its current statistics (read-only transform)."""
    import torch

    assert trainer.model is not None
    x = torch.from_numpy(trainer.encoder.transform([r.value for r in batch]))
    width = trainer.model.in_features
    if x.shape[1] < width:
        x = torch.nn.functional.pad(x, (0, width - x.shape[1]))
    return x[:, :width]


def execute(task: GapRun) -> dict[str, Any]:
    set_single_thread()
    import numpy as np
    import torch

    from stream_trainer.evaluation import evaluate_stream
    from stream_trainer.records import Record
    from stream_trainer.sources import BatchSizes, iter_batches, open_source
    from stream_trainer.training import IncrementalTrainer, TrainerConfig
    from stream_trainer.training.labels import canonical_class

    spec, target, _ = STREAMS[task.stream]
    config = TrainerConfig(target=target, norm=task.norm, seed=task.seed)
    trainer = IncrementalTrainer(config)
    sizes = BatchSizes.parse(task.size)
    source = open_source(spec, target=target)
    result = evaluate_stream(
        source, trainer, batch_sizes=sizes, seed=task.seed, limit=task.train, progress=False
    )
    held = [r for r in itertools.islice(source, task.serve) if isinstance(r, Record)]
    assert trainer.model is not None
    model = trainer.model

    # Served one record at a time (the service's path).
    served_ok = 0
    for rec in held:
        pred = trainer.predict_many([rec])[0]
        served_ok += int(pred == canonical_class(rec.value[target]))

    layer_gaps: list[float] = []
    out_gaps: list[float] = []
    flips = 0
    train_ok = 0
    for batch in iter_batches(held, sizes.sizes(task.seed + 1000)):
        gaps = trainer.train_serve_gap(batch)
        if gaps:
            layer_gaps.append(float(np.mean(list(gaps.values()))))
        x = _encode(trainer, batch)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        with torch.no_grad():
            model.eval()
            p_serve = torch.softmax(model(x).double(), dim=1)
            model.train()
            p_train = torch.softmax(model(x).double(), dim=1)
        model.load_state_dict(saved)
        torch.set_rng_state(rng)
        model.eval()
        out_gaps.append(float((p_train - p_serve).abs().sum(dim=1).mean()) * len(batch))
        flips += int((p_train.argmax(1) != p_serve.argmax(1)).sum())
        labels = [trainer.class_index.get(str(canonical_class(r.value[target])), -1) for r in batch]
        train_ok += int((p_train.argmax(1) == torch.tensor(labels)).sum())
    n = max(1, len(held))
    return {
        "stream": task.stream,
        "norm": task.norm,
        "size": task.size,
        "seed": task.seed,
        "train": task.train,
        "serve": len(held),
        "prequential_accuracy": result.report.get("accuracy"),
        "rolling_accuracy": result.report.get("rolling_accuracy"),
        "served_accuracy_b1": served_ok / n,
        "train_mode_accuracy": train_ok / n,
        "layer_gap": float(np.mean(layer_gaps)) if layer_gaps else 0.0,
        "output_gap_l1": sum(out_gaps) / n,
        "flip_rate": flips / n,
        "lr": config.lr,
        "hidden": list(config.hidden),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", default="weather,bananas")
    p.add_argument("--norms", default=",".join(NORMS))
    p.add_argument("--sizes", default=",".join(TRAIN_SIZES), help="training batch sizes")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train", type=int, default=1500, help="records learned before serving")
    p.add_argument("--serve", type=int, default=500, help="records served after training")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-plot", action="store_true")


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    from bench._common import worker_map

    split = lambda s: [p.strip() for p in s.split(",") if p.strip()]  # noqa: E731
    seeds = [int(s) for s in split(args.seeds)]
    tasks = [
        GapRun(s, n, z, seed, args.train, args.serve)
        for s in split(args.streams)
        for n in split(args.norms)
        for z in split(args.sizes)
        for seed in seeds
    ]
    meta = run_meta(
        argv,
        seeds=seeds,
        limits={
            s: f"{STREAMS[s][0]}: train on the first {args.train} records, "
            f"serve the next {args.serve}"
            for s in split(args.streams)
        },
    )
    rows = []
    start = time.perf_counter()
    with worker_map(args.workers) as imap, tqdm(total=len(tasks), unit="run", desc="gap") as bar:
        for row in imap(execute, tasks):
            rows.append(row)
            bar.update(1)
    meta["wall_seconds"] = time.perf_counter() - start
    data = {"meta": meta, "rows": rows, "summary": summarize(rows)}
    write_json(OUT_JSON, data)
    if not args.no_plot:
        plot(data)
    return data


_FIELDS = (
    "prequential_accuracy",
    "train_mode_accuracy",
    "served_accuracy_b1",
    "layer_gap",
    "output_gap_l1",
    "flip_rate",
)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["stream"], r["norm"], r["size"]), []).append(r)
    out = []
    for (stream, norm, size), rs in sorted(groups.items()):
        entry: dict[str, Any] = {"stream": stream, "norm": norm, "size": size, "n": len(rs)}
        for f in _FIELDS:
            entry[f], entry[f + "_std"] = mean_std(r[f] for r in rs)
        out.append(entry)
    return out


def plot(data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = data["summary"]
    streams = list(dict.fromkeys(r["stream"] for r in summary))
    sizes = list(dict.fromkeys(r["size"] for r in summary))
    norms = list(dict.fromkeys(r["norm"] for r in summary))
    fig, axes = plt.subplots(2, len(streams), figsize=(5.5 * len(streams), 6.5), squeeze=False)
    width = 0.8 / max(1, len(sizes))
    for j, stream in enumerate(streams):
        for k, size in enumerate(sizes):
            rs = {r["norm"]: r for r in summary if r["stream"] == stream and r["size"] == size}
            xs = [i + k * width for i in range(len(norms))]
            axes[0][j].bar(
                xs,
                [rs[n]["output_gap_l1"] if n in rs else 0 for n in norms],
                width,
                label=f"trained at {size}",
            )
            axes[1][j].bar(
                xs,
                [
                    100 * (rs[n]["served_accuracy_b1"] - rs[n]["train_mode_accuracy"])
                    if n in rs
                    else 0
                    for n in norms
                ],
                width,
                label=f"trained at {size}",
            )
        for ax in axes[:, j]:
            ax.set_xticks(
                [i + width * (len(sizes) - 1) / 2 for i in range(len(norms))],
                norms,
                rotation=35,
                fontsize=8,
            )
            ax.grid(alpha=0.3, axis="y")
        axes[0][j].set_title(stream)
        axes[0][j].set_ylabel("L1 |p_train - p_serve| per record")
        axes[1][j].set_ylabel("served@1 - train-mode accuracy, pts")
        axes[1][j].axhline(0, color="k", lw=0.6)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Train/serve gap per norm (mean over seeds)", fontsize=11)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = ["## Train/serve gap", "", *meta_lines(meta)]
    lines += [
        "- trained prequentially at the given batch size with `TrainerConfig()` defaults; then "
        "frozen. *layer gap*: mean over norm layers of mean |train-mode - serve-mode output| "
        "(`IncrementalTrainer.train_serve_gap`) on batches of the training size; *output gap*: "
        "L1 distance of the class probabilities, per record; *flips*: share of records whose "
        "class differs; *served@1*: accuracy served one record at a time (eval mode); "
        "*train-mode*: accuracy of the training-mode forward on the same batches; "
        "*preq.*: prequential accuracy over the training prefix. Mean over seeds.",
        "",
        "![train/serve gap](docs/bench_gap.png)",
        "",
    ]
    streams = list(dict.fromkeys(r["stream"] for r in data["summary"]))
    for stream in streams:
        rows = []
        for r in data["summary"]:
            if r["stream"] != stream:
                continue
            rows.append(
                [
                    f"`{r['norm']}`",
                    r["size"],
                    f"{r['layer_gap']:.3f}",
                    f"{r['output_gap_l1']:.3f}",
                    f"{100 * r['flip_rate']:.1f}%",
                    f"{100 * r['prequential_accuracy']:.1f}",
                    f"{100 * r['train_mode_accuracy']:.1f}",
                    f"{100 * r['served_accuracy_b1']:.1f}"
                    f" ± {100 * r['served_accuracy_b1_std']:.1f}",
                ]
            )
        lines += [f"### {stream}: {meta['limits'].get(stream, '')}", ""]
        lines += [
            md_table(
                [
                    "norm",
                    "trained at",
                    "layer gap",
                    "output gap",
                    "flips",
                    "preq. acc %",
                    "train-mode acc %",
                    "served@1 acc %",
                ],
                rows,
            ),
            "",
        ]
    return "\n".join(lines)
