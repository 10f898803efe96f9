"""Prequential evaluation with labels that arrive ``delay`` records after the features.

river's ``progressive_val_score(..., delay=N)`` protocol over a recorded stream: record ``i`` is
predicted when it arrives, with the model as it is then (read-only: the trainer's
``predict_proba_many`` / ``predict_many``), and its label is revealed when record ``i + N``
arrives, *before* that record is predicted; the label then scores the prediction served at
arrival and the record is learned (one trainer step on it, so the feature statistics learn from
it then). Labels still pending at the end of the stream are revealed in arrival order. With
``N = 0`` each label is revealed right after its record is predicted.

Positions count the records the source delivered; an item the source already rejected (bad
bytes, bad JSON) takes no position, as it would not be in river's dataset. A record without a
label is predicted only. A record the trainer rejects at reveal time is counted by reason and
not scored.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

from stream_trainer.errors import ConfigError
from stream_trainer.evaluation import EvaluationResult, StreamHistory, evaluation_report
from stream_trainer.records import Record, RejectedRecord
from stream_trainer.training import ClassificationMetrics, IncrementalTrainer, RegressionMetrics
from stream_trainer.training.labels import canonical_class
from stream_trainer.training.metrics import score_served_class, score_served_value

__all__ = ["evaluate_with_label_delay"]

Served = dict[str, float] | float | None
"""A prediction as served: class probabilities (classes as at serving time), a value, or none."""


class _DelayedReplay:
    """The pending records, the served predictions and the metrics of one delayed replay."""

    def __init__(self, learner: IncrementalTrainer, predictions: list[Served] | None) -> None:
        self.learner = learner
        self.cls_metrics = ClassificationMetrics(learner.config.rolling_window)
        self.reg_metrics = RegressionMetrics()
        self.predictions = predictions
        self.unlabelled = 0

    def serve(self, record: Record) -> Served:
        learner = self.learner
        if learner.task == "regression":
            served: Served = learner.predict_many([record])[0]
        elif learner.task is None and learner.model is None:
            served = None  # nothing learned yet: no prediction, whatever the task turns out to be
        else:
            served = learner.predict_proba_many([record])[0]
        if self.predictions is not None:
            self.predictions.append(served)
        return served

    def reveal(self, record: Record, served: Served) -> None:
        """The label of ``record`` arrives: learn the record, then score what was served."""
        learner = self.learner
        label = record.value.get(learner.target)
        if label is None or label == "":
            self.unlabelled += 1
            return
        if learner.step([record]).trained == 0:
            return  # rejected: counted by the trainer, not scored
        if learner.task == "regression":
            score_served_value(self.reg_metrics, float(label), served)
            return
        index = learner.class_index[str(canonical_class(label))]
        # columns: the classes as served, in the learner's order
        row = None
        if isinstance(served, dict) and served:
            row = [served.get(c, 0.0) for c in learner.classes[: len(served)]]
        score_served_class(self.cls_metrics, index, row)

    def metrics(self) -> dict[str, float]:
        if self.learner.task == "regression":
            return self.reg_metrics.report()
        return self.cls_metrics.report()


def evaluate_with_label_delay(
    items: Iterable[Record | RejectedRecord],
    learner: IncrementalTrainer,
    *,
    delay: int,
    limit: int | None = None,
    progress: bool = True,
    describe: dict[str, Any] | None = None,
    predictions: list[Served] | None = None,
) -> EvaluationResult:
    """Replay ``items`` through ``learner`` with labels ``delay`` records late (module docstring).

    Returns the report (the fields of :func:`~stream_trainer.evaluation.evaluate_stream`'s, the
    metrics scoring the predictions served at arrival, plus ``label_delay``) with its history.
    ``predictions``, when given, receives the served prediction of every record in arrival order
    (kept only on request: the replay itself holds no more than the ``delay`` pending records).
    """
    if delay < 0:
        raise ConfigError(f"label delay must be >= 0 records, got {delay!r}")
    stream = itertools.islice(items, limit) if limit is not None else iter(items)
    replay = _DelayedReplay(learner, predictions)
    pending: deque[tuple[int, Record, Served]] = deque()
    source_rejected: Counter[str] = Counter()
    history = StreamHistory()
    position = read = 0
    bar = tqdm(total=limit, unit="rec", disable=not progress, file=sys.stderr, mininterval=0.5)
    start = time.perf_counter()
    try:
        for item in stream:
            read += 1
            bar.update(1)
            if isinstance(item, RejectedRecord):
                source_rejected[item.reason.value] += 1
                continue
            while pending and pending[0][0] + delay <= position:
                _, record, served = pending.popleft()
                replay.reveal(record, served)
                history.add(position, 1, replay.metrics())
            pending.append((position, item, replay.serve(item)))
            position += 1
        while pending:
            _, record, served = pending.popleft()
            replay.reveal(record, served)
            history.add(position, 1, replay.metrics())
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    if learner.task == "regression":
        history.metric_name = "rmse"
    report = evaluation_report(
        learner,
        metrics=replay.metrics(),
        elapsed=elapsed,
        records_read=read,
        predicted_only=replay.unlabelled,
        unscored=replay.cls_metrics.unscored + replay.reg_metrics.unscored,
        source_rejected=source_rejected,
    )
    report.update(batch_size="1", label_delay=delay)
    report.update(describe or {})
    return EvaluationResult(report=report, history=history)
