"""River estimators backed by the incremental trainer: ``MLPClassifier`` and ``MLPRegressor``.

Each estimator is a thin adapter over one :class:`~stream_trainer.training.IncrementalTrainer`:
``learn_one(x, y)`` is one prequential step on the single record ``x`` with ``y`` under an
internal target field, ``learn_many(X, y)`` is one step on the whole frame (one optimizer step on
the batch's mean loss, as the service learns a batch), and the ``predict_*`` verbs are the
trainer's read-only ``predict_many`` / ``predict_proba_many``. The constructor arguments are
:class:`~stream_trainer.training.TrainerConfig`'s settings with the same defaults (``norm_options``
``None`` means :data:`~stream_trainer.training.config.DEFAULT_NORM_OPTIONS`, ``member_momenta``
``None`` as :func:`~stream_trainer.training.config.member_momenta_for` says).

Conventions
-----------
* Feature names are taken as ``str(name)``, in sorted order, so the order of a dict's keys never
  changes the model. NumPy scalars become Python ones. A feature named
  :data:`TARGET_FIELD` is ignored (that field holds the label).
* Values follow the trainer's record rules (:mod:`stream_trainer.records`): numbers, strings
  (categories), booleans and ``None`` (missing). A record that breaks them (NaN or infinite
  value, a list, a number where a category was seen, no feature at all) or a label of the wrong
  kind is *rejected*: ``learn_one`` learns nothing from it and counts it in :attr:`rejected` by
  reason; it never raises. Predicting such a record gives no prediction: ``{}`` from
  ``predict_proba_one`` and ``None`` from ``predict_one`` (the classifier, as before the first
  label: river's evaluation leaves it unscored), the mean of the targets learned so far from the
  regressor (``0.0`` before any).
* A missing label teaches nothing: ``None``, or NaN in a ``pandas.Series`` (pandas' marker for a
  missing value; a NaN given to ``learn_one`` is a bad label). In a DataFrame a NaN cell is a
  missing feature, left out of the record.
* Class labels may be any hashable value the trainer accepts (strings, integers, booleans,
  integral floats; NumPy scalars included); predictions return the first label object seen for
  each class.
* Pickling goes through the trainer's own persisted state (safetensors bytes for the tensors,
  JSON for the rest): no torch module or closure is pickled, and a restored estimator predicts
  and learns exactly as the original would.

Examples
--------
>>> from river import datasets, evaluate, linear_model, metrics, preprocessing
>>> from stream_trainer.river import MLPClassifier
>>> dataset = datasets.Phishing()
>>> for model in (
...     preprocessing.StandardScaler() | linear_model.LogisticRegression(),
...     MLPClassifier(seed=0),
... ):
...     print(evaluate.progressive_val_score(dataset, model, metrics.Accuracy()))
Accuracy: 89.28%
Accuracy: 89.75%
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.torch
from river import base
from river.base.typing import ClfTarget

from stream_trainer.checkpoints.validation import MAX_STATE_DEPTH, load_json
from stream_trainer.errors import CheckpointError
from stream_trainer.records import DEFAULT_MAX_ABS_VALUE, DEFAULT_MAX_STRING_LENGTH, Record
from stream_trainer.training.config import (
    DEFAULT_NORM_OPTIONS,
    SCREENING_SETTINGS,
    TrainerConfig,
    member_momenta_for,
)
from stream_trainer.training.labels import canonical_class
from stream_trainer.training.state_validation import restore_trainer
from stream_trainer.training.trainer import IncrementalTrainer

if TYPE_CHECKING:  # pandas is needed only by the *_many verbs, whose callers have it
    import pandas as pd

__all__ = ["TARGET_FIELD", "MLPClassifier", "MLPRegressor"]

TARGET_FIELD = "__stream_trainer_target__"
"""The record field that carries the label inside the adapter."""

_PICKLE_VERSION = 1


def _native(value: Any) -> Any:
    """A NumPy scalar as the Python scalar the record checks expect; anything else unchanged."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def _features(x: Mapping[Any, Any]) -> dict[str, Any]:
    """The record value of features ``x``: names as ``str``, in sorted order, NumPy scalars as
    Python ones, the target field left out. A fresh dict: the caller's ``x`` is never kept."""
    items = sorted(((str(name), _native(v)) for name, v in x.items()), key=lambda item: item[0])
    return {name: value for name, value in items if name != TARGET_FIELD}


def _frame_rows(X: pd.DataFrame) -> list[dict[str, Any]]:
    """Feature dicts of a frame's rows, NaN cells (pandas' missing value) left out."""
    columns = list(X.columns)
    rows = []
    for values in X.itertuples(index=False, name=None):
        rows.append(
            _features({c: v for c, v in zip(columns, values, strict=True) if not _is_missing(v)})
        )
    return rows


def _series_labels(y: pd.Series) -> list[Any]:
    """The labels of a series, NaN (pandas' missing value) as ``None``."""
    return [None if _is_missing(v) else v for v in y]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value))


# One "Parameters" section for both estimators (they take the same settings).
_PARAMETERS = """\
Parameters
----------
hidden
    Width of each hidden layer.
norm
    Normalization of every hidden layer, or one name per layer.
norm_options
    Options per norm name; ``None``: the trainer's defaults.
activation
    ``gelu``, ``relu``, ``silu`` or ``tanh``.
dropout
    Dropout probability after each hidden block.
weight_standardization
    Standardize the hidden weights (``None``: the norm's default).
skip
    A linear shortcut from the inputs to the {output}.
linear_expert
    Serve the MLP mixed with an online linear {linear}, weighted by recent errors.
member_momenta
    One MLP member per norm momentum, all trained, served as a mixture weighted by recent
    errors (``()``: one member; ``None``: the trainer's default, or one member when
    ``norm_options`` sets a momentum).
optimizer
    ``adam``, ``adamw`` or ``sgd``.
lr
    Learning rate.
weight_decay
    Weight decay.
grad_clip
    Global gradient-norm clip (``None``: off).
lr_scaling
    Scale ``lr`` with the labelled rows of a step: ``none``, ``linear`` or ``sqrt``.
lr_reference_batch
    The batch size at which the scaling factor is 1.
lr_scale_min
    Lower bound of the scaling factor.
lr_decay_samples
    Decay ``lr`` as ``1 / sqrt(1 + t / lr_decay_samples)`` (``None``: constant).
lr_decay_floor
    Lower bound of the decay factor.
momentum_in_samples
    Count Adam's ``beta1`` per ``lr_reference_batch`` samples instead of per step.
seed
    Seed of the model's initialization and dropout.
max_categories
    Categories kept per string feature (the rest share one column).
features
    Feature names to use (``None``: every feature).
max_abs_value, max_string_length, max_new_features_per_record, max_features, max_classes
    The screening limits (:class:`~stream_trainer.training.TrainerConfig`): a record beyond one
    is not learned and is counted in :attr:`rejected`.
engine
    ``"auto"``: the compiled step engine where it covers the model; ``"torch"``: autograd (the
    two agree to float rounding).
"""


class _TrainerAdapter:
    """The part of the two estimators that is the same: configuration, records, pickling."""

    _task: str

    def __init__(
        self,
        hidden: tuple[int, ...] = (64, 64),
        norm: str | tuple[str, ...] = "ema_batch",
        norm_options: dict[str, dict[str, Any]] | None = None,
        activation: str = "gelu",
        dropout: float = 0.0,
        weight_standardization: bool | None = None,
        skip: bool = True,
        linear_expert: bool = True,
        member_momenta: tuple[float, ...] | None = None,
        optimizer: str = "adam",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        grad_clip: float | None = 5.0,
        lr_scaling: str = "sqrt",
        lr_reference_batch: int = 8,
        lr_scale_min: float = 1.0,
        lr_decay_samples: int | None = None,
        lr_decay_floor: float = 0.2,
        momentum_in_samples: bool = True,
        seed: int = 0,
        max_categories: int = 32,
        features: tuple[str, ...] | None = None,
        max_abs_value: float = DEFAULT_MAX_ABS_VALUE,
        max_string_length: int = DEFAULT_MAX_STRING_LENGTH,
        max_new_features_per_record: int = 1000,
        max_features: int = 10_000,
        max_classes: int = 1000,
        engine: str = "auto",
    ) -> None:
        self.hidden = hidden
        self.norm = norm
        self.norm_options = norm_options
        self.activation = activation
        self.dropout = dropout
        self.weight_standardization = weight_standardization
        self.skip = skip
        self.linear_expert = linear_expert
        self.member_momenta = member_momenta
        self.optimizer = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.lr_scaling = lr_scaling
        self.lr_reference_batch = lr_reference_batch
        self.lr_scale_min = lr_scale_min
        self.lr_decay_samples = lr_decay_samples
        self.lr_decay_floor = lr_decay_floor
        self.momentum_in_samples = momentum_in_samples
        self.seed = seed
        self.max_categories = max_categories
        self.features = features
        self.max_abs_value = max_abs_value
        self.max_string_length = max_string_length
        self.max_new_features_per_record = max_new_features_per_record
        self.max_features = max_features
        self.max_classes = max_classes
        self.engine = engine
        # Classifier: class label (canonical string) -> the first label object river gave for it.
        self._labels: dict[str, ClfTarget] = {}
        # Validated now (ConfigError on a bad setting), not at the first record.
        self._trainer = self._new_trainer(self._config())

    def _new_trainer(self, config: TrainerConfig) -> IncrementalTrainer:
        """The trainer behind the estimator (a subclass may put another learner of the same
        protocol there, e.g. :class:`~stream_trainer.training.river_baselines.RiverLearner`)."""
        return IncrementalTrainer(config)

    def _config(self) -> TrainerConfig:
        options = DEFAULT_NORM_OPTIONS if self.norm_options is None else self.norm_options
        return TrainerConfig(
            target=TARGET_FIELD,
            task=self._task,
            features=None if self.features is None else tuple(map(str, self.features)),
            hidden=tuple(self.hidden),
            norm=self.norm,
            norm_options={k: dict(v) for k, v in options.items()},
            activation=self.activation,
            dropout=self.dropout,
            weight_standardization=self.weight_standardization,
            skip=self.skip,
            linear_expert=self.linear_expert,
            member_momenta=member_momenta_for(self.member_momenta, self.norm_options),
            optimizer=self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            lr_scaling=self.lr_scaling,
            lr_reference_batch=self.lr_reference_batch,
            lr_scale_min=self.lr_scale_min,
            lr_decay_samples=self.lr_decay_samples,
            lr_decay_floor=self.lr_decay_floor,
            momentum_in_samples=self.momentum_in_samples,
            seed=self.seed,
            max_categories=self.max_categories,
            engine=self.engine,
            **{key: getattr(self, key) for key in SCREENING_SETTINGS},
        )

    @property
    def trainer(self) -> IncrementalTrainer:
        """The trainer this estimator drives (read it for metrics, norm statistics, state)."""
        return self._trainer

    @property
    def rejected(self) -> dict[str, int]:
        """Records rejected by the trainer's checks so far, by reason
        (:class:`~stream_trainer.records.RejectReason` values)."""
        return dict(self._trainer.rejected)

    def _learn_records(self, rows: Iterable[dict[str, Any]], labels: Iterable[Any]) -> None:
        """One trainer step on the rows whose label is not ``None`` (``y`` as river passes it)."""
        records, originals = [], []
        for value, y in zip(rows, labels, strict=True):
            if y is None:
                continue
            value[TARGET_FIELD] = _native(y)
            records.append(Record(value))
            originals.append(y)
        if not records:
            return
        report = self._trainer.step(records)
        self._remember_labels(report.accepted, dict(zip(map(id, records), originals, strict=True)))

    def _remember_labels(self, accepted: list[Record], originals: dict[int, Any]) -> None:
        """Hook for the classifier: map each new class to the label object it came from."""

    # -- pickling: through the trainer's persisted state, never its Python objects ------------
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k != "_trainer"}
        tensors = safetensors.torch.save(self._trainer.state_tensors())
        document = json.dumps(self._trainer.state_json(), sort_keys=True).encode()
        state["_trainer_state"] = (_PICKLE_VERSION, tensors, document)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        version, tensors, document = state.pop("_trainer_state")
        if version != _PICKLE_VERSION:
            msg = f"pickled estimator format {version!r} is not {_PICKLE_VERSION}"
            raise CheckpointError(msg)
        self.__dict__.update(state)
        # The trainer's state is checked as a checkpoint's is before it is applied; safetensors
        # reads a header and raw bytes, JSON is parsed bounded: nothing stored is run.
        try:
            loaded = safetensors.torch.load(tensors)
        except Exception as exc:  # the parser's own error types vary between versions
            raise CheckpointError(f"pickled estimator: tensors unreadable ({exc})") from exc
        if isinstance(document, str):  # as an estimator pickled before the bytes form holds it
            document = document.encode()
        self._trainer = restore_trainer(loaded, load_json(document, max_depth=MAX_STATE_DEPTH))


class MLPClassifier(_TrainerAdapter, base.MiniBatchClassifier):
    """Multiclass MLP classifier with batch-size-1-safe normalization, as a river estimator.

    The stream_trainer MLP (and, with ``linear_expert``, the online logistic regression served
    beside it) behind river's classifier API; see :mod:`stream_trainer.river` for the conventions
    and :class:`~stream_trainer.training.TrainerConfig` for each setting.

    {parameters}

    Examples
    --------
    >>> from stream_trainer.river import MLPClassifier
    >>> model = MLPClassifier(hidden=(8,), seed=0)
    >>> for i in range(40):
    ...     model.learn_one({"x": float(i % 2)}, i % 2 == 1)
    >>> model.predict_one({"x": 1.0}), model.predict_one({"x": 0.0})
    (True, False)
    >>> model.learn_one({"x": float("nan")}, True)  # rejected: learns nothing, never raises
    >>> model.rejected
    {'non_finite': 1}
    """

    _task = "classification"

    @property
    def _multiclass(self) -> bool:
        return True

    @classmethod
    def _unit_test_params(cls) -> Iterator[dict[str, Any]]:
        yield {"hidden": (16,), "seed": 1}
        yield {"hidden": (8, 8), "norm": "layer", "linear_expert": False, "activation": "relu"}

    def _unit_test_skips(self) -> set[str]:
        # One optimizer step on the mean loss of a mini-batch is not a loop of one step per row
        # (river opts its gradient-descent linear models out of this check for the same reason).
        return {"check_learn_many_matches_learn_one"}

    def _remember_labels(self, accepted: list[Record], originals: dict[int, Any]) -> None:
        for record in accepted:
            canonical = canonical_class(record.value[TARGET_FIELD])
            if isinstance(canonical, str):
                self._labels.setdefault(canonical, originals[id(record)])

    def _proba(self, rows: list[dict[str, Any]]) -> list[dict[ClfTarget, float]]:
        probas = self._trainer.predict_proba_many([Record(row) for row in rows])
        labels = self._labels
        return [{} if p is None else {labels.get(c, c): v for c, v in p.items()} for p in probas]

    def learn_one(self, x: dict[Any, Any], y: Any) -> None:
        self._learn_records([_features(x)], [y])

    def learn_many(self, X: pd.DataFrame, y: pd.Series) -> None:
        self._learn_records(_frame_rows(X), _series_labels(y))

    def predict_proba_one(self, x: dict[Any, Any], **kwargs: Any) -> dict[ClfTarget, float]:
        return self._proba([_features(x)])[0]

    def predict_one(self, x: dict[Any, Any], **kwargs: Any) -> ClfTarget | None:
        proba = self.predict_proba_one(x)
        return max(proba, key=proba.__getitem__) if proba else None

    def predict_proba_many(self, X: pd.DataFrame) -> pd.DataFrame:
        """Class probabilities, one column per class in the order first seen; a row with no
        prediction (rejected, or before the first label) is all NaN."""
        probas = self._proba(_frame_rows(X))
        import pandas as pd

        return pd.DataFrame(probas, index=X.index, columns=list(self._labels.values()))

    def predict_many(self, X: pd.DataFrame) -> pd.Series:
        """Predicted labels; ``None`` for a row with no prediction."""
        probas = self._proba(_frame_rows(X))
        labels = [max(p, key=p.__getitem__) if p else None for p in probas]
        import pandas as pd

        return pd.Series(labels, index=X.index, dtype=object)


class MLPRegressor(_TrainerAdapter, base.MiniBatchRegressor):
    """MLP regressor with batch-size-1-safe normalization, as a river estimator.

    The target is standardized with its running mean and variance for the loss (MSE) and the
    prediction de-standardized; see :mod:`stream_trainer.river` for the conventions and
    :class:`MLPClassifier` (same parameters) or
    :class:`~stream_trainer.training.TrainerConfig` for each setting.

    {parameters}

    Examples
    --------
    >>> from stream_trainer.river import MLPRegressor
    >>> model = MLPRegressor(hidden=(8,), seed=0)
    >>> model.predict_one({"x": 1.0})  # nothing learned yet: the prior, 0
    0.0
    >>> for i in range(300):
    ...     model.learn_one({"x": (i % 10) / 10}, 3.0 * (i % 10) / 10 + 1.0)
    >>> round(model.predict_one({"x": 0.5}), 1)
    2.5
    """

    _task = "regression"

    @classmethod
    def _unit_test_params(cls) -> Iterator[dict[str, Any]]:
        yield {"hidden": (16,), "seed": 1}
        yield {"hidden": (8, 8), "norm": "batch_renorm", "linear_expert": False}

    def _unit_test_skips(self) -> set[str]:
        # One optimizer step on the mean loss of a mini-batch is not a loop of one step per row
        # (river opts its gradient-descent linear models out of this check for the same reason).
        return {"check_learn_many_matches_learn_one"}

    def _prior(self) -> float:
        """The mean of the targets learned so far (0 before any)."""
        return float(self._trainer.y_scaler.mean[0]) if self._trainer.samples_trained else 0.0

    def _values(self, rows: list[dict[str, Any]]) -> list[float]:
        prior = self._prior()
        predictions = self._trainer.predict_many([Record(row) for row in rows])
        return [prior if v is None else float(v) for v in predictions]

    def learn_one(self, x: dict[Any, Any], y: Any) -> None:
        self._learn_records([_features(x)], [y])

    def learn_many(self, X: pd.DataFrame, y: pd.Series) -> None:
        self._learn_records(_frame_rows(X), _series_labels(y))

    def predict_one(self, x: dict[Any, Any], **kwargs: Any) -> float:
        return self._values([_features(x)])[0]

    def predict_many(self, X: pd.DataFrame) -> pd.Series:
        import pandas as pd

        return pd.Series(self._values(_frame_rows(X)), index=X.index, dtype=float)


def _document(estimator: type, output: str, linear: str) -> None:
    """Put the shared "Parameters" section into ``estimator``'s docstring (indented as it is)."""
    section = _PARAMETERS.format(output=output, linear=linear).strip("\n").replace("\n", "\n    ")
    estimator.__doc__ = (estimator.__doc__ or "").replace("{parameters}", section)


_document(MLPClassifier, "logits", "model")
_document(MLPRegressor, "output", "regression")
