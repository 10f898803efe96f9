"""Prometheus metrics of one training service, on an injected :class:`CollectorRegistry`.

Every series carries the labels ``run``, ``model`` and ``norm`` so that one Prometheus (and one
Grafana dashboard) can compare runs that differ only in their normalization layer. Names follow the
Prometheus conventions: the ``stream_trainer_`` prefix, base units (seconds, bytes, records) in the
name, ``_total`` on counters, ratios in ``[0, 1]``.

The per-batch methods take plain numbers and do no more than a few dictionary look-ups and
additions: every labelled child they touch is bound once, in the constructor or on first use.

Examples
--------
>>> from prometheus_client import CollectorRegistry
>>> registry = CollectorRegistry()
>>> metrics = ServiceMetrics(registry, run="r1", model="mlp", norm="batch_renorm",
...                          task="classification", clock=lambda: 100.0)
>>> metrics.observe_step(batch_size=8, trained=6, predicted_only=2, predict_seconds=0.001,
...                      learn_seconds=0.004, loss=0.69)
>>> labels = {"run": "r1", "model": "mlp", "norm": "batch_renorm"}
>>> registry.get_sample_value("stream_trainer_records_trained_total", labels)
6.0
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from stream_trainer import __version__
from stream_trainer.checkpoints.validation import REJECT_REASONS
from stream_trainer.errors import ConfigError
from stream_trainer.records import RejectReason

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "CLASSIFICATION_METRICS",
    "DEAD_LETTER_REASONS",
    "LABEL_DELAY_BUCKETS",
    "REGRESSION_METRICS",
    "TASKS",
    "UNMATCHED_LABEL_REASONS",
    "ServiceMetrics",
    "register_loop_age",
    "register_process_collectors",
]

TASKS: Final = ("classification", "regression")
"""Tasks a service can learn; each decides which prequential gauges exist."""

CLASSIFICATION_METRICS: Final = frozenset({"accuracy", "rolling_accuracy", "log_loss", "kappa"})
REGRESSION_METRICS: Final = frozenset({"mae", "rmse", "r2"})

DEAD_LETTER_REASONS: Final = tuple(reason.value for reason in RejectReason)
"""Reasons a record is dead-lettered; each is pre-created at 0 so that rate() queries have data."""

BATCH_SIZE_BUCKETS: Final = tuple(float(2**i) for i in range(11))  # 1, 2, 4, ..., 1024 records
STEP_SECONDS_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
LABEL_DELAY_BUCKETS: Final = (
    0.1, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 6 * 3600.0, 86400.0, 7 * 86400.0,
)  # fmt: skip
UNMATCHED_LABEL_REASONS: Final = (
    "bad_id", "duplicate_id", "unknown_id", "bad_label", "too_large", "out_of_range",
    "too_many_classes",
)  # fmt: skip
"""Why a delayed label was not learned: a refused id or label, a repeat, or no features in time
(``unknown_id``)."""
CHECKPOINT_SECONDS_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

_BASE_LABELS: Final = ("run", "model", "norm")
_PREFIX: Final = "stream_trainer_"


class ServiceMetrics:
    """The metrics one ``stream-trainer run`` exports.

    Parameters
    ----------
    registry
        Where the metrics are registered. ``None`` (production) creates a fresh registry, served by
        :class:`~stream_trainer.telemetry.http.MetricsServer`; tests pass their own and read it with
        ``registry.get_sample_value(...)``. Two instances cannot share one registry.
    run, model, norm
        Values of the ``run``, ``model`` and ``norm`` labels carried by every series.
    task
        ``"classification"`` or ``"regression"``: which prequential gauges exist.
    clock
        Seconds since the Unix epoch; ``time.time`` in production. Used for the checkpoint
        timestamp and age and for the samples-per-second window.
    rate_window_seconds
        Length of the sliding window over which ``stream_trainer_samples_per_second`` is averaged.

    Notes
    -----
    *Samples per second* is computed when Prometheus scrapes, as
    :math:`\\sum_{t_i > t - W} n_i \\,/\\, \\min(W,\\ t - t_0)`, where :math:`n_i` is the batch size
    observed at :math:`t_i`, :math:`W` the window and :math:`t_0` the construction time. It
    therefore falls to 0 when the stream stops, instead of freezing at its last value.

    *Checkpoint age* is also computed at scrape time: seconds since the last successful checkpoint,
    or since this object was built when no checkpoint has succeeded yet (so an alert on the age
    fires for a service that never manages to checkpoint).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        run: str,
        model: str,
        norm: str,
        task: str,
        clock: Callable[[], float] = time.time,
        rate_window_seconds: float = 10.0,
    ) -> None:
        for name, value in (("run", run), ("model", model), ("norm", norm)):
            if not isinstance(value, str) or not value:
                msg = f"{name} must be a non-empty string, got {value!r}"
                raise ConfigError(msg)
        if task not in TASKS:
            msg = f"task must be one of {TASKS}, got {task!r}"
            raise ConfigError(msg)
        if not rate_window_seconds > 0:
            msg = f"rate_window_seconds must be > 0, got {rate_window_seconds!r}"
            raise ConfigError(msg)

        self.registry = CollectorRegistry() if registry is None else registry
        self.task = task
        self._labels = {"run": run, "model": model, "norm": norm}
        self._clock = clock
        self._started = clock()
        self._window = float(rate_window_seconds)
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int]] = deque()
        self._recent_records = 0
        self._last_checkpoint: float | None = None
        self._info: dict[str, str] = {"version": __version__, "task": task}

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(_PREFIX + name, doc, _BASE_LABELS + extra, registry=self.registry)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(_PREFIX + name, doc, _BASE_LABELS + extra, registry=self.registry)

        def histogram(
            name: str, doc: str, buckets: tuple[float, ...], extra: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(
                _PREFIX + name, doc, _BASE_LABELS + extra, registry=self.registry, buckets=buckets
            )

        lab = self._labels
        # Per-batch path: children bound once.
        self._trained = counter(
            "records_trained_total", "Records the model learned from (after predicting them)."
        ).labels(**lab)
        self._predicted_only = counter(
            "records_predicted_only_total", "Records predicted but not learned from (no label)."
        ).labels(**lab)
        self._batches = counter("batches_total", "Mini-batches processed.").labels(**lab)
        self._since_label = gauge(
            "records_since_last_label",
            "Accepted records since the last one with a label (predicted, not learned from): a"
            " growing value means labels stopped arriving, or the target field is wrong.",
        ).labels(**lab)
        self._batch_size = histogram(
            "batch_size_records", "Records per mini-batch.", BATCH_SIZE_BUCKETS
        ).labels(**lab)
        step = histogram(
            "step_duration_seconds",
            "Wall time of one prequential step, by phase (predict, then learn).",
            STEP_SECONDS_BUCKETS,
            ("phase",),
        )
        self._predict_seconds = step.labels(**lab, phase="predict")
        self._learn_seconds = step.labels(**lab, phase="learn")
        self._loss_family = gauge("training_loss", "Training loss of the last learned batch.")
        self._loss: Gauge | None = None  # bound on the first loss: no fake 0 before it
        gauge(
            "samples_per_second",
            "Records processed per second, averaged over a sliding window.",
        ).labels(**lab).set_function(self._samples_per_second)

        # Prequential (test-then-train) quality: only the task's gauges exist.
        self._prequential: dict[str, tuple[Gauge, dict[str, str]]] = {}
        if task == "classification":
            accuracy = gauge(
                "prequential_accuracy",
                "Prequential accuracy (ratio), over the whole stream or a rolling window.",
                ("window",),
            )
            self._prequential["accuracy"] = (accuracy, {**lab, "window": "cumulative"})
            self._prequential["rolling_accuracy"] = (accuracy, {**lab, "window": "rolling"})
            self._prequential["log_loss"] = (
                gauge("prequential_log_loss", "Prequential log loss (cross-entropy, nats)."),
                lab,
            )
            self._prequential["kappa"] = (
                gauge("prequential_kappa", "Prequential Cohen's kappa."),
                lab,
            )
        else:
            self._prequential["mae"] = (
                gauge("prequential_mae", "Prequential mean absolute error."),
                lab,
            )
            self._prequential["rmse"] = (
                gauge("prequential_rmse", "Prequential root mean squared error."),
                lab,
            )
            self._prequential["r2"] = (
                gauge("prequential_r2", "Prequential coefficient of determination R²."),
                lab,
            )
        self._prequential_children: dict[str, Gauge] = {}

        dead = counter("records_dead_lettered_total", "Records set aside, by reason.", ("reason",))
        self._dead = {reason: dead.labels(**lab, reason=reason) for reason in DEAD_LETTER_REASONS}

        self._lag_family = gauge(
            "consumer_lag_records",
            "Records between the consumer position and the end of each assigned partition.",
            ("topic", "partition"),
        )
        self._lag: dict[tuple[str, str], Gauge] = {}

        self._ckpt_last_family = gauge(
            "checkpoint_last_success_timestamp_seconds",
            "Unix time of the last successful checkpoint.",
        )
        self._ckpt_last: Gauge | None = None  # absent until the first success
        gauge(
            "checkpoint_age_seconds",
            "Seconds since the last successful checkpoint (or since start, before the first one).",
        ).labels(**lab).set_function(self._checkpoint_age)
        self._ckpt_duration = histogram(
            "checkpoint_duration_seconds",
            "Wall time to write one checkpoint.",
            CHECKPOINT_SECONDS_BUCKETS,
        ).labels(**lab)
        self._ckpt_size_family = gauge(
            "checkpoint_size_bytes", "Size of the last successful checkpoint."
        )
        self._ckpt_size: Gauge | None = None
        self._ckpt_failures = counter(
            "checkpoint_failures_total", "Checkpoints that could not be written."
        ).labels(**lab)
        rejected = counter(
            "checkpoint_rejected_total",
            "Stored checkpoint versions refused at restore (the service fell back), by reason.",
            ("reason",),
        )
        self._ckpt_rejected = {r: rejected.labels(**lab, reason=r) for r in REJECT_REASONS}
        self._version_family = gauge(
            "model_version",
            "Model version: checkpoint version and training step of the last saved checkpoint.",
            ("kind",),
        )
        self._version: dict[str, Gauge] = {}

        self._drift_family = gauge(
            "norm_running_stats_drift",
            "Relative change of a norm layer's running mean/var since the previous report.",
            ("layer",),
        )
        self._gap_family = gauge(
            "norm_train_serve_gap",
            "Mean |train-mode - serve-mode output| of a norm layer on the live batch.",
            ("layer",),
        )
        self._norm: dict[str, tuple[Gauge, Gauge]] = {}
        self._expert_family = gauge(
            "expert_weight",
            "Weight of each expert (the MLP members mlp or mlp0, mlp1..., and linear) in the "
            "served mixture; the weights sum to 1.",
            ("expert",),
        )
        self._experts: dict[str, Gauge] = {}
        self._expert_loss_family = gauge(
            "expert_recent_loss",
            "Each expert's discounted recent loss, the mixture's L_k: 0/1 errors (classification) "
            "or half squared standardized errors (regression) over about the last 1,000 labelled "
            "records.",
            ("expert",),
        )
        self._expert_losses: dict[str, Gauge] = {}

        self._pending = gauge(
            "labels_pending_records",
            "Records predicted and waiting for their delayed label (with --labels-source).",
        ).labels(**lab)
        self._label_delay = histogram(
            "label_delay_seconds",
            "Record time from a record's features to its label, for the labels learned.",
            LABEL_DELAY_BUCKETS,
        ).labels(**lab)
        self._expired = counter(
            "labels_expired_total",
            "Pending records whose label did not arrive within the timeout, or evicted past"
            " max_pending: predicted, never learned.",
        ).labels(**lab)
        unmatched = counter(
            "labels_unmatched_total",
            "Delayed labels not learned, by reason (unknown_id: no features within the timeout).",
            ("reason",),
        )
        self._unmatched = {r: unmatched.labels(**lab, reason=r) for r in UNMATCHED_LABEL_REASONS}

        self._build = Info(
            _PREFIX + "build", "Build and configuration of the service.", _BASE_LABELS,
            registry=self.registry,
        )  # fmt: skip
        self._build.labels(**lab).info(self._info)

    # -- per batch ---------------------------------------------------------------------------

    def observe_step(
        self,
        *,
        batch_size: int,
        trained: int,
        predicted_only: int,
        predict_seconds: float,
        learn_seconds: float,
        loss: float | None,
    ) -> None:
        """Record one prequential step over a mini-batch of ``batch_size`` records.

        Each record was predicted; ``trained`` of them were then learned from and ``predicted_only``
        were not (no label), so ``trained + predicted_only <= batch_size``. ``loss`` is the training
        loss of the batch, ``None`` when nothing was learned (the gauge keeps its last value).
        """
        if trained < 0 or predicted_only < 0 or trained + predicted_only > batch_size:
            msg = (
                f"need 0 <= trained, 0 <= predicted_only and trained + predicted_only <= "
                f"batch_size, got trained={trained!r}, predicted_only={predicted_only!r}, "
                f"batch_size={batch_size!r}"
            )
            raise ValueError(msg)
        self._trained.inc(trained)
        self._predicted_only.inc(predicted_only)
        self._batches.inc()
        self._batch_size.observe(batch_size)
        self._predict_seconds.observe(predict_seconds)
        self._learn_seconds.observe(learn_seconds)
        if loss is not None:
            if self._loss is None:
                self._loss = self._loss_family.labels(**self._labels)
            self._loss.set(loss)
        now = self._clock()
        with self._lock:
            self._recent.append((now, batch_size))
            self._recent_records += batch_size
            self._prune(now)

    def set_records_since_last_label(self, n: int) -> None:
        """Set the number of accepted records since the last labelled one."""
        self._since_label.set(n)

    def set_prequential(self, metrics: Mapping[str, float]) -> None:
        """Set the prequential quality gauges.

        Keys for classification: ``accuracy``, ``rolling_accuracy`` (ratios in [0, 1]),
        ``log_loss``, ``kappa``; for regression: ``mae``, ``rmse``, ``r2``. A subset may be given;
        a key of the other task, or an unknown key, is a ``ValueError``.
        """
        for key, value in metrics.items():
            child = self._prequential_children.get(key)
            if child is None:
                try:
                    family, labels = self._prequential[key]
                except KeyError:
                    msg = (
                        f"unknown prequential metric {key!r} for task {self.task!r}; "
                        f"expected some of {sorted(self._prequential)}"
                    )
                    raise ValueError(msg) from None
                child = self._prequential_children[key] = family.labels(**labels)
            child.set(value)

    def dead_lettered(self, reason: str, n: int = 1) -> None:
        """Count ``n`` records set aside for ``reason`` (one of :data:`DEAD_LETTER_REASONS`)."""
        try:
            child = self._dead[reason]
        except KeyError:
            msg = f"unknown dead-letter reason {reason!r}; expected one of {DEAD_LETTER_REASONS}"
            raise ValueError(msg) from None
        child.inc(n)

    def observe_labels(
        self,
        *,
        pending: int,
        delays: Sequence[float] = (),
        expired: int = 0,
        unmatched: Mapping[str, int] | None = None,
    ) -> None:
        """Delayed labels after a batch: the records now pending, the delay (seconds of record
        time) of each label learned, the records expired and the labels unmatched by reason (one
        of :data:`UNMATCHED_LABEL_REASONS`) since the last call."""
        self._pending.set(pending)
        for delay in delays:
            self._label_delay.observe(delay)
        if expired:
            self._expired.inc(expired)
        for reason, n in (unmatched or {}).items():
            try:
                child = self._unmatched[reason]
            except KeyError:
                expected = UNMATCHED_LABEL_REASONS
                msg = f"unknown unmatched-label reason {reason!r}; expected one of {expected}"
                raise ValueError(msg) from None
            child.inc(n)

    def set_consumer_lag(self, lag: Mapping[str, int]) -> None:
        """Set the lag of every assigned partition, keyed ``"topic:partition"``.

        The mapping is the whole current assignment: partitions missing from it (revoked in a
        rebalance) lose their series, so a dead partition does not show its last lag forever.
        """
        seen: set[tuple[str, str]] = set()
        for key, value in lag.items():
            topic, sep, partition = key.rpartition(":")
            if not sep or not topic or not partition.isdigit():
                msg = f"consumer lag keys must be 'topic:partition', got {key!r}"
                raise ValueError(msg)
            ident = (topic, partition)
            seen.add(ident)
            child = self._lag.get(ident)
            if child is None:
                child = self._lag[ident] = self._lag_family.labels(
                    **self._labels, topic=topic, partition=partition
                )
            child.set(value)
        for ident in self._lag.keys() - seen:
            del self._lag[ident]
            self._lag_family.remove(*self._labels.values(), *ident)

    # -- per checkpoint ----------------------------------------------------------------------

    def checkpoint_saved(
        self, *, duration_seconds: float, size_bytes: int, version: int, step: int
    ) -> None:
        """Record a checkpoint written in ``duration_seconds``: its size, version and step."""
        now = self._clock()
        self._ckpt_duration.observe(duration_seconds)
        if self._ckpt_size is None or self._ckpt_last is None:
            self._ckpt_size = self._ckpt_size_family.labels(**self._labels)
            self._ckpt_last = self._ckpt_last_family.labels(**self._labels)
        self._ckpt_size.set(size_bytes)
        self._ckpt_last.set(now)
        with self._lock:
            self._last_checkpoint = now
        self._set_version("checkpoint", version)
        self._set_version("step", step)

    def set_model_version(self, *, version: int, step: int) -> None:
        """Set the model version without a new checkpoint: the one a restarted service restored.

        The checkpoint age, duration and size stay as they are (they describe checkpoints written
        by this process).
        """
        self._set_version("checkpoint", version)
        self._set_version("step", step)

    def checkpoint_failed(self) -> None:
        """Count a checkpoint that could not be written."""
        self._ckpt_failures.inc()

    def checkpoint_rejected(self, reason: str, n: int = 1) -> None:
        """Count ``n`` stored versions refused at restore for ``reason`` (one of
        :data:`~stream_trainer.checkpoints.REJECT_REASONS`)."""
        self._ckpt_rejected[reason].inc(n)

    # -- model health ------------------------------------------------------------------------

    def set_norm_health(self, layer: str, *, drift: float, train_serve_gap: float) -> None:
        """Report the health of one normalization layer.

        ``drift`` is the relative change of the layer's running statistics since the previous
        report, :math:`\\lVert s_t - s_{t-1}\\rVert / (\\lVert s_{t-1}\\rVert + \\epsilon)` over the
        concatenated running mean and variance. ``train_serve_gap`` is the mean
        :math:`|f_{\\text{train}}(x) - f_{\\text{serve}}(x)|` of the layer's output on the live
        batch, train mode (batch statistics) against serve mode (running statistics): a large gap
        means predictions made in serve mode differ from what was learned.
        """
        children = self._norm.get(layer)
        if children is None:
            children = self._norm[layer] = (
                self._drift_family.labels(**self._labels, layer=layer),
                self._gap_family.labels(**self._labels, layer=layer),
            )
        children[0].set(drift)
        children[1].set(train_serve_gap)

    def set_expert_weights(self, weights: Mapping[str, float]) -> None:
        """Report the mixture weight of each expert (see ``stream_trainer.training.mixture``):
        which model the served predictions follow. Each weight must be in [0, 1]."""
        for expert, weight in weights.items():
            if not 0.0 <= weight <= 1.0:
                raise ValueError(f"expert weight must be in [0, 1], got {expert}={weight!r}")
            self._expert_child(self._experts, self._expert_family, expert).set(weight)

    def set_expert_losses(self, losses: Mapping[str, float]) -> None:
        """Report each expert's discounted recent loss (``stream_trainer.training.mixture``); each
        must be finite and not negative."""
        for expert, loss in losses.items():
            if not 0.0 <= loss < float("inf"):
                raise ValueError(f"expert loss must be finite and >= 0, got {expert}={loss!r}")
            self._expert_child(self._expert_losses, self._expert_loss_family, expert).set(loss)

    def _expert_child(self, children: dict[str, Gauge], family: Any, expert: str) -> Gauge:
        child = children.get(expert)
        if child is None:
            child = children[expert] = family.labels(**self._labels, expert=expert)
        return child

    def set_info(self, **kv: object) -> None:
        """Add key/values to ``stream_trainer_build_info`` (``version`` and ``task`` are preset).

        ``run``, ``model`` and ``norm`` are labels of every series already: passing them is allowed
        only with the constructor's value.
        """
        for key, value in kv.items():
            if key in self._labels:
                if str(value) != self._labels[key]:
                    msg = f"set_info({key}={value!r}) contradicts {key}={self._labels[key]!r}"
                    raise ValueError(msg)
                continue
            self._info[key] = str(value)
        self._build.labels(**self._labels).info(self._info)

    # -- internals ---------------------------------------------------------------------------

    def _set_version(self, kind: str, value: int) -> None:
        child = self._version.get(kind)
        if child is None:
            child = self._version[kind] = self._version_family.labels(**self._labels, kind=kind)
        child.set(value)

    def _prune(self, now: float) -> None:
        """Drop window entries older than ``now - window``; caller holds the lock."""
        horizon = now - self._window
        recent = self._recent
        while recent and recent[0][0] <= horizon:
            self._recent_records -= recent.popleft()[1]

    def _samples_per_second(self) -> float:
        now = self._clock()
        with self._lock:
            self._prune(now)
            records = self._recent_records
        elapsed = min(self._window, now - self._started)
        if elapsed <= 0:
            return 0.0
        return records / elapsed

    def _checkpoint_age(self) -> float:
        with self._lock:
            since = self._started if self._last_checkpoint is None else self._last_checkpoint
        return max(0.0, self._clock() - since)


def register_process_collectors(registry: CollectorRegistry) -> None:
    """Add prometheus_client's process, platform and GC collectors to ``registry`` (what its
    global default registry carries): ``process_resident_memory_bytes``,
    ``process_cpu_seconds_total``, ``process_start_time_seconds``, ``process_open_fds`` (from
    ``/proc``; none elsewhere), ``python_info`` and ``python_gc_*``. A registry that already has
    them is left as it is."""
    for make in (ProcessCollector, PlatformCollector, GCCollector):
        # prometheus_client refuses a name registered twice: those are there already.
        with contextlib.suppress(ValueError):
            make(registry=registry)


def register_loop_age(registry: CollectorRegistry, *, run: str, age: Callable[[], float]) -> None:
    """``stream_trainer_loop_seconds_since_iteration{run}``: ``age()`` read at scrape time, the
    seconds since the service loop last began an iteration (what ``/healthz`` bounds)."""
    Gauge(
        _PREFIX + "loop_seconds_since_iteration",
        "Seconds since the service loop last began an iteration (polled its source); /healthz "
        "fails past liveness_timeout_seconds.",
        ["run"],
        registry=registry,
    ).labels(run=run).set_function(age)
