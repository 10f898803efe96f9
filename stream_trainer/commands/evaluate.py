"""``stream-trainer evaluate``: prequential evaluation of a configuration on a recorded stream."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_trainer.commands._learner_args import (
    add_learner_arguments,
    add_limit_arguments,
    add_threads_argument,
    build_learner,
    trainer_config,
)
from stream_trainer.errors import ConfigError
from stream_trainer.sources import BatchSizes, default_target, open_source
from stream_trainer.training.config import SCREENING_SETTINGS

if TYPE_CHECKING:
    from stream_trainer.evaluation import EvaluationResult

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="prequential (test-then-train) evaluation on a file or bundled dataset",
        description=__doc__,
    )
    p.add_argument(
        "--source",
        required=True,
        help="CSV/ARFF/JSONL file, a recording, river:NAME or synth:NAME?...",
    )
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--batch-size", type=int, help="fixed mini-batch size (default 1)")
    sizes.add_argument(
        "--batch-sizes", help="MIN:MAX: each batch size drawn log-uniformly (seeded)"
    )
    p.add_argument("--limit", type=int, help="read at most N records")
    p.add_argument(
        "--label-delay",
        type=int,
        metavar="N",
        help="labels arrive N records after their features: each record is predicted on arrival"
        " and learned N records later (river's progressive_val_score delay=N; batch size 1)",
    )
    p.add_argument("--report-json", type=Path, help="write the report as JSON here")
    p.add_argument("--plot", type=Path, help="write a PNG of rolling accuracy and batch sizes here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p)
    add_learner_arguments(p)
    add_limit_arguments(p)
    p.set_defaults(func=run_evaluate)


def batch_sizes_from(args: argparse.Namespace) -> BatchSizes:
    if args.batch_sizes:
        return BatchSizes.parse(args.batch_sizes)
    return BatchSizes.parse(args.batch_size if args.batch_size is not None else 1)


def print_summary(result: EvaluationResult, out: Any = None) -> None:
    """Three lines: the configuration, the metrics, the counts (rejected by reason) and speed."""
    out = sys.stdout if out is None else out
    r = result.report
    keys = [
        k
        for k in ("accuracy", "rolling_accuracy", "log_loss", "kappa", "mae", "rmse", "r2")
        if k in r
    ]
    print(
        f"model={r['model']} norm={r['norm']} batch_size={r['batch_size']} source={r['source']}",
        file=out,
    )
    print("  " + "  ".join(f"{k}={r[k]:.4f}" for k in keys), file=out)
    print(
        f"  samples={r['samples']} unscored={r['unscored']} predicted_only={r['predicted_only']}"
        f" rejected={r['rejected_total']}"
        f" {r['rejected'] or ''} samples/s={r['samples_per_second']:.0f}",
        file=out,
    )


def run_evaluate(args: argparse.Namespace) -> int:
    target = args.target or default_target(args.source)
    if target is None:
        raise ConfigError("--target is required for file sources (the label column)")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit!r}")
    from stream_trainer.delayed_labels import evaluate_with_label_delay
    from stream_trainer.evaluation import evaluate_stream
    from stream_trainer.threads import pin_threads

    pin_threads(args.threads)
    config = trainer_config(args, target)
    given = {k: getattr(args, k) for k in SCREENING_SETTINGS if getattr(args, k) is not None}
    config = dataclasses.replace(config, **given)  # validated again: a bad limit is refused
    learner = build_learner(args, config)
    learner.warm_up()  # before evaluate_stream's clock, which samples_per_second divides by
    sizes = batch_sizes_from(args)
    norm = config.norm if isinstance(config.norm, str) else ",".join(config.norm)
    describe = {
        "model": args.model,
        "norm": norm if args.model == "mlp" else None,
        "source": args.source,
        "target": target,
        "hidden": list(config.hidden),
        "optimizer": config.optimizer,
        "lr": config.lr,
    }
    source = open_source(args.source, target=target)
    if args.label_delay is not None:
        if str(sizes) != "1":
            msg = f"--label-delay replays records one at a time; got batch size {sizes}"
            raise ConfigError(msg)
        result = evaluate_with_label_delay(
            source,
            learner,
            delay=args.label_delay,
            limit=args.limit,
            progress=not args.no_progress,
            describe={**describe, "seed": args.seed},
        )
    else:
        result = evaluate_stream(
            source,
            learner,
            batch_sizes=sizes,
            seed=args.seed,
            limit=args.limit,
            progress=not args.no_progress,
            describe=describe,
        )
    print_summary(result)
    if args.report_json:
        args.report_json.parent.mkdir(parents=True, exist_ok=True)
        args.report_json.write_text(json.dumps(result.report, indent=2) + "\n")
    if args.plot:
        from stream_trainer.plots import plot_history

        title = f"{args.source} · {args.model} · norm={norm} · batch={sizes}"
        plot_history(result.history, args.plot, title=title)
    return 0
