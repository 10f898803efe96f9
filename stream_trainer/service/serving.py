"""Predictions of the live model over HTTP: the :class:`LiveModelEndpoint` behind ``GET /model``
and ``POST /predict`` (:class:`~stream_trainer.telemetry.http.MetricsServer` does the HTTP).

``POST /predict`` takes one JSON object or a list of at most ``max_records`` of them and answers
lists in the same order::

    {"predictions": [...], "probabilities": [{class: p, ...}, ...] | null,
     "model": {"checkpoint_version": V | null, "samples_seen": N, "step": S}}

The records pass the stream's screening (:meth:`IncrementalTrainer.screen`, with the target
field removed: a label sent along is ignored, never learned), so what the stream would
dead-letter is refused here with the same reason and detail. A request with any refused record is
answered 422 as a whole: ``{"error": ..., "rejected": [{"index", "reason", "detail"}, ...]}``.
Before the model has learned anything the answer is 503. Nothing a request holds changes the
model, its statistics, metrics or counters.

Concurrency: every use of the trainer holds a :class:`ModelLock`, which the service loop also
holds for each training step and while it takes the state of a checkpoint (not while the store
writes it). The two take turns, so a step waits for at most the one request being answered (one
forward pass over at most ``max_records`` records) however many are queued, and a request for at
most one step per request ahead of it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from stream_trainer.records import Record, RejectedRecord, RejectReason
from stream_trainer.training import IncrementalTrainer

__all__ = ["DEFAULT_MAX_PREDICT_RECORDS", "LiveModelEndpoint", "ModelLock"]

DEFAULT_MAX_PREDICT_RECORDS: Final = 1000
"""Most records one ``POST /predict`` may carry (one forward pass: bounds a step's wait)."""


class ModelLock:
    """Mutual exclusion between the training loop and requests that takes turns: when one side
    lets go while the other waits, the other goes next. The loop therefore waits for at most
    the one request in flight (however many are queued), and a request for at most one step per
    request ahead of it (the loop cannot take the lock back-to-back while a request waits).

    Examples
    --------
    >>> lock = ModelLock()
    >>> with lock.training():
    ...     pass
    >>> with lock.serving():
    ...     pass
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._held = False
        self._training_waits = 0
        self._serving_waits = 0
        self._serving_owed = False  # the loop let go while a request waited: a request is next

    @contextmanager
    def training(self) -> Iterator[None]:
        """Hold the lock for the loop: next after the request in flight, if any."""
        with self._condition:
            self._training_waits += 1
            try:
                self._condition.wait_for(lambda: not self._held and not self._serving_owed)
            finally:
                self._training_waits -= 1
            self._held = True
        try:
            yield
        finally:
            with self._condition:
                self._held = False
                self._serving_owed = self._serving_waits > 0
                self._condition.notify_all()

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Hold the lock for a request: when the loop neither holds it nor waits for it, or
        right after the step it waited for."""
        with self._condition:
            self._serving_waits += 1
            try:
                self._condition.wait_for(
                    lambda: not self._held and (self._serving_owed or not self._training_waits)
                )
            finally:
                self._serving_waits -= 1
            self._held = True
            self._serving_owed = False
        try:
            yield
        finally:
            with self._condition:
                self._held = False
                self._condition.notify_all()


class LiveModelEndpoint:
    """``GET /model`` and ``POST /predict`` on a trainer that keeps learning (module docstring).

    Parameters
    ----------
    trainer
        The live trainer; only read, under ``lock``.
    lock
        Held (:meth:`ModelLock.serving`) around each use of ``trainer`` here, and by the service
        (:meth:`ModelLock.training`) around each step.
    settings
        The service's settings as logged (secrets masked), shown by ``GET /model``.
    checkpoint_version
        The version of the last saved checkpoint (``None`` before the first).
    predict_enabled
        Whether ``POST /predict`` is served.
    max_records
        Most records per request (413 above).
    registry, run
        Where ``stream_trainer_predict_requests_total{run, code}`` is counted (``None``: not).

    Examples
    --------
    >>> from stream_trainer.training import TrainerConfig
    >>> trainer = IncrementalTrainer(TrainerConfig(target="y", hidden=(4,), seed=0))
    >>> _ = trainer.step([Record({"x": float(i % 2), "y": i % 2}) for i in range(8)])
    >>> endpoint = LiveModelEndpoint(trainer, ModelLock(), settings={},
    ...                              checkpoint_version=lambda: None)
    >>> status, body = endpoint.predict({"x": 1.0})
    >>> status, body["predictions"][0] in ("0", "1"), body["model"]["samples_seen"]
    (200, True, 8)
    >>> endpoint.predict({"x": float("nan")})[1]["rejected"][0]["reason"]
    'non_finite'
    """

    def __init__(
        self,
        trainer: IncrementalTrainer,
        lock: ModelLock,
        *,
        settings: Mapping[str, Any],
        checkpoint_version: Callable[[], int | None],
        predict_enabled: bool = True,
        max_records: int = DEFAULT_MAX_PREDICT_RECORDS,
        registry: CollectorRegistry | None = None,
        run: str = "default",
    ) -> None:
        if max_records < 1:
            msg = f"max_records must be >= 1, got {max_records!r}"
            raise ValueError(msg)
        self.trainer = trainer
        self.lock = lock
        self.settings = dict(settings)
        self._checkpoint_version = checkpoint_version
        self._predict_enabled = predict_enabled
        self.max_records = max_records
        self._requests = None
        if registry is not None:
            family = PromCounter(
                "stream_trainer_predict_requests",
                "POST /predict requests answered, by HTTP status code.",
                ["run", "code"],
                registry=registry,
            )
            self._requests = (family, run)

    @property
    def predict_enabled(self) -> bool:
        return self._predict_enabled

    def describe(self) -> dict[str, Any]:
        """Settings, model version, samples seen, task, classes and input columns."""
        with self.lock.serving():
            trainer = self.trainer
            model = trainer.model
            return {
                "settings": self.settings,
                "predict_enabled": self._predict_enabled,
                "model": self._version(),
                "task": trainer.task,
                "target": trainer.target,
                "classes": list(trainer.classes),
                "features": trainer.encoder.column_names(),
                "input_columns": None if model is None else model.in_features,
                "expert_weights": trainer.expert_weights(),
                "expert_losses": trainer.expert_losses(),
                "member_momenta": list(trainer.config.member_momenta),
                "metrics": trainer.metrics(),
            }

    def predict(self, payload: Any) -> tuple[int, dict[str, Any]]:
        """Status and body for a parsed ``POST /predict`` body (module docstring)."""
        status, body = self._predict(payload)
        if self._requests is not None:
            family, run = self._requests
            family.labels(run=run, code=str(status)).inc()
        return status, body

    def _predict(self, payload: Any) -> tuple[int, dict[str, Any]]:
        items = payload if isinstance(payload, list) else [payload]
        if not items:
            return 400, {"error": "send one JSON object or a non-empty list of them"}
        if len(items) > self.max_records:
            return 413, {
                "error": f"{len(items)} records, more than the limit of {self.max_records}"
            }
        with self.lock.serving():
            trainer = self.trainer
            records, rejected = self._screen(trainer, items)
            if rejected:
                return 422, {
                    "error": f"{len(rejected)} of {len(items)} records refused",
                    "rejected": [
                        {"index": index, "reason": r.reason.value, "detail": r.detail}
                        for index, r in rejected
                    ],
                }
            if trainer.model is None or trainer.task is None:
                return 503, {"error": "no model yet: the service has not learned a labelled record"}
            if trainer.task == "regression":
                predictions = trainer.predict_many(records)
                probabilities = None
            else:
                probabilities = trainer.predict_proba_many(records)
                predictions = [
                    None if p is None else max(p, key=p.__getitem__) for p in probabilities
                ]
            version = self._version()
        return 200, {"predictions": predictions, "probabilities": probabilities, "model": version}

    @staticmethod
    def _screen(
        trainer: IncrementalTrainer, items: list[Any]
    ) -> tuple[list[Record], list[tuple[int, RejectedRecord]]]:
        """The records of ``items`` (target removed) and the refused ones with their index:
        not an object (``not_object``), else the trainer's screen. The trainer's count of
        rejections is left as it was (what a request sends is not the stream's)."""
        refused: list[tuple[int, RejectedRecord]] = []
        records: list[Record] = []
        target = trainer.target
        for index, item in enumerate(items):
            if isinstance(item, dict):
                value = {k: v for k, v in item.items() if k != target}
                records.append(Record(value, offset=index))  # the offset: its place in the request
            else:
                record = Record({"value": item}, offset=index)
                detail = f"a record is a JSON object, got {type(item).__name__}"
                refused.append((index, RejectedRecord.of(record, RejectReason.NOT_OBJECT, detail)))
        counts: Counter[str] = Counter(trainer.rejected)
        batch: list[RejectedRecord] = []
        try:
            accepted, _ = trainer.screen(records, batch)
        finally:
            trainer.rejected = counts
        refused.extend((r.offset or 0, r) for r in batch)
        refused.sort(key=lambda pair: pair[0])
        return accepted, refused

    def _version(self) -> dict[str, Any]:
        trainer = self.trainer
        return {
            "checkpoint_version": self._checkpoint_version(),
            "samples_seen": trainer.samples_trained,
            "step": trainer.steps,
        }
