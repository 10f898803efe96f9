"""The incremental trainer: prequential test-then-train on variable-size mini-batches.

A step takes whatever records arrived (1 or 500) and, in this order, **screens** them
(:meth:`IncrementalTrainer.screen`, the one screening contract: a record is accepted whole or
rejected whole with a reason before anything is learned, and what is accepted can be learned,
checkpointed and restored), **encodes** the accepted ones (feature statistics learn first; they
see no label), **predicts** them in serving mode with the MLP members (one, or one per
``member_momenta``) and, with ``linear_expert``, the online linear model
(:mod:`stream_trainer.model.linear_expert`), serving their mixture
(:mod:`stream_trainer.training.mixture`), **scores** the labelled ones (records before the first
model are *unscored*, as in river's protocol) and **learns** from them: one optimizer step on the
batch-mean loss of each member (cross-entropy, or MSE on the standardized target) with the
learning-rate and
momentum conventions of :class:`~stream_trainer.training.TrainerConfig`, then the linear expert's
per-record Adagrad steps. Records without a label are predicted only.

Deterministic under ``seed``: model init, new output rows and dropout draw from the trainer's own
torch generator state (saved as ``rng.torch`` in :meth:`IncrementalTrainer.state_tensors`), so two
trainers in one process never disturb each other and a restored one continues exactly.

The step has two forms, equal to float rounding: the compiled engine
(:mod:`stream_trainer.engine`, ``engine="auto"``, wherever it covers the model) and autograd (any
norm, optimizer and device, and the distributed hooks; ``engine="torch"`` forces it). The phases
hand each other values (:class:`Served`), so the distributed trainer composes the same phases.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from stream_trainer.engine import StepEngine
from stream_trainer.engine.compiled import CompiledEngine
from stream_trainer.engine.kernels import softmax_mix
from stream_trainer.errors import ConfigError
from stream_trainer.features import FeatureEncoder, RunningStandardizer
from stream_trainer.features.encoder import SchemaPlan
from stream_trainer.model import StreamMLP
from stream_trainer.model.linear_expert import LinearExpert
from stream_trainer.norms import MomentReducer
from stream_trainer.records import Record, RejectedRecord, RejectReason
from stream_trainer.training.config import (
    EXECUTION_SETTINGS,
    SCREENING_SETTINGS,
    TrainerConfig,
)
from stream_trainer.training.labels import infer_task, parse_label
from stream_trainer.training.metrics import (
    ClassificationMetrics,
    RegressionMetrics,
    score_served_classes,
    score_served_values,
)
from stream_trainer.training.mixture import (
    ExpertMixture,
    classification_losses,
    expert_names,
    regression_losses,
    softmax64,
)

__all__ = ["GradientSync", "IncrementalTrainer", "Served", "StepReport"]

GradientSync = Callable[[list[nn.Parameter], int], int]
"""Distributed hook ``(parameters, local_rows) -> global_rows``: called after ``backward`` and
before clipping; it replaces every ``p.grad`` with the sample-count-weighted mean over the replicas
and returns the global number of labelled rows (used by ``lr_scaling``)."""


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
    inputs: np.ndarray | None = None
    """The encoded rows of ``accepted`` (float32, one column per encoder column at this step)."""
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


@dataclass
class Served:
    """What the predict phase hands to scoring and learning: each expert's output on the step's
    rows, ``(M, N, C)`` (class probabilities, or standardized values with ``C = 1``; the MLP
    members' first, then the linear expert's; ``None`` with a single expert or without a model),
    and, where the training forward was also the serving one (a model whose output does not
    depend on the mode), each member's forward with its graph on the rows to learn."""

    experts: np.ndarray | None = None
    graph: list[torch.Tensor] | None = None

    def take_graph(self) -> list[torch.Tensor] | None:
        """The graph, dropped from here: the learner must be able to release it (a model that
        grows has to forget it, or autograd keeps the old shapes of the grown parameters)."""
        graph, self.graph = self.graph, None
        return graph


def _optimizer(name: str, params: Any, config: TrainerConfig) -> torch.optim.Optimizer:
    """SGD (momentum 0.9), Adam or AdamW; the fused implementation where torch has one (it is
    element-wise, hence deterministic, and at batch size 1 several times cheaper than the
    per-tensor loop), else the ``foreach`` one. The update rule is the same either way."""
    params = list(params)
    kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    cls: type[torch.optim.Optimizer]
    if name == "sgd":
        cls, kwargs["momentum"] = torch.optim.SGD, 0.9
    elif name == "adam":
        cls = torch.optim.Adam
    else:
        cls = torch.optim.AdamW
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
        return cls(params, foreach=True, **kwargs)


# torch's default, which _optimizer keeps. With momentum_in_samples, a step that stands for
# ``s`` reference batches decays Adam's first moment by ``beta1 ** s`` (beta2 is left alone).
# Adam only: its update is normalized by the second moment, so a shorter average changes the
# direction's noise, not the step size; SGD's momentum would also shrink the effective rate
# ``lr / (1 - momentum)``.
_ADAM_BETA1 = 0.9


def _clip_grad_norm_(grads: list[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` (same formula: scale every gradient by
    ``min(1, max_norm / (||g||_2 + 1e-6))``, ``||g||`` over all of them) in three foreach kernels,
    without the per-call bookkeeping of the public function."""
    if not grads:
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))


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
        self._set_encoder_limits()
        self.classes: list[str] = []
        self.class_index: dict[str, int] = {}
        self.y_scaler = RunningStandardizer(1, clip=1e9)
        # The MLP members (config.member_momenta) and their optimizers, built on the first
        # labelled batch: all or none exist.
        self.members: list[StreamMLP] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self._member_options = config.member_norm_options()
        # The online linear model served in a mixture with the members (config.linear_expert; see
        # stream_trainer.training.mixture); built with the model.
        self.expert: LinearExpert | None = None
        self.mixture = ExpertMixture(expert_names(len(self._member_options), config.linear_expert))
        self.cls_metrics = ClassificationMetrics(config.rolling_window)
        self.reg_metrics = RegressionMetrics()
        self.samples_trained = 0
        self.predicted_only = 0
        # Accepted records since the last labelled one, in arrival order (not checkpointed: it
        # tells the service that labels stopped arriving, see its warning and metric).
        self.records_since_label = 0
        self.steps = 0
        self.rejected: Counter[str] = Counter()
        self.last_loss: float | None = None
        self._rng_state: torch.Tensor = torch.Generator().manual_seed(config.seed).get_state()
        # The compiled engine over the model (config.engine; stream_trainer.engine), built at
        # first use and again after the model grows; None: the autograd path.
        self._engine: StepEngine | None = None
        self._engine_tried = False
        # -- distributed hooks (set by stream_trainer.distributed; None: a single process) -------
        self.gradient_sync: GradientSync | None = None
        self.moment_reducer: MomentReducer | None = None  # given to every norm layer on build
        # -- end of distributed hooks --------------------------------------------------------

    @property
    def model(self) -> StreamMLP | None:
        """The first MLP member (the only one by default), or ``None`` before the first label."""
        return self.members[0] if self.members else None

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The first member's optimizer."""
        return self.optimizers[0] if self.optimizers else None

    @property
    def expert_names(self) -> tuple[str, ...]:
        """The experts of the served mixture, in the order of :class:`Served`'s outputs."""
        return self.mixture.names

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run the body with the trainer's generator state in torch's global CPU generator (what
        ``nn.init`` and ``nn.Dropout`` draw from), then save it and restore the global one."""
        saved = torch.get_rng_state()
        torch.set_rng_state(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(saved)

    # ------------------------------------------------------------------ start-up
    def warm_up(self) -> None:
        """Pay the first step's one-time costs now, before a caller starts a clock: the configured
        optimizer's lazy imports (a torch optimizer's first ``add_param_group`` imports
        ``torch._dynamo``) and, with the compiled engine, loading its kernels (from numba's disk
        cache, or compiling them once), by two steps of a throwaway trainer of the same
        configuration. Changes no state of this trainer."""
        _optimizer(self.config.optimizer, [torch.zeros(1, requires_grad=True)], self.config)
        if self.config.engine == "torch":
            return
        probe = IncrementalTrainer(dataclasses.replace(self.config, target="y", features=None))
        rows = [Record({"x": float(i), "y": i % 2}) for i in range(4)]
        for batch in (rows[:2], rows[2:]):
            probe.step(batch)

    # ------------------------------------------------------------------ model
    def _build_model(self, in_features: int, out_features: int) -> None:
        """Build every member (initialised in order from the trainer's generator), its optimizer
        and the linear expert."""
        c = self.config
        with self._own_rng():
            self.members = [
                self._make_mlp(in_features, out_features, options)
                for options in self._member_options
            ]
        self.optimizers = [_optimizer(c.optimizer, m.parameters(), c) for m in self.members]
        self._engine, self._engine_tried = None, False  # built at first use (after a restore)
        if c.linear_expert:
            regression = self.task == "regression"
            self.expert = LinearExpert(in_features, out_features, regression=regression)
        if self.moment_reducer is not None:  # distributed hook: synchronized batch statistics
            for member in self.members:
                for _, layer in member.norm_layers():
                    layer.moment_reducer = self.moment_reducer

    def grow(self, in_features: int, out_features: int | None = None) -> None:
        """Grow every member to ``in_features`` inputs (and ``out_features`` outputs); new output
        rows draw from the trainer's generator, member by member."""
        with self._own_rng():
            for member, optimizer in zip(self.members, self.optimizers, strict=True):
                member.grow(in_features=in_features, out_features=out_features, optimizer=optimizer)

    def _make_mlp(
        self, in_features: int, out_features: int, norm_options: dict[str, dict[str, Any]]
    ) -> StreamMLP:
        c = self.config
        return StreamMLP(
            in_features,
            out_features,
            hidden=c.hidden,
            norm=c.norm,
            norm_options=norm_options,
            activation=c.activation,
            dropout=c.dropout,
            weight_standardization=c.weight_standardization,
            skip=c.skip,
        )

    def _out_width(self) -> int:
        return 1 if self.task == "regression" else max(1, len(self.classes))

    # ------------------------------------------------------------------ checks
    def _set_encoder_limits(self) -> None:
        c, encoder = self.config, self.encoder
        encoder.max_features = c.max_features
        encoder.max_abs_value = c.max_abs_value
        encoder.max_string_length = c.max_string_length

    def adopt_limits(self, config: TrainerConfig) -> None:
        """Take the screening limits (:data:`SCREENING_SETTINGS`) and the execution settings
        (:data:`EXECUTION_SETTINGS`) of ``config``, keeping every other setting: a restored
        trainer screens by the limits configured now and runs on the engine configured now."""
        names = (*SCREENING_SETTINGS, *EXECUTION_SETTINGS)
        limits = {name: getattr(config, name) for name in names}
        self.config = dataclasses.replace(self.config, **limits)
        self._set_encoder_limits()

    def _check(self, record: Record) -> tuple[RejectReason, str] | None:
        return self.encoder.check_record(record.value)

    def _reject(
        self, record: Record, problem: tuple[RejectReason, str], rejected: list[RejectedRecord]
    ) -> None:
        reason, detail = problem
        rejected.append(RejectedRecord.of(record, reason, detail))
        self.rejected[reason.value] += 1

    def screen(
        self, records: Sequence[Record], rejected: list[RejectedRecord]
    ) -> tuple[list[Record], list[Any]]:
        """Split ``records`` into accepted ones (with their parsed label or None) and rejected ones
        (appended to ``rejected`` and counted by reason), changing nothing else.

        The screening contract, in this order, before any record of the batch is learned:

        1. each record on its own (:meth:`FeatureEncoder.screen_record`): field names are strings,
           every feature a finite scalar (``wrong_type``, ``non_finite``) within ``max_abs_value``
           (``out_of_range``), strings and names within ``max_string_length`` (``too_large``), at
           least one feature (``no_features``), each of the kind the encoder knows it by
           (``wrong_type``);
        2. the kind of each feature new in this batch, by majority over the batch
           (:meth:`FeatureEncoder.decide_kinds`);
        3. in arrival order: the label (``bad_label``, ``too_large``, ``out_of_range`` for a
           regression target; the task, while unknown, is inferred from the first record accepted
           with a label), a new class past ``max_classes`` (``too_many_classes``), then the new
           columns (:class:`~stream_trainer.features.encoder.SchemaPlan`: ``wrong_type`` against
           the batch's kinds, ``too_many_new_features``, ``too_many_features``).

        What is accepted is learnable, and the state after learning it survives JSON unchanged:
        numbers keep the running moments finite, every name and category is a ``str``.
        """
        c, encoder = self.config, self.encoder
        passed: list[tuple[Record, bool]] = []
        for record, outcome in zip(
            records, encoder.screen([record.value for record in records]), strict=True
        ):
            if isinstance(outcome, tuple):
                self._reject(record, outcome, rejected)
            else:
                passed.append((record, outcome))
        plan: SchemaPlan | None = None
        fresh = [record.value for record, is_fresh in passed if is_fresh]
        if fresh:
            kinds = encoder.decide_kinds(fresh)
            plan = SchemaPlan(encoder, kinds, c.max_new_features_per_record)
        task, target, class_index = self.task, self.target, self.class_index
        if plan is None and task is not None and task != "regression":
            # No record adds a column: when the labels are all str or all int (or missing) and
            # each distinct one is a known class, the loop below accepts every record with it
            raws = [record.value.get(target) for record, _ in passed]
            label_types = set(map(type, raws))
            if label_types <= {str, type(None)} or label_types <= {int, type(None)}:
                by_raw: dict[Any, Any] = {}
                for raw in set(raws):
                    if raw is None or raw == "":
                        by_raw[raw] = None
                        continue
                    known = parse_label(
                        raw, task, max_abs_value=c.max_abs_value, max_length=c.max_string_length
                    )
                    if isinstance(known, tuple) or known not in class_index:
                        break
                    by_raw[raw] = known
                else:
                    return [record for record, _ in passed], list(map(by_raw.__getitem__, raws))
        new_classes: dict[str, None] = {}
        accepted: list[Record] = []
        labels: list[Any] = []
        # one parse per distinct (type, value) of a scalar class label: parse_label is a function
        # of those and the task alone (a regression target is parsed each time: -0.0 == 0.0)
        parsed_labels: dict[tuple[Any, Any, str], Any] = {}
        for record, is_fresh in passed:
            raw_label = record.value.get(target)
            label: Any = None
            record_task = task
            problem: tuple[RejectReason, str] | None = None
            if raw_label is not None and raw_label != "":
                record_task = task or infer_task(raw_label)
                memo = record_task != "regression" and type(raw_label) in (str, int, float, bool)
                key = (type(raw_label), raw_label, record_task)
                parsed = parsed_labels.get(key) if memo else None
                if parsed is None:
                    parsed = parse_label(
                        raw_label,
                        record_task,
                        max_abs_value=c.max_abs_value,
                        max_length=c.max_string_length,
                    )
                    if memo:
                        parsed_labels[key] = parsed
                if isinstance(parsed, tuple):
                    problem = parsed
                else:
                    label = parsed
                    if (
                        record_task != "regression"
                        and label not in class_index
                        and label not in new_classes
                        and len(class_index) + len(new_classes) >= c.max_classes
                    ):
                        detail = f"the model has {c.max_classes} classes (max_classes)"
                        problem = RejectReason.TOO_MANY_CLASSES, f"{detail}; {label!r} is new"
            if problem is None and is_fresh:
                assert plan is not None
                problem = plan.take(record.value)
            if problem is not None:
                self._reject(record, problem, rejected)
                continue
            if label is not None:
                task = record_task
                if task != "regression" and label not in class_index:
                    new_classes[label] = None
            accepted.append(record)
            labels.append(label)
        self.task = task
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
        report.inputs = x
        labelled = [i for i, y in enumerate(labels) if y is not None]
        report.trained = len(labelled)
        report.predicted_only = len(accepted) - len(labelled)
        self.predicted_only += report.predicted_only
        if labelled:
            self.records_since_label = len(accepted) - 1 - labelled[-1]
        else:
            self.records_since_label += len(accepted)
        idx: np.ndarray | None = None  # None: every accepted record is labelled
        if len(labelled) < len(accepted):
            idx = np.asarray(labelled, dtype=np.int64)

        t0 = time.perf_counter()
        served = self.predict_encoded(x, report, idx if labelled else np.zeros(0, np.int64))
        report.classes = list(self.classes)
        report.predict_seconds = time.perf_counter() - t0
        if not labelled:
            return report

        target: np.ndarray
        if self.task == "regression":
            y = np.asarray([labels[i] for i in labelled], dtype=np.float64)
            values = report.values  # None before the model exists: unscored
            self.reg_metrics.update(y, values if idx is None or values is None else values[idx])
            self._observe_experts(served.experts, y, idx)
            self.y_scaler.update(y[:, None])
            target = y
        else:
            target = self.class_targets([labels[i] for i in labelled])
            proba = report.proba
            self.cls_metrics.update(
                target, None if proba is None else (proba if idx is None else proba[idx])
            )
            self._observe_experts(served.experts, target, idx)

        t1 = time.perf_counter()
        x_learn = x if idx is None else x[idx]
        report.loss = self.learn_encoded(x_learn, target, served.take_graph())
        self._learn_expert(x_learn, target)
        report.learn_seconds = time.perf_counter() - t1
        self.samples_trained += len(labelled)
        return report

    def add_classes(self, labels: Iterable[Any]) -> None:
        """Give each label not seen yet the next class index, in order."""
        class_index, classes = self.class_index, self.classes
        for label in labels:
            if label not in class_index:
                class_index[label] = len(classes)
                classes.append(label)

    def class_targets(self, labels: Sequence[Any]) -> np.ndarray:
        """The class indices of ``labels`` (parsed), new classes added first."""
        self.add_classes(labels)
        return np.fromiter(map(self.class_index.__getitem__, labels), np.int64, len(labels))

    # The phases a learner implements: serve predictions, then learn from the labelled rows.
    def predict_encoded(
        self, x: np.ndarray, report: StepReport, learn_rows: np.ndarray | None
    ) -> Served:
        """Set ``report.proba`` (classification) or ``report.values`` (regression) for the
        encoded rows ``x`` and return what scoring and learning need (:class:`Served`).

        ``learn_rows``: the rows that will be learned (``None``: all). For a model whose forward
        does not depend on the mode, the autograd path keeps each member's forward graph on
        those rows for :meth:`learn_encoded`: same numbers, one pass fewer.
        """
        model = self.model
        if model is None:
            return Served()
        if x.shape[1] != model.in_features:
            self.grow(x.shape[1])
            # the linear expert grows when it learns: until then its logits ignore the new
            # columns, which is what their zero weights would give
        engine = self._engine_for(x)
        if engine is not None:
            return Served(self._set_served(x, engine.serve(x), report))
        inputs = torch.from_numpy(x)
        outs, graphs = [], []
        keep_graph = model.mode_independent and (learn_rows is None or learn_rows.shape[0] > 0)
        for member in self.members:
            if keep_graph:
                member.set_training(True)
                out = member(inputs)
                graphs.append(out if learn_rows is None else out[torch.from_numpy(learn_rows)])
                out = out.detach()
            else:
                member.set_training(False)
                with torch.no_grad():
                    out = member(inputs)
            outs.append(out.numpy())
        served = self._set_served(x, np.stack(outs), report)
        return Served(served, graphs if keep_graph else None)

    def _set_served(self, x: np.ndarray, out: np.ndarray, report: StepReport) -> np.ndarray | None:
        """Put the served predictions for the members' outputs ``out`` (``(K, N, C)``) on ``x``
        into ``report``; return each expert's output (for :meth:`_observe_experts`)."""
        served, experts = self._combine(x, out)
        if self.task == "regression":
            report.values = served
        else:
            report.proba = served
        return experts

    def _combine(self, x: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The served output (class probabilities, or de-standardized values) for the members'
        outputs ``out`` (``(K, N, C)``) on inputs ``x``, mixed with each other and the linear
        expert's (:mod:`stream_trainer.training.mixture`); and the experts' own outputs (see
        :class:`Served`), or ``None`` with a single expert."""
        expert = self.expert
        members = out.shape[0]
        experts: np.ndarray | None = None
        if self.task == "regression":
            z = out[0, :, :1].astype(np.float64)
            if expert is not None or members > 1:
                parts = [out[k, :, :1].astype(np.float64) for k in range(members)]
                if expert is not None:
                    parts.append(expert.logits(x))
                experts = np.stack(parts)
                z = self.mixture.mix(list(experts))
            mean, std = self.y_scaler.mean[0], self.y_scaler.std()[0]
            return z[:, 0] * std + mean, experts
        if expert is None and members == 1:
            return softmax64(out[0]), None
        _, rows, width = out.shape
        logits = np.empty((members + (expert is not None), rows, width))
        logits[:members] = out
        if expert is not None:
            logits[members] = expert.logits(x)
        probs = np.empty_like(logits)
        proba = np.empty((rows, width))
        softmax_mix(logits, self.mixture.weights_view(), probs, proba)
        return proba, probs

    def _expert_losses(self, outputs: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per labelled row, each expert's loss (columns in the order of
        :attr:`expert_names`); ``y`` class indices or raw targets,
        standardized with the target statistics the prediction used."""
        if self.task != "regression":
            return classification_losses(outputs, y)
        losses = np.empty((y.shape[0], len(outputs)))
        z = self.y_scaler.transform(y[:, None])[:, 0].astype(np.float64)
        for k, out in enumerate(outputs):
            losses[:, k] = regression_losses(out[:, 0], z)
        return losses

    def _observe_experts(
        self,
        outputs: np.ndarray | None,
        y: np.ndarray,
        idx: np.ndarray | None,
    ) -> None:
        """Score each expert (``outputs``, see :class:`Served`) on the labelled rows (``idx`` into
        the step's rows; ``None``: all) before they learn from them, and fold the losses into the
        mixture's weights."""
        if outputs is None:
            return
        if idx is not None:
            outputs = outputs[:, idx]
        self.mixture.observe(self._expert_losses(outputs, y).sum(axis=0), y.shape[0])

    def _engine_for(self, x: np.ndarray) -> StepEngine | None:
        """The compiled engine when the configuration asks for it and it covers this model and
        input (single process only), else ``None``; built on first use and after growth."""
        if (
            self.config.engine == "torch"
            or self.gradient_sync is not None
            or self.moment_reducer is not None
        ):
            return None
        engine = self._engine
        if engine is not None and not engine.current():
            engine, self._engine_tried = None, False
        if engine is None and not self._engine_tried and self.members:
            self._engine_tried = True
            engine = CompiledEngine.build(self.members, self.optimizers)
        self._engine = engine
        return engine if engine is not None and engine.applies(x) else None

    def learn_encoded(
        self, x_np: np.ndarray, y: np.ndarray, graph: list[torch.Tensor] | None = None
    ) -> float | None:
        """One optimizer step on the labelled rows (``y``: class indices, or raw targets).

        The loss is the batch mean (cross-entropy, or MSE on the target standardized with the
        running moments of every target seen so far, this batch included). Gradients are clipped
        to ``grad_clip`` in global L2 norm; with ``lr_scaling`` the step uses
        ``lr * n / lr_reference_batch`` (linear) or ``lr * sqrt(n / lr_reference_batch)`` (sqrt)
        for a batch of ``n`` labelled records, times ``max(lr_decay_floor, 1 / sqrt(1 + t /
        lr_decay_samples))`` after ``t`` labelled samples (the decay needs no state of its own:
        ``t`` is ``samples_trained``). With ``momentum_in_samples`` the first-moment decay is
        ``0.9 ** max(1, n / lr_reference_batch)``. Exactly one optimizer step per call.
        ``graph``: each member's training forward on these rows from :meth:`predict_encoded`, if
        any. Every member takes its step; the loss returned (and kept in ``last_loss``) is the
        members' losses averaged with their mixture weights.
        """
        if not self.members:
            self._build_model(x_np.shape[1], self._out_width())
        model = self.members[0]
        width = self._out_width()
        if width != model.out_features or x_np.shape[1] != model.in_features:
            self.grow(x_np.shape[1], width)
            graph = None  # the output layer changed: the served logits lack the new classes
        c = self.config
        engine = self._engine_for(x_np)
        if engine is not None:
            regression = self.task == "regression"
            target = self.y_scaler.transform(y[:, None]).astype(x_np.dtype) if regression else y
            self._schedule(self.optimizers, y.shape[0])
            losses = engine.learn(x_np, target, regression=regression, max_norm=c.grad_clip)
        else:
            losses = np.array(
                [
                    self._learn_member(k, x_np, y, None if graph is None else graph[k])
                    for k in range(len(self.members))
                ]
            )
        value = self._member_mean(losses)
        self.last_loss = value
        return value

    def _member_mean(self, values: np.ndarray) -> float:
        """``values`` (one per member) averaged with the members' mixture weights."""
        if values.shape[0] == 1:
            return float(values[0])
        w = self.mixture.weights_view().tolist()[: values.shape[0]]
        return sum(a * b for a, b in zip(w, values.tolist(), strict=True)) / sum(w)

    def _learn_member(
        self, k: int, x_np: np.ndarray, y: np.ndarray, graph: torch.Tensor | None
    ) -> float:
        """Member ``k``'s autograd step (see :meth:`learn_encoded`); its loss."""
        c = self.config
        model, optimizer = self.members[k], self.optimizers[k]
        if graph is not None:
            out = graph
        else:
            model.set_training(True)
            inputs = torch.from_numpy(x_np)
            if model.uses_rng:
                with self._own_rng():
                    out = model(inputs)
            else:
                out = model(inputs)
        if self.task == "regression":
            z = torch.from_numpy(self.y_scaler.transform(y[:, None]).astype(np.float32))
            loss = nn.functional.mse_loss(out, z)
        else:
            loss = nn.functional.cross_entropy(out, torch.from_numpy(y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        rows = y.shape[0]
        params = list(model.parameters())
        if self.gradient_sync is not None:  # distributed hook: weighted all-reduce of the gradients
            rows = self.gradient_sync(params, rows)
        if c.grad_clip is not None:
            _clip_grad_norm_([p.grad for p in params if p.grad is not None], c.grad_clip)
        self._schedule([optimizer], rows)
        optimizer.step()
        return loss.item()

    def _learn_expert(self, x: np.ndarray, y: np.ndarray) -> None:
        """The linear expert's steps on the labelled rows (``y`` as for :meth:`learn_encoded`; the
        regression target standardized with the same, updated, statistics)."""
        expert = self.expert
        if expert is None:
            return
        expert.grow(x.shape[1], self._out_width())
        if self.task == "regression":
            expert.learn(x, self.y_scaler.transform(y[:, None])[:, 0])
        else:
            expert.learn(x, y)

    def _schedule(self, optimizers: list[torch.optim.Optimizer], rows: int) -> None:
        """Set this step's learning rate and Adam's beta1 in the optimizers' groups, for ``rows``
        labelled samples (see :meth:`learn_encoded`)."""
        c = self.config
        if c.lr_scaling != "none" or c.lr_decay_samples is not None:
            lr = c.lr
            if c.lr_scaling != "none":
                ratio = rows / c.lr_reference_batch
                lr *= max(c.lr_scale_min, ratio if c.lr_scaling == "linear" else math.sqrt(ratio))
            if c.lr_decay_samples is not None:
                decay = 1.0 / math.sqrt(1.0 + self.samples_trained / c.lr_decay_samples)
                lr *= max(c.lr_decay_floor, decay)
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
        if c.momentum_in_samples and c.optimizer != "sgd":
            beta1 = _ADAM_BETA1 ** max(1.0, rows / c.lr_reference_batch)
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["betas"] = (beta1, group["betas"][1])

    def learn_delayed(
        self, x: np.ndarray, labels: Sequence[Any], served: Sequence[np.ndarray | None]
    ) -> tuple[StepReport, dict[int, tuple[RejectReason, str]]]:
        """Learn rows encoded by an earlier :meth:`step` (its ``StepReport.inputs``) from labels
        that arrived since, scoring the prediction each row was served then: delayed labels.

        ``x`` is ``(n, w)`` with ``w`` at most the encoder's width now; the columns added since
        are zero (those features were absent when the row was encoded). ``served[i]`` is what
        row ``i`` was served: class probabilities whose columns are the classes as they were then
        (a class learned since is a miss, river's rule), a one-element array holding the served
        value (regression), or ``None`` when no model existed (unscored). The labels are screened
        as a step screens them (``bad_label``, ``too_large``, ``out_of_range``,
        ``too_many_classes``); a refused row is returned by index with its reason and nothing of
        it is learned. The feature statistics are not touched (they learned the rows at serving).
        One optimizer step on the accepted rows, like :meth:`step`.
        """
        report = StepReport(size=len(labels))
        accepted, parsed, problems = self._screen_labels(labels)
        self.steps += 1
        if not accepted:
            return report, problems
        n = len(accepted)
        rows = x[np.asarray(accepted, dtype=np.int64)]
        width = max(self.encoder.n_columns, rows.shape[1])
        if rows.shape[1] < width:
            rows = np.pad(rows, ((0, 0), (0, width - rows.shape[1])))
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        target: np.ndarray
        if self.task == "regression":
            target = np.asarray(parsed, dtype=np.float64)
            score_served_values(self.reg_metrics, target, [served[i] for i in accepted])
            self.y_scaler.update(target[:, None])
        else:
            target = self.class_targets(parsed)
            score_served_classes(self.cls_metrics, target, [served[i] for i in accepted])
        t0 = time.perf_counter()
        report.loss = self.learn_encoded(rows, target)
        self._learn_expert(rows, target)
        report.learn_seconds = time.perf_counter() - t0
        report.trained = n
        self.samples_trained += n
        self.records_since_label = 0
        return report, problems

    def _screen_labels(
        self, labels: Sequence[Any]
    ) -> tuple[list[int], list[Any], dict[int, tuple[RejectReason, str]]]:
        """The indices of the acceptable labels, their parsed values, and the refused ones with
        their reason (step 3 of :meth:`screen`, for labels alone). Sets the task when unknown."""
        c = self.config
        task = self.task
        new_classes: dict[str | float, None] = {}
        accepted: list[int] = []
        parsed: list[Any] = []
        problems: dict[int, tuple[RejectReason, str]] = {}
        for i, raw in enumerate(labels):
            if raw is None or raw == "":
                problems[i] = (RejectReason.BAD_LABEL, "the label is missing")
                continue
            row_task = task or infer_task(raw)
            label = parse_label(
                raw, row_task, max_abs_value=c.max_abs_value, max_length=c.max_string_length
            )
            if isinstance(label, tuple):
                problems[i] = label
                continue
            is_new = row_task != "regression" and label not in self.class_index
            if is_new and label not in new_classes:
                if len(self.class_index) + len(new_classes) >= c.max_classes:
                    detail = f"the model has {c.max_classes} classes (max_classes)"
                    problems[i] = (RejectReason.TOO_MANY_CLASSES, f"{detail}; {label!r} is new")
                    continue
                new_classes[label] = None
            task = row_task
            accepted.append(i)
            parsed.append(label)
        self.task = task
        return accepted, parsed, problems

    def learn_many(self, records: Sequence[Record]) -> None:
        """Learn from a batch (a prequential :meth:`step` whose report is discarded)."""
        self.step(records)

    def predict_proba_many(self, records: Sequence[Record]) -> list[dict[str, float] | None]:
        """Class probabilities per record (``None`` for a record that fails the checks, or before
        the model exists), without learning anything: feature statistics, norm statistics and
        metrics are untouched."""
        if self.task == "regression":
            raise ConfigError("predict_proba_many is for classification; use predict_many")
        proba, ok = self._serve(records)
        result: list[dict[str, float] | None] = [None] * len(records)
        if proba is not None:
            for pos, row in zip(ok, proba, strict=True):
                result[pos] = dict(zip(self.classes, map(float, row), strict=False))
        return result

    def predict_many(self, records: Sequence[Record]) -> list[Any]:
        """Served predictions (class label or float; ``None`` for a record that fails the checks,
        or before the model exists), without learning anything (see :meth:`predict_proba_many`)."""
        served, ok = self._serve(records)
        result: list[Any] = [None] * len(records)
        if served is None:
            return result
        if self.task == "regression":
            values: list[Any] = [float(v) for v in served]
        else:
            values = [
                self.classes[i] if i < len(self.classes) else None
                for i in served.argmax(1).tolist()
            ]
        for pos, value in zip(ok, values, strict=True):
            result[pos] = value
        return result

    def _serve_inputs(self, records: Sequence[Record]) -> tuple[torch.Tensor | None, list[int]]:
        """Encode the records that pass the checks with the current statistics (read-only:
        :meth:`FeatureEncoder.transform`); return the inputs and their positions in ``records``."""
        ok = [i for i, r in enumerate(records) if self._check(r) is None]
        if self.model is None or not ok:
            return None, ok
        x = self.encoder.transform([records[i].value for i in ok])
        return torch.from_numpy(x[:, : self.model.in_features]), ok

    def _serve(self, records: Sequence[Record]) -> tuple[np.ndarray | None, list[int]]:
        """Served output of the records that pass the checks (class probabilities, or values;
        the experts mixed, see :meth:`_combine`) and their positions."""
        x, ok = self._serve_inputs(records)
        if x is None or self.model is None:
            return None, ok
        if x.shape[1] < self.model.in_features:  # features the encoder has not seen: zeros
            x = nn.functional.pad(x, (0, self.model.in_features - x.shape[1]))
        outs = []
        with torch.no_grad():
            for member in self.members:
                member.set_training(False)
                outs.append(member(x).numpy())
        return self._combine(x.numpy(), np.stack(outs))[0], ok

    # ------------------------------------------------------------------ reporting
    def metrics(self) -> dict[str, float]:
        """Prequential metrics so far (classification or regression keys)."""
        if self.task == "regression":
            return self.reg_metrics.report()
        return self.cls_metrics.report()

    def expert_weights(self) -> dict[str, float]:
        """The mixture weight of each expert (:attr:`expert_names`), or ``{}`` with a single
        expert (the one MLP alone is served)."""
        return self._per_expert(self.mixture.weights())

    def expert_losses(self) -> dict[str, float]:
        """Each expert's discounted recent loss :math:`L_k` (errors over about the last thousand
        labelled records, :mod:`~stream_trainer.training.mixture`), or ``{}`` with a single
        expert."""
        return self._per_expert(self.mixture.losses)

    def _per_expert(self, values: np.ndarray) -> dict[str, float]:
        names = self.mixture.names
        return {} if len(names) == 1 else dict(zip(names, values.tolist(), strict=True))

    def _named_members(self) -> list[tuple[str, StreamMLP]]:
        """``(prefix, member)``: ``""`` for a single member, else ``"mlp0/"``, ``"mlp1/"``..."""
        if len(self.members) == 1:
            return [("", self.members[0])]
        return [(f"{name}/", m) for name, m in zip(self.expert_names, self.members, strict=False)]

    @property
    def unscored(self) -> int:
        """Labelled samples that had no prediction (no model yet), so entered no metric."""
        return self.cls_metrics.unscored + self.reg_metrics.unscored

    def norm_snapshot(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Running mean and variance of every stateful norm layer (for drift telemetry), named
        ``prefix + layer`` (:meth:`_named_members`)."""
        snap = {}
        for prefix, member in self._named_members() if self.members else []:
            for name, layer in member.norm_layers():
                moments = layer.running_moments()
                if moments is not None:
                    mean, var = moments
                    snap[prefix + name] = (
                        mean.detach().double().numpy().copy(),
                        var.detach().double().numpy().copy(),
                    )
        return snap

    @torch.no_grad()
    def train_serve_gap(self, records: Sequence[Record]) -> dict[str, float]:
        """Per norm layer (named as in :meth:`norm_snapshot`): mean |train-mode output -
        serve-mode output| on ``records``.

        Measured without side effects: running statistics and counters are restored afterwards.
        """
        if self.model is None or not records:
            return {}
        x, _ = self._serve_inputs(records)
        if x is None:
            return {}
        gaps = {}
        for prefix, member in self._named_members():
            for name, gap in _train_serve_gap(member, x).items():
                gaps[prefix + name] = gap
        return gaps

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Model and optimizer tensors and the RNG state, flat names, for safetensors
        (:func:`stream_trainer.training.state.trainer_tensors`)."""
        from stream_trainer.training.state import trainer_tensors

        return trainer_tensors(self)

    def state_json(self) -> dict[str, Any]:
        """Everything else, as JSON: config, schema, labels, metrics, counters
        (:func:`stream_trainer.training.state.trainer_json`)."""
        from stream_trainer.training.state import trainer_json

        return trainer_json(self)

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], state: dict[str, Any]
    ) -> IncrementalTrainer:
        """Rebuild a trainer exactly as it was when ``state_tensors``/``state_json`` were taken,
        an older format upgraded first (:func:`stream_trainer.training.state.restore_trainer`)."""
        from stream_trainer.training.state import restore_trainer

        return restore_trainer(cls, tensors, state)


@torch.no_grad()
def _train_serve_gap(model: StreamMLP, x: torch.Tensor) -> dict[str, float]:
    """Per norm layer of ``model``: mean |train-mode output - serve-mode output| on ``x``, with
    its state and torch's generator restored afterwards."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, layer in model.norm_layers():
        hooks.append(
            layer.register_forward_hook(lambda m, i, o, n=name: inputs.__setitem__(n, i[0]))
        )
    try:
        model.eval()
        model(x[:, : model.in_features])
        served = {n: layer(inputs[n]) for n, layer in model.norm_layers()}
        model.train()
        gaps = {}
        for name, layer in model.norm_layers():
            trained = layer(inputs[name])
            gaps[name] = float((trained - served[name]).abs().mean())
    finally:
        for h in hooks:
            h.remove()
        model.load_state_dict(saved)
        torch.set_rng_state(rng)
        model.eval()
    return gaps
