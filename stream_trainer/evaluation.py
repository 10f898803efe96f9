"""Prequential evaluation of a learner over a record stream, batch by batch.

This is what ``stream-trainer evaluate`` runs, and what the benchmarks call: cut the stream into
mini-batches (fixed or seeded variable sizes), give each batch to the learner's prequential
``step`` (predict, score, learn), count rejected records by reason, and keep a thin history (for
the plot) of the rolling metric and the batch sizes.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from stream_trainer.errors import DataError
from stream_trainer.records import Record, RejectedRecord
from stream_trainer.sources import BatchSizes, iter_batches
from stream_trainer.training import IncrementalTrainer

__all__ = ["EvaluationResult", "StreamHistory", "evaluate_stream"]


@dataclass
class StreamHistory:
    """Per step: records seen so far, batch size, and the rolling metric after the step.

    Bounded for long-lived services: once more than ``max_points`` steps are kept, every other
    point is dropped and from then on only every ``stride``-th step is recorded (the stride doubles
    each time), so memory stays O(max_points) however long the stream, and the plot still spans it.

    A step after which no sample has been scored yet (the first batch of a new model has no
    prediction: it is *unscored*, :mod:`stream_trainer.training.metrics`) records ``nan``, not
    the ``0.0`` an empty metric reports, so that a plot leaves it out instead of a drop to 0.
    """

    seen: list[int] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    rolling: list[float] = field(default_factory=list)
    metric_name: str = "rolling_accuracy"
    max_points: int = 20_000
    stride: int = 1
    _calls: int = 0

    def add(
        self, seen: int, size: int, metrics: dict[str, float], *, scored: int | None = None
    ) -> None:
        """Record one step: ``seen`` records so far, the batch's ``size``, the learner's
        ``metrics`` and ``scored``, the samples scored so far (``None``: unknown, taken as some)."""
        self._calls += 1
        if (self._calls - 1) % self.stride:
            return
        self.seen.append(seen)
        self.batch_size.append(size)
        value = metrics.get(self.metric_name, metrics.get("rmse", math.nan))
        self.rolling.append(math.nan if scored == 0 else value)
        if len(self.seen) > self.max_points:
            del self.seen[1::2], self.batch_size[1::2], self.rolling[1::2]
            self.stride *= 2


def scored_samples(learner: IncrementalTrainer) -> int:
    """Samples the learner's prequential metrics have scored so far (for
    :meth:`StreamHistory.add`)."""
    return learner.cls_metrics.n + learner.reg_metrics.n


_MAX_FIELDS_SHOWN = 50


def _no_target_message(target: str, fields: set[str]) -> str:
    shown = ", ".join(repr(name) for name in sorted(fields)[:_MAX_FIELDS_SHOWN])
    if target in fields:
        return f"no record has a value for the target field {target!r}: nothing was learned"
    return (
        f"no record has the target field {target!r}: nothing was learned; fields seen: "
        f"{shown or 'none'} (choose the label with --target)"
    )


@dataclass
class EvaluationResult:
    report: dict[str, Any]
    history: StreamHistory


def evaluation_report(
    learner: IncrementalTrainer,
    *,
    metrics: dict[str, float],
    elapsed: float,
    records_read: int,
    predicted_only: int,
    unscored: int,
    source_rejected: Counter[str],
) -> dict[str, Any]:
    """The report of a prequential replay: ``metrics``, the counts (rejections by reason, the
    source's and the learner's), speed, and the learner's task and classes."""
    rejected = Counter(learner.rejected) + source_rejected
    return {
        "samples": learner.samples_trained,
        **metrics,
        "samples_per_second": learner.samples_trained / elapsed if elapsed > 0 else 0.0,
        "elapsed_seconds": elapsed,
        "records_read": records_read,
        "predicted_only": predicted_only,
        "unscored": unscored,
        "rejected": dict(sorted(rejected.items())),
        "rejected_total": sum(rejected.values()),
        "steps": learner.steps,
        "task": learner.task,
        "classes": list(learner.classes),
    }


def evaluate_stream(
    items: Iterable[Record | RejectedRecord],
    learner: IncrementalTrainer,
    *,
    batch_sizes: BatchSizes,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
    describe: dict[str, Any] | None = None,
) -> EvaluationResult:
    """Run ``learner`` prequentially over ``items`` and return the report and history.

    ``limit`` bounds the number of source items read (rejected ones included). The report has the
    fields of ``evaluate --report-json``: samples, accuracy, rolling_accuracy, log_loss, kappa (or
    mae, rmse, r2), samples_per_second, rejected (count by reason), predicted_only, unscored
    (labelled samples that came before the model existed, so had no prediction and are in no
    metric: river's prequential protocol, :mod:`stream_trainer.training.metrics`), steps, plus
    ``describe`` (norm, batch_size, model, source...).

    Raises :class:`~stream_trainer.errors.DataError`, naming the fields it saw, when records were
    read but none has a value for the learner's target: nothing could be learned or scored.
    """
    stream = itertools.islice(items, limit) if limit is not None else iter(items)
    source_rejected: Counter[str] = Counter()
    history = StreamHistory()
    seen = 0
    target = learner.target
    labelled = 0  # records with a value for the target
    fields: set[str] = set()  # the field names seen, while the target has not been
    bar = tqdm(total=limit, unit="rec", disable=not progress, file=sys.stderr, mininterval=0.5)
    start = time.perf_counter()
    try:
        for batch in iter_batches(stream, batch_sizes.sizes(seed)):
            records = []
            for item in batch:
                if isinstance(item, RejectedRecord):
                    source_rejected[item.reason.value] += 1
                else:
                    records.append(item)
                    label = item.value.get(target)
                    if label is not None and label != "":
                        labelled += 1
                    elif not labelled and len(fields) < _MAX_FIELDS_SHOWN:
                        fields.update(str(name) for name in item.value)
            learner.step(records)
            seen += len(batch)
            metrics = learner.metrics()
            history.add(seen, len(batch), metrics, scored=scored_samples(learner))
            bar.update(len(batch))
            if history.metric_name in metrics and len(history.seen) % 50 == 0:
                bar.set_postfix(acc=f"{metrics['accuracy']:.4f}", refresh=False)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    if seen and not labelled:
        if not fields and source_rejected:
            by_reason = dict(sorted(source_rejected.items()))
            raise DataError(f"no record of the source could be read: rejected {by_reason}")
        raise DataError(_no_target_message(target, fields))
    if learner.task == "regression":
        history.metric_name = "rmse"
    report = evaluation_report(
        learner,
        metrics=learner.metrics(),
        elapsed=elapsed,
        records_read=seen,
        predicted_only=learner.predicted_only,
        unscored=learner.unscored,
        source_rejected=source_rejected,
    )
    report.update(batch_size=str(batch_sizes), seed=seed)
    report.update(describe or {})
    return EvaluationResult(report=report, history=history)
