"""The incremental trainer: prequential test-then-train on variable-size mini-batches.

A step takes whatever records arrived (1 or 500) and, in this order:

1. **checks** every record: value types (:func:`stream_trainer.records.check_values`), feature kinds
   (:class:`~stream_trainer.features.FeatureEncoder`) and the label
   (:mod:`stream_trainer.training.labels`); a failing record is *rejected* with a reason and never
   reaches the model;
2. **encodes** the accepted records (the feature statistics learn from the batch first; they carry no
   label, so the prequential estimate stays honest);
3. **predicts** all of them with the model in *serving* mode (``eval()``, no gradient): this is the
   prediction that is scored and, in the service, published;
4. **scores** the labelled ones (the metrics in :mod:`stream_trainer.training.metrics`);
5. **learns** from the labelled ones: new classes grow the output layer first, then one optimizer
   step on the mean loss of the batch (cross-entropy, or MSE on the standardized target), with
   optional gradient-norm clipping and learning-rate scaling with the batch size.

Records without a label are predicted only. Everything is deterministic under ``seed``: the model
init and dropout draw from torch's global generator, seeded at construction and saved in the state.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from stream_trainer.errors import ConfigError
from stream_trainer.features import FeatureEncoder, RunningStandardizer
from stream_trainer.model import StreamMLP
from stream_trainer.records import Record, RejectedRecord, RejectReason, check_values
from stream_trainer.training.config import TrainerConfig
from stream_trainer.training.labels import canonical_class, infer_task, parse_regression_target
from stream_trainer.training.metrics import ClassificationMetrics, RegressionMetrics

__all__ = ["IncrementalTrainer", "StepReport"]

STATE_VERSION = 1


@dataclass
class StepReport:
    """What one prequential step did. ``proba``/``values`` are the served predictions of
    ``accepted`` records, in order (``proba`` columns follow ``classes``)."""

    size: int
    trained: int = 0
    predicted_only: int = 0
    rejected: list[RejectedRecord] = field(default_factory=list)
    accepted: list[Record] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    proba: np.ndarray | None = None
    values: np.ndarray | None = None
    loss: float | None = None
    predict_seconds: float = 0.0
    learn_seconds: float = 0.0

    def predictions(self) -> list[Any]:
        """The served prediction of each accepted record: a class label, a float, or None."""
        if self.values is not None:
            return [float(v) for v in self.values]
        if self.proba is None or self.proba.shape[1] == 0:
            return [None] * len(self.accepted)
        return [self.classes[i] for i in self.proba.argmax(axis=1)]


def _optimizer(name: str, params: Any, config: TrainerConfig) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class IncrementalTrainer:
    """Prequential learner over flat records (see the module docstring).

    Examples
    --------
    >>> from stream_trainer.records import Record
    >>> trainer = IncrementalTrainer(TrainerConfig(target="y", hidden=(8,), seed=0))
    >>> report = trainer.step([Record({"x": float(i % 2), "y": i % 2}) for i in range(4)])
    >>> (report.trained, trainer.samples_trained, trainer.classes)
    (4, 4, ['0', '1'])
    """

    def __init__(self, config: TrainerConfig) -> None:
        if config.target is None:
            raise ConfigError("the trainer needs a target field name (config.target)")
        self.config = config
        self.target: str = config.target
        self.task: str | None = None if config.task == "auto" else config.task
        self.encoder = FeatureEncoder(
            target=config.target, features=config.features, max_categories=config.max_categories
        )
        self.classes: list[str] = []
        self.class_index: dict[str, int] = {}
        self.y_scaler = RunningStandardizer(1, clip=1e9)
        self.model: StreamMLP | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.cls_metrics = ClassificationMetrics(config.rolling_window)
        self.reg_metrics = RegressionMetrics()
        self.samples_trained = 0
        self.predicted_only = 0
        self.steps = 0
        self.rejected: Counter[str] = Counter()
        self.last_loss: float | None = None
        torch.manual_seed(config.seed)

    # ------------------------------------------------------------------ model
    def _build_model(self, in_features: int, out_features: int) -> None:
        c = self.config
        self.model = StreamMLP(
            in_features,
            out_features,
            hidden=c.hidden,
            norm=c.norm,
            norm_options={k: dict(v) for k, v in c.norm_options.items()},
            activation=c.activation,
            dropout=c.dropout,
            weight_standardization=c.weight_standardization,
        )
        self.optimizer = _optimizer(c.optimizer, self.model.parameters(), c)

    def _out_width(self) -> int:
        return 1 if self.task == "regression" else max(1, len(self.classes))

    # ------------------------------------------------------------------ checks
    def _check(self, record: Record) -> tuple[RejectReason, str] | None:
        problem = check_values(record.value, self.target)
        if problem is None:
            problem = self.encoder.check(record.value)
        return problem

    def _parse_label(self, value: Any) -> Any:
        if self.task is None:
            self.task = infer_task(value)
        if self.task == "regression":
            return parse_regression_target(value)
        return canonical_class(value)

    def screen(
        self, records: Sequence[Record], rejected: list[RejectedRecord]
    ) -> tuple[list[Record], list[Any]]:
        """Split ``records`` into accepted ones (with their parsed label or None) and rejected ones
        (appended to ``rejected`` and counted by reason)."""
        accepted: list[Record] = []
        labels: list[Any] = []
        for record in records:
            problem = self._check(record)
            label: Any = None
            if problem is None:
                raw_label = record.value.get(self.target)
                if raw_label is not None and raw_label != "":
                    parsed = self._parse_label(raw_label)
                    if isinstance(parsed, tuple):
                        problem = parsed
                    else:
                        label = parsed
            if problem is not None:
                reason, detail = problem
                rejected.append(RejectedRecord.of(record, reason, detail))
                self.rejected[reason.value] += 1
                continue
            accepted.append(record)
            labels.append(label)
        return accepted, labels

    # ------------------------------------------------------------------ verbs
    def step(self, records: Sequence[Record]) -> StepReport:
        """One prequential step: check, encode, predict, score, then learn (module docstring)."""
        report = StepReport(size=len(records))
        accepted, labels = self.screen(records, report.rejected)
        report.accepted = accepted
        self.steps += 1
        if not accepted:
            return report

        x = self.encoder.fit_transform([r.value for r in accepted])
        labelled = [i for i, y in enumerate(labels) if y is not None]
        report.trained = len(labelled)
        report.predicted_only = len(accepted) - len(labelled)
        self.predicted_only += report.predicted_only

        t0 = time.perf_counter()
        self._predict(x, report)
        report.classes = list(self.classes)
        report.predict_seconds = time.perf_counter() - t0
        if not labelled:
            return report

        idx = np.asarray(labelled)
        target: np.ndarray
        if self.task == "regression":
            y = np.asarray([labels[i] for i in labelled], dtype=np.float64)
            served = report.values[idx] if report.values is not None else np.zeros_like(y)
            self.reg_metrics.update(y, served)
            self.y_scaler.update(y[:, None])
            target = y
        else:
            for label in (labels[i] for i in labelled):
                if label not in self.class_index:
                    self.class_index[label] = len(self.classes)
                    self.classes.append(label)
            target = np.fromiter((self.class_index[labels[i]] for i in labelled), dtype=np.int64)
            self.cls_metrics.update(target, None if report.proba is None else report.proba[idx])

        t1 = time.perf_counter()
        report.loss = self._learn(x[idx] if len(idx) < len(x) else x, target)
        report.learn_seconds = time.perf_counter() - t1
        self.samples_trained += len(labelled)
        return report

    # The two hooks a learner implements: serve predictions, then learn from the labelled rows.
    def _predict(self, x: np.ndarray, report: StepReport) -> None:
        """Set ``report.proba`` (classification) or ``report.values`` (regression) for ``x``."""
        if self.model is None:
            return
        self.model.grow(in_features=x.shape[1], optimizer=self.optimizer)
        self.model.eval()
        with torch.no_grad():
            out = self.model(torch.from_numpy(x))
        if self.task == "regression":
            mean, std = self.y_scaler.mean[0], self.y_scaler.std()[0]
            report.values = out[:, 0].double().numpy() * std + mean
        else:
            report.proba = torch.softmax(out.double(), dim=1).numpy()

    def _learn(self, x_np: np.ndarray, y: np.ndarray) -> float | None:
        """One optimizer step on the labelled rows (``y``: class indices, or raw targets)."""
        if self.model is None:
            self._build_model(x_np.shape[1], self._out_width())
        assert self.model is not None and self.optimizer is not None
        self.model.grow(
            in_features=x_np.shape[1], out_features=self._out_width(), optimizer=self.optimizer
        )
        c = self.config
        x = torch.from_numpy(x_np)
        self.model.train()
        out = self.model(x)
        if self.task == "regression":
            z = torch.from_numpy(self.y_scaler.transform(y[:, None]).astype(np.float32))
            loss = nn.functional.mse_loss(out, z)
        else:
            loss = nn.functional.cross_entropy(out, torch.from_numpy(y))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        if c.lr_scaling != "none":
            ratio = x.shape[0] / c.lr_reference_batch
            factor = ratio if c.lr_scaling == "linear" else math.sqrt(ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = c.lr * factor
        self.optimizer.step()
        value = float(loss.detach())
        self.last_loss = value
        return value

    def learn_many(self, records: Sequence[Record]) -> None:
        """Learn from a batch (a prequential :meth:`step` whose report is discarded)."""
        self.step(records)

    def predict_proba_many(self, records: Sequence[Record]) -> list[dict[str, float] | None]:
        """Class probabilities per record, without learning anything (feature stats untouched)."""
        if self.task == "regression":
            raise ConfigError("predict_proba_many is for classification; use predict_many")
        x = self._encode_readonly(records)
        if x is None or self.model is None:
            return [None] * len(records)
        self.model.eval()
        with torch.no_grad():
            proba = torch.softmax(self.model(x).double(), dim=1).numpy()
        return [dict(zip(self.classes, map(float, row), strict=False)) for row in proba]

    def predict_many(self, records: Sequence[Record]) -> list[Any]:
        """Served predictions (class label or float) without learning anything."""
        x = self._encode_readonly(records)
        if x is None or self.model is None:
            return [None] * len(records)
        self.model.eval()
        with torch.no_grad():
            out = self.model(x)
        if self.task == "regression":
            mean, std = self.y_scaler.mean[0], self.y_scaler.std()[0]
            return [float(v) * std + mean for v in out[:, 0]]
        return [self.classes[i] if i < len(self.classes) else None for i in out.argmax(1).tolist()]

    def _encode_readonly(self, records: Sequence[Record]) -> torch.Tensor | None:
        for record in records:
            problem = self._check(record)
            if problem is not None:
                raise ConfigError(f"cannot predict a bad record ({problem[0].value}: {problem[1]})")
        if self.model is None:
            return None
        state = self.encoder.state()
        x = self.encoder.fit_transform([r.value for r in records])
        self.encoder = FeatureEncoder.from_state(state)  # predicting must not move the statistics
        return torch.from_numpy(x[:, : self.model.in_features])

    # ------------------------------------------------------------------ reporting
    def metrics(self) -> dict[str, float]:
        """Prequential metrics so far (classification or regression keys)."""
        if self.task == "regression":
            return self.reg_metrics.report()
        return self.cls_metrics.report()

    def norm_snapshot(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Running mean and variance of every stateful norm layer (for drift telemetry)."""
        if self.model is None:
            return {}
        snap = {}
        for name, layer in self.model.norm_layers():
            moments = layer.running_moments()
            if moments is not None:
                mean, var = moments
                snap[name] = (
                    mean.detach().double().numpy().copy(),
                    var.detach().double().numpy().copy(),
                )
        return snap

    @torch.no_grad()
    def train_serve_gap(self, records: Sequence[Record]) -> dict[str, float]:
        """Per norm layer: mean |train-mode output - serve-mode output| on ``records``.

        Measured without side effects: running statistics and counters are restored afterwards.
        """
        if self.model is None or not records:
            return {}
        x = self._encode_readonly(records)
        assert x is not None
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        rng = torch.get_rng_state()
        inputs: dict[str, torch.Tensor] = {}
        hooks = []
        for name, layer in self.model.norm_layers():
            hooks.append(
                layer.register_forward_hook(lambda m, i, o, n=name: inputs.__setitem__(n, i[0]))
            )
        try:
            self.model.eval()
            self.model(x)
            served = {n: layer(inputs[n]) for n, layer in self.model.norm_layers()}
            self.model.train()
            gaps = {}
            for name, layer in self.model.norm_layers():
                trained = layer(inputs[name])
                gaps[name] = float((trained - served[name]).abs().mean())
        finally:
            for h in hooks:
                h.remove()
            self.model.load_state_dict(saved)
            torch.set_rng_state(rng)
            self.model.eval()
        return gaps

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Model and optimizer tensors and the RNG state, flat names, for safetensors."""
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        if self.model is None or self.optimizer is None:
            return tensors
        for name, value in self.model.state_dict().items():
            tensors[f"model.{name}"] = value.detach().clone().contiguous()
        for i, param in enumerate(self.model.parameters()):
            for key, value in self.optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{i}.{key}"] = value.detach().clone().contiguous()
        return tensors

    def state_json(self) -> dict[str, Any]:
        """Everything else, as JSON: config, schema, labels, metrics, counters."""
        groups = []
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                groups.append(
                    {
                        k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in g.items()
                        if k != "params"
                    }
                )
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "task": self.task,
            "classes": self.classes,
            "encoder": self.encoder.state(),
            "y_scaler": self.y_scaler.state(),
            "metrics": {
                "classification": self.cls_metrics.state(),
                "regression": self.reg_metrics.state(),
            },
            "samples_trained": self.samples_trained,
            "predicted_only": self.predicted_only,
            "steps": self.steps,
            "rejected": dict(self.rejected),
            "model_dims": None
            if self.model is None
            else [self.model.in_features, self.model.out_features],
            "optimizer_groups": groups,
        }

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], state: dict[str, Any]
    ) -> IncrementalTrainer:
        """Rebuild a trainer exactly as it was when ``state_tensors``/``state_json`` were taken."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"trainer state version {state.get('version')!r} is not {STATE_VERSION}"
            )
        trainer = cls(TrainerConfig.from_dict(state["config"]))
        trainer.task = state["task"]
        trainer.classes = list(state["classes"])
        trainer.class_index = {c: i for i, c in enumerate(trainer.classes)}
        trainer.encoder = FeatureEncoder.from_state(state["encoder"])
        trainer.y_scaler = RunningStandardizer.from_state(state["y_scaler"])
        trainer.cls_metrics = ClassificationMetrics.from_state(state["metrics"]["classification"])
        trainer.reg_metrics = RegressionMetrics.from_state(state["metrics"]["regression"])
        trainer.samples_trained = int(state["samples_trained"])
        trainer.predicted_only = int(state["predicted_only"])
        trainer.steps = int(state["steps"])
        trainer.rejected = Counter(state["rejected"])
        if state["model_dims"] is not None:
            trainer._build_model(*state["model_dims"])
            assert trainer.model is not None and trainer.optimizer is not None
            model_state = {
                k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")
            }
            trainer.model.load_state_dict(model_state)
            opt_state: dict[int, dict[str, torch.Tensor]] = {}
            for name, value in tensors.items():
                if name.startswith("optim."):
                    _, index, key = name.split(".", 2)
                    opt_state.setdefault(int(index), {})[key] = value
            n_params = len(list(trainer.model.parameters()))
            groups = [dict(g, params=list(range(n_params))) for g in state["optimizer_groups"]]
            for g in groups:
                if "betas" in g:
                    g["betas"] = tuple(g["betas"])
            trainer.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        return trainer
