"""Command-line flags shared by ``evaluate`` and ``run``: the learner and its configuration."""

from __future__ import annotations

import argparse
import dataclasses
import json
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from stream_trainer.errors import ConfigError
from stream_trainer.training.config import (
    DEFAULT_NORM_OPTIONS,
    ENGINES,
    LR_SCALINGS,
    OPTIMIZERS,
    RIVER_MODELS,
    TASKS,
    TrainerConfig,
    member_momenta_for,
)

if TYPE_CHECKING:
    from stream_trainer.training.trainer import IncrementalTrainer

__all__ = [
    "add_learner_arguments",
    "add_limit_arguments",
    "add_threads_argument",
    "build_learner",
    "given_norm_options",
    "model_name",
    "norm_options_from",
    "trainer_config",
]


def _field_defaults(cls: type) -> SimpleNamespace:
    """The declared defaults of a dataclass, without constructing (and so validating) one: a
    :class:`TrainerConfig` checks its norm and activation names against registries that need
    torch, and the parser is built without torch."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return SimpleNamespace(**values)


_DEFAULTS = _field_defaults(TrainerConfig)


def _numbers(text: str, cast: type[int] | type[float], what: str) -> tuple[Any, ...]:
    try:
        return tuple(cast(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None


def _int_list(text: str) -> tuple[int, ...]:
    return _numbers(text, int, "integers")


def _momenta(text: str) -> tuple[float, ...]:
    """``0.002,0.01,...`` as a tuple of floats; ``none`` (or nothing) as ``()``."""
    if text.strip().lower() in ("", "none"):
        return ()
    return _numbers(text, float, "numbers or 'none'")


def _norm_option(text: str) -> tuple[str, str, object]:
    """``NORM.KEY=VALUE`` as ``(norm, key, value)``; the value read as JSON (a number, ``true``,
    ``false``), else kept as text. The norm's constructor checks the key and the value."""
    name, sep, raw = text.partition("=")
    norm, dot, key = name.strip().partition(".")
    if not sep or not dot or not norm or not key:
        raise argparse.ArgumentTypeError(f"expected NORM.KEY=VALUE, got {text!r}")
    try:
        value: object = json.loads(raw)
    except ValueError:
        value = raw.strip()
    return norm, key, value


def given_norm_options(
    items: list[tuple[str, str, object]] | None,
) -> dict[str, dict[str, object]]:
    """The ``--norm-option`` items alone, as ``norm_options`` (later items win)."""
    options: dict[str, dict[str, object]] = {}
    for norm, key, value in items or []:
        options.setdefault(norm, {})[key] = value
    return options


def norm_options_from(items: list[tuple[str, str, object]] | None) -> dict[str, dict[str, object]]:
    """The ``norm_options`` of :class:`TrainerConfig` for ``--norm-option`` items: the defaults,
    then each item in order."""
    options = {name: dict(values) for name, values in DEFAULT_NORM_OPTIONS.items()}
    for norm, values in given_norm_options(items).items():
        options.setdefault(norm, {}).update(values)
    return options


def _norm_list(text: str) -> str | tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    return parts[0] if len(parts) == 1 else parts


def add_learner_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("learner")
    g.add_argument("--target", help="label field (default: the bundled dataset's own)")
    g.add_argument("--task", choices=TASKS, default=_DEFAULTS.task)
    g.add_argument("--features", help="comma-separated feature names to use (default: all fields)")
    g.add_argument(
        "--model",
        default="mlp",
        help=f"mlp, or a river baseline: {', '.join('river:' + m for m in RIVER_MODELS)}",
    )
    g.add_argument(
        "--norm",
        type=_norm_list,
        default=_DEFAULTS.norm,
        help="normalization layer for every hidden layer, or one per layer (comma-separated)",
    )
    g.add_argument(
        "--norm-option",
        dest="norm_options",
        type=_norm_option,
        action="append",
        metavar="NORM.KEY=VALUE",
        help="an option of a norm layer, e.g. ema_batch.momentum=0.01 (repeatable; over the "
        "defaults, ema_batch.momentum=0.002 and batch_renorm.momentum=0.002)",
    )
    g.add_argument(
        "--hidden", type=_int_list, default=_DEFAULTS.hidden, help="hidden sizes, e.g. 64,64"
    )
    g.add_argument("--activation", default=_DEFAULTS.activation)
    g.add_argument("--dropout", type=float, default=_DEFAULTS.dropout)
    g.add_argument(
        "--weight-standardization",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="weight-standardize the linear layer before each norm"
        " (default: as the norm asks: group)",
    )
    g.add_argument(
        "--skip",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS.skip,
        help="a linear shortcut from the standardized inputs to the output (default on)",
    )
    g.add_argument(
        "--linear-expert",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS.linear_expert,
        help="serve a mixture of the MLP and an online logistic (or linear) regression, weighted"
        " by their recent errors (default on)",
    )
    g.add_argument(
        "--member-momenta",
        type=_momenta,
        default=None,
        metavar="M1,M2,...",
        help="train one MLP member per norm momentum, served as a mixture weighted by their "
        "recent errors: the stream picks its time scale ('none': one member, with the norm's "
        "own momentum, as when --norm-option sets a momentum; default "
        + (",".join(map(str, _DEFAULTS.member_momenta)) or "none")
        + ")",
    )
    g.add_argument(
        "--lr-scale-min",
        type=float,
        default=_DEFAULTS.lr_scale_min,
        help="lower bound of the batch-size lr factor (default 1: small batches keep --lr)",
    )
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=_DEFAULTS.optimizer)
    g.add_argument("--lr", type=float, default=_DEFAULTS.lr)
    g.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    g.add_argument("--grad-clip", type=float, default=_DEFAULTS.grad_clip, help="0 disables")
    g.add_argument("--lr-scaling", choices=LR_SCALINGS, default=_DEFAULTS.lr_scaling)
    g.add_argument("--lr-reference-batch", type=int, default=_DEFAULTS.lr_reference_batch)
    g.add_argument(
        "--momentum-in-samples",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS.momentum_in_samples,
        help="Adam's beta1 counted per --lr-reference-batch samples, not per step (default on)",
    )
    g.add_argument("--max-categories", type=int, default=_DEFAULTS.max_categories)
    g.add_argument(
        "--engine",
        choices=ENGINES,
        default=_DEFAULTS.engine,
        help="auto: the compiled step engine wherever it covers the model; torch: autograd "
        "(the two agree to float rounding; default auto)",
    )
    g.add_argument(
        "--window",
        dest="rolling_window",
        metavar="N",
        type=int,
        default=_DEFAULTS.rolling_window,
        help="rolling-metric window",
    )
    g.add_argument("--seed", type=int, default=0)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The screening limits (:data:`~stream_trainer.training.config.SCREENING_SETTINGS`), each
    ``None`` unless given."""
    limits = parser.add_argument_group(
        "screening limits", "a record beyond one is rejected whole, with the reason in brackets"
    )
    limits.add_argument(
        "--max-abs-value", type=float, help="largest magnitude of a number [out_of_range]"
    )
    limits.add_argument(
        "--max-string-length", type=int, help="longest string, field name or label [too_large]"
    )
    limits.add_argument(
        "--max-new-features-per-record",
        type=int,
        help="most features one record may add [too_many_new_features]",
    )
    limits.add_argument(
        "--max-features", type=int, help="most input columns of the model [too_many_features]"
    )
    limits.add_argument("--max-classes", type=int, help="most classes [too_many_classes]")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads``: the :mod:`stream_trainer.threads` setting."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of torch and of numpy's BLAS/OpenMP pools, pinned together (default 1: the"
        " MLP's products are small, and waking a thread pool per kernel costs more than it saves,"
        " by far on a busy machine)",
    )


def trainer_config(args: argparse.Namespace, target: str | None) -> TrainerConfig:
    features = tuple(f.strip() for f in args.features.split(",")) if args.features else None
    return TrainerConfig(
        target=target,
        task=args.task,
        features=features,
        hidden=args.hidden,
        norm=args.norm,
        norm_options=norm_options_from(args.norm_options),
        activation=args.activation,
        dropout=args.dropout,
        weight_standardization=args.weight_standardization,
        skip=args.skip,
        linear_expert=args.linear_expert,
        member_momenta=member_momenta_for(
            args.member_momenta, given_norm_options(args.norm_options)
        ),
        lr_scale_min=args.lr_scale_min,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip or None,
        lr_scaling=args.lr_scaling,
        lr_reference_batch=args.lr_reference_batch,
        momentum_in_samples=args.momentum_in_samples,
        seed=args.seed,
        max_categories=args.max_categories,
        rolling_window=args.rolling_window,
        engine=args.engine,
    )


def model_name(args: argparse.Namespace) -> str:
    return str(args.model)


def build_learner(args: argparse.Namespace, config: TrainerConfig) -> IncrementalTrainer:
    """The MLP trainer, or a river baseline for ``--model river:NAME``."""
    if args.model == "mlp":
        from stream_trainer.training.trainer import IncrementalTrainer

        return IncrementalTrainer(config)
    if args.model.startswith("river:"):
        from stream_trainer.training.river_baselines import RiverLearner

        return RiverLearner(args.model[len("river:") :], config)
    valid = ", ".join(["mlp", *("river:" + m for m in RIVER_MODELS)])
    raise ConfigError(f"unknown model {args.model!r}; valid: {valid}")
