"""deep-river's MLP, as a user of deep-river would run it; prints JSON.

Runs **inside** ``.bench-venvs/deep-river`` (see :mod:`bench.envs`), so it imports nothing from
stream_trainer or the bench package. The model is ``StandardScaler | Classifier(MLP)`` (Linear and
ReLU per hidden width, no norm layer) with the widths, optimizer and learning rate given; at batch
size 1 each record is ``predict_proba_one`` then ``learn_one``; at batch size B the batch is
``predict_proba_many`` then ``learn_many`` (pandas frames, built inside the timed loop: that is
deep-river's mini-batch API). One thread, in torch and in the BLAS/OpenMP pools.

Two modes:

``worker``
    Steady state, for :mod:`bench.throughput`: reads records ``{"x": {feature: float}, "y":
    label}`` (JSONL), builds one model per batch size, learns ``--warmup`` records with each,
    prints ``{"ready": true, ...versions}``, then answers each line ``SIZE`` on standard input
    with ``{"samples_per_second": ...}`` for one prequential pass over the other records. The
    caller interleaves these passes with its own contenders.
``script``
    The whole script on a CSV file: read the first ``--limit`` rows (every column but the target
    as a float), then one prequential pass; prints the accuracy. The caller times the process.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as md
import itertools
import json
import sys
import time
from typing import Any


def _pin_one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the environment has no threadpoolctl: torch's pool only
        return
    threadpool_limits(limits=1)


def _build(args: argparse.Namespace, n_features: int, classes: list[Any]) -> Any:
    import torch
    from deep_river.classification import Classifier
    from river import compose, preprocessing
    from torch import nn

    torch.manual_seed(args.seed)
    layers: list[nn.Module] = []
    width = n_features
    for h in (int(h) for h in args.hidden.split(",")):
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, len(classes)))
    clf = Classifier(
        module=nn.Sequential(*layers),
        loss_fn="cross_entropy",
        optimizer_fn=args.optimizer,
        lr=args.lr,
        is_class_incremental=False,
        seed=args.seed,
        gradient_clip_value=args.grad_clip or None,
    )
    model = compose.Pipeline(preprocessing.StandardScaler(), clf)
    # Every class known up front (the output layer has their width), as a user who knows them.
    model[-1].observed_classes.update(classes)
    return model


def _prequential(model: Any, xs: list[dict[str, float]], ys: list[Any], batch: int) -> int:
    """One predict-then-learn pass; the number of correct predictions."""
    import pandas as pd

    correct = 0
    if batch == 1:
        for x, y in zip(xs, ys, strict=True):
            proba = model.predict_proba_one(x)
            if proba and max(proba, key=proba.get) == y:
                correct += 1
            model.learn_one(x, y)
        return correct
    for i in range(0, len(xs), batch):
        frame = pd.DataFrame(xs[i : i + batch])
        target = pd.Series(ys[i : i + batch])
        proba = model.predict_proba_many(frame)
        if i > 0:
            correct += int((proba.idxmax(axis=1).values == target.values).sum())
        model.learn_many(frame, target)
    return correct


def _versions() -> dict[str, str]:
    import torch

    return {
        "deep_river": md.version("deep-river"),
        "river": md.version("river"),
        "torch": torch.__version__,
    }


def _worker(args: argparse.Namespace) -> int:
    _pin_one_thread()
    with open(args.data) as f:
        rows = [json.loads(line) for line in f]
    xs = [r["x"] for r in rows]
    ys = [r["y"] for r in rows]
    classes = sorted(set(ys))
    warm, timed = slice(0, args.warmup), slice(args.warmup, None)
    models = {}
    for size in (int(s) for s in args.sizes.split(",")):
        models[size] = _build(args, len(xs[0]), classes)
        _prequential(models[size], xs[warm], ys[warm], size)
    print(json.dumps({"ready": True, **_versions()}), flush=True)
    for line in sys.stdin:
        size = int(line)
        t0 = time.perf_counter()
        correct = _prequential(models[size], xs[timed], ys[timed], size)
        seconds = time.perf_counter() - t0
        n = len(xs[timed])
        print(json.dumps({"samples_per_second": n / seconds, "accuracy": correct / n}), flush=True)
    return 0


def _script(args: argparse.Namespace) -> int:
    _pin_one_thread()
    with open(args.csv, newline="") as f:
        rows = list(itertools.islice(csv.DictReader(f), args.limit))
    ys = [r.pop(args.target) for r in rows]
    xs = [{k: float(v) for k, v in r.items()} for r in rows]
    classes = sorted(set(ys))
    model = _build(args, len(xs[0]), classes)
    correct = _prequential(model, xs, ys, args.batch)
    print(json.dumps({"samples": len(xs), "accuracy": correct / len(xs), **_versions()}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    modes = p.add_subparsers(dest="mode", required=True)
    worker = modes.add_parser("worker")
    worker.add_argument("--data", required=True)
    worker.add_argument("--sizes", default="1,64")
    worker.add_argument("--warmup", type=int, default=500)
    script = modes.add_parser("script")
    script.add_argument("--csv", required=True)
    script.add_argument("--target", required=True)
    script.add_argument("--limit", type=int, default=4000)
    script.add_argument("--batch", type=int, default=1)
    for q in (worker, script):
        q.add_argument("--hidden", default="64,64")
        q.add_argument("--optimizer", default="adam")
        q.add_argument("--lr", type=float, default=3e-3)
        q.add_argument("--grad-clip", type=float, default=0.0)
        q.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    return _worker(args) if args.mode == "worker" else _script(args)


if __name__ == "__main__":
    sys.exit(main())
