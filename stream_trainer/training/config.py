"""The trainer's configuration: one frozen, validated object, closed to unknown keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stream_trainer.errors import ConfigError
from stream_trainer.records import DEFAULT_MAX_ABS_VALUE, DEFAULT_MAX_STRING_LENGTH

__all__ = [
    "DEFAULT_MEMBER_MOMENTA",
    "DEFAULT_NORM_OPTIONS",
    "ENGINES",
    "EXECUTION_SETTINGS",
    "LATER_SETTINGS",
    "LR_SCALINGS",
    "MAX_ABS_VALUE_LIMIT",
    "MAX_MEMBERS",
    "OPTIMIZERS",
    "RIVER_MODELS",
    "SCREENING_SETTINGS",
    "TASKS",
    "TrainerConfig",
    "member_momenta_for",
    "with_members_for_explicit_momentum",
]

TASKS = ("auto", "classification", "regression")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCALINGS = ("none", "linear", "sqrt")
# `--model river:NAME` (stream_trainer.training.river_baselines); here so the parser needs no torch.
RIVER_MODELS = (
    "LogisticRegression",
    "ARF",
    "HoeffdingAdaptiveTree",
    "HoeffdingTree",
    "GaussianNB",
    "LinearRegression",
)
# The running-moment norms average over about 500 samples (momentum counted in samples, see
# stream_trainer.norms) instead of their class default of 100: the served prediction is steadier.
DEFAULT_NORM_OPTIONS: Mapping[str, Mapping[str, Any]] = {
    "ema_batch": {"momentum": 0.002},
    "batch_renorm": {"momentum": 0.002},
}


# The members' norm momenta (TrainerConfig.member_momenta), chosen on bench/tuning.py's suite;
# they replace DEFAULT_NORM_OPTIONS' momentum member by member.
DEFAULT_MEMBER_MOMENTA: tuple[float, ...] = (0.002, 0.012, 0.08)


def member_momenta_for(
    member_momenta: tuple[float, ...] | None, norm_options: Mapping[str, Any] | None
) -> tuple[float, ...]:
    """The members of a configuration a user gave: ``member_momenta`` when named; else none (one
    member) when the given ``norm_options`` set a norm's ``momentum``, else
    :data:`DEFAULT_MEMBER_MOMENTA`. A momentum asked for is the one the model runs with, not one
    that the members' grid replaces."""
    if member_momenta is not None:
        return tuple(member_momenta)
    if isinstance(norm_options, Mapping) and any(
        isinstance(o, Mapping) and "momentum" in o for o in norm_options.values()
    ):
        return ()
    return DEFAULT_MEMBER_MOMENTA


def with_members_for_explicit_momentum(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a user gave (``TrainerConfig`` keyword values: flags, a TOML table, the
    environment), with ``member_momenta=()`` added where :func:`member_momenta_for` says one
    member (a momentum in ``norm_options``, no ``member_momenta``)."""
    values = dict(settings)
    if "member_momenta" not in values and not member_momenta_for(None, values.get("norm_options")):
        values["member_momenta"] = ()
    return values


# Settings added after checkpoints were first written, with the value that a saved configuration
# without them ran with. A restored state gets these values; the fingerprint leaves a setting out
# while it has this value, so a checkpoint written before the setting existed still matches a
# configuration that asks for the old behaviour (e.g. ``--no-momentum-in-samples``).
LATER_SETTINGS: Mapping[str, Any] = {
    "momentum_in_samples": False,
    "linear_expert": False,
    "member_momenta": [],
}
# At most this many members (``member_momenta``): each costs about one more model's step.
MAX_MEMBERS = 8

# The limits of the screening contract (IncrementalTrainer.screen): they decide which records are
# admitted, not the shape of the model, so they are left out of the fingerprint and a restart may
# change them (a restored trainer takes the configured ones, IncrementalTrainer.adopt_limits).
SCREENING_SETTINGS = (
    "max_abs_value",
    "max_string_length",
    "max_new_features_per_record",
    "max_features",
    "max_classes",
)
# How the step runs, not what it computes (the compiled engine or autograd, equal to rounding):
# left out of the fingerprint, and a restored trainer takes the configured value.
EXECUTION_SETTINGS = ("engine",)
ENGINES = ("auto", "torch")
# Beyond this magnitude the square of one deviation alone can overflow float64 (1.8e308).
MAX_ABS_VALUE_LIMIT = 1e150


@dataclass(frozen=True)
class TrainerConfig:
    """Everything that defines a trainer; the constructor signature *is* the configuration.

    ``skip`` adds a linear shortcut from the standardized inputs to the logits (wide & deep, see
    :class:`~stream_trainer.model.StreamMLP`). ``linear_expert`` runs an online logistic (or
    linear) regression beside the MLP and serves the two mixed by their recent errors
    (:mod:`stream_trainer.training.mixture`). ``lr_scaling`` scales the learning rate with the
    number of labelled samples ``n`` in the step: ``lr * n / lr_reference_batch`` (linear) or
    ``lr * sqrt(n / lr_reference_batch)`` (sqrt); the factor is at least ``lr_scale_min`` (1:
    batches under the reference one keep ``lr``). ``lr_decay_samples`` ``t0`` then multiplies the
    rate by ``max(lr_decay_floor, 1 / sqrt(1 + t / t0))``, ``t`` the labelled samples learned
    before this step (``None``: constant). ``momentum_in_samples`` counts Adam's (and AdamW's)
    ``beta1`` per ``lr_reference_batch`` samples instead of per step (SGD is left alone): a
    step on ``n`` labelled rows uses ``beta1 ** max(1, n / lr_reference_batch)``, so the
    gradient average spans about as many *samples* whatever the batch size (batches up to the
    reference one keep ``beta1``). ``norm_options`` maps a norm
    name to its options and, when given, replaces :data:`DEFAULT_NORM_OPTIONS` as a whole.
    ``member_momenta`` trains one MLP *member* per value, each with that momentum in every norm
    layer that takes one (replacing ``norm_options``' momentum), all on every batch, served as a
    mixture weighted by their recent errors beside the linear expert
    (:mod:`stream_trainer.training.mixture`): the norm's memory is the learner's time scale, and
    the mixture picks the one the stream rewards. ``()``, or a model whose norms take no momentum,
    trains one member. ``task="auto"`` decides on the first labelled value: strings, booleans and
    integral numbers make a classification task, other numbers a regression task.

    The screening limits (a record beyond one is rejected whole, with the reason in brackets; see
    :meth:`~stream_trainer.training.IncrementalTrainer.screen`): ``max_abs_value`` bounds the
    magnitude of every number, features and regression target (``out_of_range``; at most
    :data:`MAX_ABS_VALUE_LIMIT`, so that squares fit a float64); ``max_string_length`` the length
    of a string value, field name or class label (``too_large``); ``max_new_features_per_record``
    the features one record may add (``too_many_new_features``); ``max_features`` the input
    columns of the model, numeric features plus one-hot categories (``too_many_features`` for a
    record whose new features would pass it; once it is reached a new category of a known feature
    goes to its ``<other>`` column, or to none); ``max_classes`` the output classes
    (``too_many_classes``).
    """

    target: str | None = None
    task: str = "auto"
    features: tuple[str, ...] | None = None
    # The defaults below were chosen on river's streams and weather.csv at batch size 1 and
    # ``1:64`` against river's LogisticRegression, the members on the 21 streams of
    # bench/tuning.py; docs/decisions.md gives each choice with the command that shows it, and
    # what was tried instead.
    hidden: tuple[int, ...] = (64, 64)
    norm: str | tuple[str, ...] = "ema_batch"
    norm_options: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_NORM_OPTIONS.items()}
    )
    activation: str = "gelu"
    dropout: float = 0.0
    weight_standardization: bool | None = None
    skip: bool = True
    linear_expert: bool = True
    member_momenta: tuple[float, ...] = DEFAULT_MEMBER_MOMENTA
    optimizer: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 5.0
    lr_scaling: str = "sqrt"
    lr_reference_batch: int = 8
    lr_scale_min: float = 1.0
    lr_decay_samples: int | None = None
    lr_decay_floor: float = 0.2
    momentum_in_samples: bool = True
    seed: int = 0
    max_categories: int = 32
    rolling_window: int = 1000
    # Screening limits (SCREENING_SETTINGS, the class docstring). Defaults: DEFAULT_MAX_ABS_VALUE
    # keeps every running moment finite; strings up to 1 KiB; 1,000 new features a record admits
    # wide tables whole; 10,000 columns keep a 64-unit first layer (and its Adam moments) under
    # 8 MB; 1,000 classes keep the output layer as small.
    max_abs_value: float = DEFAULT_MAX_ABS_VALUE
    max_string_length: int = DEFAULT_MAX_STRING_LENGTH
    max_new_features_per_record: int = 1000
    max_features: int = 10_000
    max_classes: int = 1000
    # ``auto``: the compiled engine (stream_trainer.engine) wherever it covers the model;
    # ``torch``: always autograd. The two agree to float rounding (EXECUTION_SETTINGS).
    engine: str = "auto"

    def __post_init__(self) -> None:
        checks = [
            (self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}"),
            (
                self.optimizer in OPTIMIZERS,
                f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}",
            ),
            (
                self.lr_scaling in LR_SCALINGS,
                f"lr_scaling must be one of {LR_SCALINGS}, got {self.lr_scaling!r}",
            ),
            (self.lr > 0, f"lr must be > 0, got {self.lr!r}"),
            (self.engine in ENGINES, f"engine must be one of {ENGINES}, got {self.engine!r}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}"),
            (
                self.grad_clip is None or self.grad_clip > 0,
                f"grad_clip must be > 0 or None, got {self.grad_clip!r}",
            ),
            (
                self.lr_reference_batch >= 1,
                f"lr_reference_batch must be >= 1, got {self.lr_reference_batch!r}",
            ),
            (self.lr_scale_min >= 0, f"lr_scale_min must be >= 0, got {self.lr_scale_min!r}"),
            (
                self.lr_decay_samples is None or self.lr_decay_samples >= 1,
                f"lr_decay_samples must be >= 1 or None, got {self.lr_decay_samples!r}",
            ),
            (
                0.0 <= self.lr_decay_floor <= 1.0,
                f"lr_decay_floor must be in [0, 1], got {self.lr_decay_floor!r}",
            ),
            (self.max_categories >= 1, f"max_categories must be >= 1, got {self.max_categories!r}"),
            (self.rolling_window >= 1, f"rolling_window must be >= 1, got {self.rolling_window!r}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}"),
            (
                0.0 < self.max_abs_value <= MAX_ABS_VALUE_LIMIT,
                f"max_abs_value must be in (0, {MAX_ABS_VALUE_LIMIT:g}], "
                f"got {self.max_abs_value!r}",
            ),
            *(
                (getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)!r}")
                for name in SCREENING_SETTINGS[1:]
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if not isinstance(self.norm, str):
            object.__setattr__(self, "norm", tuple(self.norm))
        if self.features is not None:
            object.__setattr__(self, "features", tuple(self.features))
        self._check_members()
        self._check_model()

    def _check_members(self) -> None:
        from stream_trainer.norms._options import check_momentum

        if isinstance(self.member_momenta, str | bytes) or not isinstance(
            self.member_momenta, tuple | list
        ):
            raise ConfigError(
                f"member_momenta must be a list of momenta, got {self.member_momenta!r}"
            )
        momenta = tuple(check_momentum("member_momenta", m) for m in self.member_momenta)
        if len(momenta) > MAX_MEMBERS:
            raise ConfigError(f"member_momenta lists {len(momenta)} members, at most {MAX_MEMBERS}")
        if len(set(momenta)) != len(momenta):
            raise ConfigError(f"member_momenta repeats a value: {list(momenta)!r}")
        object.__setattr__(self, "member_momenta", momenta)

    def norm_names(self) -> list[str]:
        """The norm of each hidden layer."""
        return [self.norm] * len(self.hidden) if isinstance(self.norm, str) else list(self.norm)

    def member_norm_options(self) -> list[dict[str, dict[str, Any]]]:
        """The norm options of each member (``member_momenta``; one member without it)."""
        from stream_trainer.norms import norm_accepts_option

        base = {k: dict(v) for k, v in self.norm_options.items()}
        with_momentum = [n for n in dict.fromkeys(self.norm_names())]
        with_momentum = [n for n in with_momentum if norm_accepts_option(n, "momentum")]
        if not self.member_momenta or not with_momentum:
            return [base]
        members = []
        for momentum in self.member_momenta:
            options = {k: dict(v) for k, v in base.items()}
            for name in with_momentum:
                options.setdefault(name, {})["momentum"] = momentum
            members.append(options)
        return members

    def _check_model(self) -> None:
        """Validate the model settings now, not when the first record arrives: norm names (an
        unknown one lists the valid ones), one norm per hidden layer, activation, norm options
        (keys and values, by building each hidden layer's norm once)."""
        from stream_trainer.model.mlp import ACTIVATIONS
        from stream_trainer.norms import build_norm, registered_norm_names

        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden sizes must be positive, got {list(self.hidden)!r}")
        if self.activation not in ACTIVATIONS:
            msg = f"unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}"
            raise ConfigError(msg)
        names = self.norm_names()
        if len(names) != len(self.hidden):
            msg = (
                f"norm lists {len(names)} names for {len(self.hidden)} hidden layers: "
                f"norm={list(names)!r}, hidden={list(self.hidden)!r}"
            )
            raise ConfigError(msg)
        if not isinstance(self.norm_options, Mapping) or not all(
            isinstance(v, Mapping) for v in self.norm_options.values()
        ):
            msg = f"norm_options must map norm names to option dicts, got {self.norm_options!r}"
            raise ConfigError(msg)
        valid = registered_norm_names()
        for name in [*names, *self.norm_options]:
            if name not in valid:
                raise ConfigError(f"unknown norm {name!r}; valid: {', '.join(valid)}")
        for size, name in zip(self.hidden, names, strict=True):
            build_norm(name, size, **dict(self.norm_options.get(name, {})))
        for name, options in self.norm_options.items():
            if name not in names:  # options for a norm this model does not use: still check them
                build_norm(name, self.hidden[0], **dict(options))
        for member in self.member_norm_options()[1:]:
            for name in dict.fromkeys(names):
                build_norm(name, self.hidden[0], **member.get(name, {}))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["hidden"] = list(self.hidden)
        data["norm"] = self.norm if isinstance(self.norm, str) else list(self.norm)
        data["features"] = list(self.features) if self.features is not None else None
        data["norm_options"] = {k: dict(v) for k, v in self.norm_options.items()}
        data["member_momenta"] = list(self.member_momenta)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown trainer settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values = dict(data)
        for key in ("hidden", "features", "member_momenta"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        if isinstance(values.get("norm"), list):
            values["norm"] = tuple(values["norm"])
        return cls(**values)

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of the settings that shape the model's tensors (a setting
        of :data:`LATER_SETTINGS` left out while it has its old value, the screening limits of
        :data:`SCREENING_SETTINGS` and the :data:`EXECUTION_SETTINGS` always)."""
        data = self.to_dict()
        for key, old in LATER_SETTINGS.items():
            if data.get(key) == old:
                del data[key]
        for key in (*SCREENING_SETTINGS, *EXECUTION_SETTINGS):
            del data[key]
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
