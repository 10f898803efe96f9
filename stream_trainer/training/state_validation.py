"""Structural validation of a stored trainer state, before any of it is allocated or applied.

:meth:`IncrementalTrainer.from_state` trusts its input: it indexes keys, builds a model of the
stored dimensions and loads tensors into it. A checkpoint that passed its checksum can still hold
a state that is wrong (a key removed, a tensor of another shape, ``model_dims`` of two billion,
NaN weights): :func:`validate_trainer_state` checks every piece against the layout that
:meth:`~IncrementalTrainer.state_json` and :meth:`~IncrementalTrainer.state_tensors` write, and
:func:`restore_trainer` applies a state only after it passed.

What is checked, in this order (the first failure raises
:class:`~stream_trainer.checkpoints.CheckpointInvalidError`):

1. every number in the state is finite and every integer fits in 64 bits;
2. the configuration: sizes bounded (hidden widths, rolling window) *before* it is built, then
   built as :meth:`~IncrementalTrainer.from_state` builds it, and, when the manifest gives one,
   its fingerprint equal to the manifest's;
3. task, classes, feature encoder (kinds, slots, columns in range, running moments), target
   scaler, metrics, counters, mixture and optimizer groups: keys, types and ranges;
4. ``model_dims`` within :data:`MAX_MODEL_DIM` and consistent with the encoder's columns and the
   classes; the model is then built on PyTorch's ``meta`` device (shapes only, no memory) and
   every stored tensor must match its name, dtype and shape exactly; the optimizer state of each
   parameter has the parameter's shape, the linear expert the model's width;
5. every floating-point tensor is finite, running variances and sample counters are not negative,
   and the RNG state is one that torch's generator accepts.

A state that passes can be applied: the allocations it implies are those of the stored tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final, NoReturn

import torch

from stream_trainer.checkpoints.validation import CheckpointInvalidError
from stream_trainer.errors import CheckpointError
from stream_trainer.training.config import TrainerConfig
from stream_trainer.training.metrics import RegressionMetrics
from stream_trainer.training.mixture import expert_names
from stream_trainer.training.state import SUPPORTED_VERSIONS, member_prefix, upgrade_config
from stream_trainer.training.trainer import IncrementalTrainer, _optimizer

__all__ = [
    "MAX_CLASSES",
    "MAX_HIDDEN",
    "MAX_MEAN",
    "MAX_MODEL_DIM",
    "MAX_SUM",
    "MAX_WINDOW",
    "restore_trainer",
    "validate_trainer_state",
]

MAX_MODEL_DIM: Final = 1 << 24
"""Largest input width (encoded feature columns) or output width a stored model may have."""
MAX_CLASSES: Final = 1 << 20
"""Most class labels a stored state may list."""
MAX_HIDDEN: Final = 1 << 16
"""Widest hidden layer (and most hidden layers: 64) a stored configuration may ask for."""
MAX_WINDOW: Final = 1 << 24
"""Longest rolling-accuracy window a stored state may ask for (it is allocated)."""
MAX_MEAN: Final = 1e140
"""Largest magnitude of a stored running mean. The running-moment update multiplies
``delta ** 2`` by a count of up to ``2 ** 63`` before dividing, so a larger mean could overflow
the statistics at the next record."""
MAX_SUM: Final = 1e300
"""Largest stored sum (``m2``, metric sums, mixture losses): one more term keeps it finite."""
_INT_LIMIT = 1 << 63
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")
_EXPERT_TENSORS = ("weight", "bias", "sum_sq_weight", "sum_sq_bias")


def restore_trainer(
    tensors: Mapping[str, torch.Tensor], state: Any, *, fingerprint: str | None = None
) -> IncrementalTrainer:
    """:func:`validate_trainer_state`, then :meth:`IncrementalTrainer.from_state`.

    Raises only :class:`~stream_trainer.errors.CheckpointError` subclasses: ``from_state`` is
    not written against hostile input, so anything it still raises after the validation means
    this state cannot be used (reason ``restore``).
    """
    validate_trainer_state(tensors, state, fingerprint=fingerprint)
    try:
        return IncrementalTrainer.from_state(dict(tensors), state)
    except CheckpointError:
        raise
    except Exception as exc:  # any failure to apply a validated state rejects the version
        msg = f"trainer state passed validation but cannot be applied: {exc!r}"
        raise CheckpointInvalidError(msg, reason="restore") from exc


def validate_trainer_state(
    tensors: Mapping[str, torch.Tensor], state: Any, *, fingerprint: str | None = None
) -> None:
    """Check ``state`` (``state_json``) and ``tensors`` (``state_tensors``) against each other
    and the trainer's layout (module docstring); ``fingerprint``: the manifest's
    ``config_fingerprint``, which the stored configuration must reproduce.

    Raises :class:`~stream_trainer.checkpoints.CheckpointInvalidError` and nothing else: an
    unexpected error while checking (a value no check foresaw) rejects the state too.
    """
    try:
        _validate(tensors, state, fingerprint)
    except CheckpointError:
        raise
    except Exception as exc:  # a check met a value it did not foresee: still a rejection
        _fail(f"unreadable ({exc!r})")


def _validate(tensors: Mapping[str, torch.Tensor], state: Any, fingerprint: str | None) -> None:
    _check_numbers(state)
    state = _dict(state, "trainer state")
    version = state.get("version")
    if version not in SUPPORTED_VERSIONS:
        _fail(f"trainer state version {version!r} is not one of {list(SUPPORTED_VERSIONS)}")
    config = _config(state, version, fingerprint)
    task = state.get("task")
    if task not in (None, "classification", "regression"):
        _fail(f"task {task!r} is not classification, regression or null")
    if config.task != "auto" and task not in (None, config.task):
        _fail(f"task {task!r} differs from the configured task {config.task!r}")
    classes = _list(state.get("classes"), "classes", MAX_CLASSES)
    if not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        _fail("classes must be distinct strings")
    n_columns = _encoder(_dict(state.get("encoder"), "encoder"))
    _standardizer(_dict(state.get("y_scaler"), "y_scaler"), "y_scaler", columns=1)
    metrics = _dict(state.get("metrics"), "metrics")
    _classification_metrics(_dict(metrics.get("classification"), "classification metrics"))
    _regression_metrics(_dict(metrics.get("regression"), "regression metrics"))
    for name in ("samples_trained", "predicted_only", "steps"):
        _count(state.get(name), name)
    for reason, n in _dict(state.get("rejected"), "rejected").items():
        _count(n, f"rejected[{reason!r}]")
    if "mixture" in state:
        mixture = _dict(state["mixture"], "mixture")
        losses = mixture.get("losses")
        names = list(expert_names(len(config.member_norm_options()), config.linear_expert))
        stored = list(mixture.get("experts") or [])
        if stored != names and not (stored == ["mlp", "linear"] and names == ["mlp"]):
            _fail(f"mixture experts {stored[:10]!r} are not {names}")
        if not isinstance(losses, list) or len(losses) != len(stored):
            _fail(f"mixture losses must be {len(stored)} numbers")
        for loss in losses:
            _number(loss, "mixture loss", minimum=0.0, maximum=MAX_SUM)
    dims = state.get("model_dims")
    groups = _list(state.get("optimizer_groups"), "optimizer_groups", 1)
    if dims is None:
        extra = sorted(name for name in tensors if name != "rng.torch")
        if extra or groups:
            _fail(f"no model_dims, yet tensors {extra[:5]} or optimizer groups are stored")
    else:
        in_features, out_features = _dims(dims, task, classes, n_columns)
        _model_tensors(tensors, config, in_features, out_features)
        if len(groups) != 1:
            _fail(f"a model needs 1 optimizer group, the state has {len(groups)}")
        _optimizer_group(_dict(groups[0], "optimizer group"), config)
    _rng(tensors)


# ---------------------------------------------------------------------- pieces


def _config(state: dict[str, Any], version: int, fingerprint: str | None) -> TrainerConfig:
    raw = dict(_dict(state.get("config"), "config"))
    hidden = raw.get("hidden")
    if not isinstance(hidden, list) or not 1 <= len(hidden) <= 64:
        _fail(f"config hidden must list 1 to 64 layer widths, got {str(hidden)[:80]}")
    for width in hidden:
        _count(width, "hidden width", low=1, high=MAX_HIDDEN)
    _count(raw.get("rolling_window"), "rolling_window", low=1, high=MAX_WINDOW)
    raw = upgrade_config(raw, version)  # as from_state upgrades it
    _config_types(raw)
    try:
        config = TrainerConfig.from_dict(raw)
    except Exception as exc:  # a hostile config may fail anywhere in the constructor's checks
        _fail(f"stored configuration is invalid ({exc})")
    if fingerprint is not None and config.fingerprint() != fingerprint:
        _fail("stored configuration does not match the manifest's config fingerprint")
    return config


def _config_types(raw: dict[str, Any]) -> None:
    """Each stored setting has the JSON type of its default (``to_dict`` writes tuples as
    lists); a setting whose default is ``None`` holds ``None``, a scalar or a list of strings."""
    defaults = TrainerConfig(target="y").to_dict()
    for key, value in raw.items():
        default = defaults.get(key, None)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int | float):  # None where the setting allows it (grad_clip)
            ok = value is None or (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and (isinstance(value, int) or not isinstance(default, int))
            )
        elif isinstance(default, str):
            ok = isinstance(value, str | list) if key == "norm" else isinstance(value, str)
        elif isinstance(default, list | dict):
            ok = isinstance(value, type(default))
        else:  # default None: an optional setting
            ok = value is None or isinstance(value, str | int | float)
            ok = ok or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        if not ok or (key == "target" and not isinstance(value, str)):
            _fail(f"setting {key} has the wrong type ({type(value).__name__})")


def _encoder(encoder: dict[str, Any]) -> int:
    n_columns = _count(encoder.get("n_columns"), "encoder n_columns", high=MAX_MODEL_DIM)
    _count(encoder.get("max_categories"), "encoder max_categories", low=1)
    if not isinstance(encoder.get("target"), str | None):
        _fail("encoder target must be a string or null")
    features = encoder.get("features")
    if features is not None and not (
        isinstance(features, list) and all(isinstance(f, str) for f in features)
    ):
        _fail("encoder features must be a list of strings or null")
    kinds = _dict(encoder.get("kinds"), "encoder kinds")
    if any(kind not in ("num", "cat") for kind in kinds.values()):
        _fail("encoder kinds must be 'num' or 'cat'")
    numeric = _dict(encoder.get("numeric"), "encoder numeric")
    slots = sorted(_count(slot, "numeric slot") for slot in numeric.values())
    if slots != list(range(len(numeric))):
        _fail("encoder numeric slots must number 0..n-1, once each")
    columns = _list(encoder.get("numeric_columns"), "encoder numeric_columns", MAX_MODEL_DIM)
    if len(columns) != len(numeric):
        _fail("encoder numeric_columns must have one column per numeric feature")
    used = [_count(j, "numeric column", high=max(0, n_columns - 1)) for j in columns]
    for name, cats in _dict(encoder.get("categories"), "encoder categories").items():
        for j in _dict(cats, f"categories of {name!r}").values():
            used.append(_count(j, "category column", high=max(0, n_columns - 1)))
    if len(used) != len(set(used)) or len(used) != n_columns:
        _fail(f"encoder columns must be 0..{n_columns - 1}, each used once")
    if set(kinds) != set(numeric) | set(encoder["categories"]):
        _fail("encoder kinds must list exactly its numeric and categorical features")
    _standardizer(_dict(encoder.get("scaler"), "encoder scaler"), "scaler", columns=len(numeric))
    return n_columns


def _standardizer(scaler: dict[str, Any], what: str, *, columns: int) -> None:
    _number(scaler.get("clip"), f"{what} clip", minimum=0.0, maximum=1e9)
    for key, low, high in (
        ("count", 0.0, 2.0**63),
        ("mean", -MAX_MEAN, MAX_MEAN),
        ("m2", 0.0, MAX_SUM),
    ):
        values = _list(scaler.get(key), f"{what} {key}", MAX_MODEL_DIM)
        if len(values) != columns:
            _fail(f"{what} {key} has {len(values)} values for {columns} columns")
        for value in values:
            _number(value, f"{what} {key}", minimum=low, maximum=high)


def _classification_metrics(metrics: dict[str, Any]) -> None:
    window = _count(metrics.get("window"), "metrics window", low=1, high=MAX_WINDOW)
    n = _count(metrics.get("n"), "metrics n")
    _count(metrics.get("correct"), "metrics correct", high=n)
    _count(metrics.get("unscored", 0), "metrics unscored")
    _number(metrics.get("log_loss_sum"), "metrics log_loss_sum", minimum=0.0, maximum=MAX_SUM)
    confusion = _list(metrics.get("confusion"), "confusion", MAX_CLASSES)
    for row in confusion:
        if len(_list(row, "confusion row", len(confusion))) != len(confusion):
            _fail("the confusion matrix must be square")
        for cell in row:
            _count(cell, "confusion cell")
    for hit in _list(metrics.get("recent_hits"), "recent_hits", window):
        _count(hit, "recent hit", high=1)


def _regression_metrics(metrics: dict[str, Any]) -> None:
    known = set(RegressionMetrics().__dict__)
    if not set(metrics) <= known or not {"n", "abs_sum", "sq_sum", "y_mean", "y_m2"} <= set(
        metrics
    ):
        _fail(f"regression metrics must have the keys {sorted(known)}, got {sorted(metrics)}")
    _count(metrics["n"], "regression n")
    _count(metrics.get("unscored", 0), "regression unscored")
    for key in ("abs_sum", "sq_sum", "y_m2"):
        _number(metrics[key], f"regression {key}", minimum=0.0, maximum=MAX_SUM)
    _number(metrics["y_mean"], "regression y_mean", minimum=-MAX_MEAN, maximum=MAX_MEAN)


def _dims(dims: Any, task: Any, classes: list[Any], n_columns: int) -> tuple[int, int]:
    if not isinstance(dims, list) or len(dims) != 2:
        _fail(f"model_dims must be [in_features, out_features], got {str(dims)[:80]}")
    in_features = _count(dims[0], "model in_features", low=1, high=MAX_MODEL_DIM)
    out_features = _count(dims[1], "model out_features", low=1, high=MAX_MODEL_DIM)
    if in_features > n_columns:
        _fail(f"model has {in_features} inputs but the encoder only {n_columns} columns")
    width = 1 if task == "regression" else max(1, len(classes))
    if task is None or out_features != width:
        _fail(f"model has {out_features} outputs for task {task!r} with {len(classes)} classes")
    return in_features, out_features


def _model_tensors(
    tensors: Mapping[str, torch.Tensor], config: TrainerConfig, in_features: int, out: int
) -> None:
    """Every stored tensor against the members built on the meta device (no memory)."""
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    trainer = IncrementalTrainer(config)
    for k, options in enumerate(config.member_norm_options()):
        with torch.device("meta"):
            model = trainer._make_mlp(in_features, out, options)
        expected.update(_member_tensors(tensors, model, member_prefix(k), config))
    if config.linear_expert:
        weight = tensors.get("expert.weight")
        k, d = tuple(weight.shape) if weight is not None and weight.dim() == 2 else (-1, -1)
        if k != out or not 0 <= d <= in_features:
            _fail(f"linear expert weight of shape {k, d} for a model of {in_features} x {out}")
        expected["expert.weight"] = ((k, d), torch.float64)
        expected["expert.sum_sq_weight"] = ((k, d), torch.float64)
        expected["expert.bias"] = ((k,), torch.float64)
        expected["expert.sum_sq_bias"] = ((k,), torch.float64)
    expected["rng.torch"] = (tuple(torch.get_rng_state().shape), torch.uint8)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        _fail(f"tensors missing: {missing[:5]}", reason="tensors")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        _fail(f"unexpected tensors: {unknown[:5]}", reason="tensors")
    for name, tensor in tensors.items():
        shape, dtype = expected[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            got = (tuple(tensor.shape), str(tensor.dtype))
            _fail(f"tensor {name}: {got}, expected {(shape, str(dtype))}", reason="tensors")
        _tensor_values(name, tensor)


def _member_tensors(
    tensors: Mapping[str, torch.Tensor], model: torch.nn.Module, prefix: str, config: TrainerConfig
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The names, shapes and dtypes one member's tensors must have under ``prefix``."""
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        f"{prefix}model.{name}": (tuple(value.shape), value.dtype)
        for name, value in model.state_dict().items()
    }
    for index, param in enumerate(model.parameters()):
        shape = tuple(param.shape)
        if config.optimizer == "sgd":
            keys: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
                "momentum_buffer": (shape, param.dtype)
            }
        else:
            keys = {key: (shape, param.dtype) for key in _ADAM_STATE[1:]}
            keys["step"] = ((), torch.float32)
        head = f"{prefix}optim.{index}."
        present = [key for key in keys if head + key in tensors]
        if present and len(present) != len(keys):
            _fail(f"optimizer state of {head[:-1]} is incomplete ({sorted(present)})")
        expected.update({head + key: spec for key, spec in keys.items() if present})
    return expected


def _tensor_values(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point():
        if not bool(torch.isfinite(tensor).all()):
            _fail(f"tensor {name} holds NaN or infinite values", reason="tensors")
        nonnegative = name.endswith(("running_var", "exp_avg_sq", ".step")) or name.startswith(
            "expert.sum_sq_"
        )
    else:
        nonnegative = name.startswith("model.") or ".model." in name
    if nonnegative and tensor.numel() and bool((tensor < 0).any()):
        _fail(f"tensor {name} holds negative values", reason="tensors")


def _optimizer_group(group: dict[str, Any], config: TrainerConfig) -> None:
    fresh = _optimizer(config.optimizer, [torch.nn.Parameter(torch.zeros(1))], config)
    reference = {k: v for k, v in fresh.param_groups[0].items() if k != "params"}
    # The hyperparameters (numbers) are read at every step; flags torch fills in by itself.
    needed = [
        k
        for k, v in reference.items()
        if isinstance(v, int | float | tuple | list) and not isinstance(v, bool)
    ]
    missing = [k for k in needed if k not in group]
    if missing:
        _fail(f"optimizer group lacks {missing}")
    for key, value in group.items():
        if key == "params":
            _fail("optimizer group must not list params")
        ref = reference.get(key)
        if isinstance(ref, bool) or (ref is None and key in reference):
            if not isinstance(value, bool | None):
                _fail(f"optimizer {key} must be a boolean or null, got {value!r}")
        elif isinstance(ref, int | float):
            _number(value, f"optimizer {key}", minimum=0.0)
        elif isinstance(ref, tuple | list):
            if not isinstance(value, list) or len(value) != len(ref):
                _fail(f"optimizer {key} must be {len(ref)} numbers, got {value!r}")
            for item in value:
                _number(item, f"optimizer {key}", minimum=0.0)
        elif not isinstance(value, str | int | float | bool | None):
            _fail(f"optimizer {key} must be a plain value, got {type(value).__name__}")
    if "lr" in group and not group["lr"] > 0:
        _fail(f"optimizer lr must be > 0, got {group['lr']!r}")
    for beta in group.get("betas") or []:
        if not 0 <= beta < 1:
            _fail(f"optimizer betas must lie in [0, 1), got {group['betas']!r}")


def _rng(tensors: Mapping[str, torch.Tensor]) -> None:
    rng = tensors.get("rng.torch")
    if rng is None:
        return
    if rng.dtype != torch.uint8 or tuple(rng.shape) != tuple(torch.get_rng_state().shape):
        _fail(f"rng.torch is {rng.dtype} {tuple(rng.shape)}, not a torch RNG state", "tensors")
    try:
        torch.Generator().set_state(rng.clone())
    except (RuntimeError, ValueError) as exc:
        _fail(f"rng.torch is not a state torch's generator accepts ({exc})", reason="tensors")


# ---------------------------------------------------------------------- values


def _check_numbers(state: Any) -> None:
    """Every number finite, every integer within 64 bits (iterative: no recursion)."""
    stack = [state]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, float) and not math.isfinite(value):
            _fail(f"the state holds a non-finite number ({value!r})")
        elif isinstance(value, int) and not -_INT_LIMIT <= value < _INT_LIMIT:
            _fail("the state holds an integer beyond 64 bits")


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(f"{what} must be an object, got {type(value).__name__}")
    return value


def _list(value: Any, what: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        _fail(f"{what} must be a list, got {type(value).__name__}")
    if len(value) > limit:
        _fail(f"{what} has {len(value)} entries, more than {limit}")
    return value


def _count(value: Any, what: str, *, low: int = 0, high: int = _INT_LIMIT - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        _fail(f"{what} must be an integer in [{low}, {high}], got {str(value)[:40]}")
    return value


def _number(value: Any, what: str, *, minimum: float = -MAX_SUM, maximum: float = MAX_SUM) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(f"{what} must be a number, got {str(value)[:40]}")
    if not minimum <= value <= maximum:  # NaN fails too
        _fail(f"{what} must be in [{minimum:g}, {maximum:g}], got {value:g}")
    return float(value)


def _fail(message: str, reason: str = "state") -> NoReturn:
    raise CheckpointInvalidError(f"invalid trainer state: {message}", reason=reason)
