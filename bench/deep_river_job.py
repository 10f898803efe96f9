"""deep-river's MLP on a JSONL stream, prequentially; prints one JSON object.

Runs **inside** ``.bench-venvs/deep-river`` (see :mod:`bench.envs`), so it imports nothing from
stream_trainer or the bench package. Input lines are ``{"x": {feature: float}, "y": label}``. The
model is ``StandardScaler | Classifier(MLP)`` with the widths, optimizer and learning rate given;
at batch size 1 each record is ``predict_proba_one`` then ``learn_one``; at batch size B the
batch is ``predict_proba_many`` then ``learn_many`` (pandas frames, built inside the timed loop:
that is deep-river's mini-batch API).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", default="64,64")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--grad-clip", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import importlib.metadata as md

    import pandas as pd
    import torch
    from deep_river.classification import Classifier
    from river import compose, preprocessing
    from torch import nn

    torch.set_num_threads(1)
    with open(args.data) as f:
        rows = [json.loads(line) for line in f]
    xs = [r["x"] for r in rows]
    ys = [r["y"] for r in rows]
    n_features = len(xs[0])
    classes = sorted(set(ys))
    hidden = [int(h) for h in args.hidden.split(",")]

    def build() -> Any:
        torch.manual_seed(args.seed)
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
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
        return compose.Pipeline(preprocessing.StandardScaler(), clf)

    speeds, accs = [], []
    for _ in range(args.repeats):
        model = build()
        # Register every class before the clock starts (the output layer has their width).
        model[-1].observed_classes.update(classes)
        correct = 0
        t0 = time.perf_counter()
        if args.batch == 1:
            for x, y in zip(xs, ys, strict=True):
                proba = model.predict_proba_one(x)
                if proba and max(proba, key=proba.get) == y:
                    correct += 1
                model.learn_one(x, y)
        else:
            for i in range(0, len(xs), args.batch):
                frame = pd.DataFrame(xs[i : i + args.batch])
                target = pd.Series(ys[i : i + args.batch])
                proba = model.predict_proba_many(frame)
                if i > 0:
                    correct += int((proba.idxmax(axis=1).values == target.values).sum())
                model.learn_many(frame, target)
        speeds.append(len(xs) / (time.perf_counter() - t0))
        accs.append(correct / len(xs))
    print(
        json.dumps(
            {
                "samples_per_second": statistics.median(speeds),
                "samples_per_second_all": speeds,
                "accuracy": statistics.median(accs),
                "deep_river": md.version("deep-river"),
                "river": md.version("river"),
                "torch": torch.__version__,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
