"""Prequential metrics, updated a whole batch at a time.

Each batch is scored *before* the model learns from it (test-then-train), so every metric is an
honest estimate of performance on unseen data. The definitions are river's, checked against
``river.metrics`` in the tests on the same predictions.

A sample the learner could not predict at all (no model yet: before the first labelled batch the
trainer knows no class, so the whole first batch has no prediction) is *unscored*: it enters no
metric and is counted in ``unscored``. This is river's prequential protocol
(``river.evaluate.progressive_val_score`` updates its metric only when ``y_pred`` is neither
``None`` nor ``{}``). A prediction that exists but misses, a class never seen before included, is
scored as wrong.

Classification (classes are indices into the trainer's growing label list):

- ``accuracy``: cumulative share of correct top-1 predictions (``river.metrics.Accuracy``).
- ``rolling_accuracy``: accuracy over the last ``window`` labelled samples
  (``river.utils.Rolling(river.metrics.Accuracy(), window)``).
- ``log_loss``: mean of ``-log(clip(p_true, 1e-15, 1 - 1e-15))`` (``river.metrics.CrossEntropy``,
  which for two classes is ``river.metrics.LogLoss``). As in river, a sample whose true class is not
  among the predicted ones (a class never seen before) adds 0 to the sum but counts in the mean.
- ``kappa``: Cohen's kappa from the running confusion matrix, ``(p_o - p_e) / (1 - p_e)``
  (``river.metrics.CohenKappa``; 0 when ``p_e == 1``).

Regression: ``mae``, ``rmse`` and ``r2 = 1 - SSE / SST`` with SST from the running variance of the
targets (``river.metrics.MAE``, ``RMSE``, ``R2``).

The state is plain numbers and lists, checkpointed as JSON.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "ClassificationMetrics",
    "RegressionMetrics",
    "score_served_class",
    "score_served_classes",
    "score_served_value",
    "score_served_values",
]

_EPS = 1e-15


class ClassificationMetrics:
    """Accuracy, rolling accuracy, log loss and Cohen's kappa over a growing set of classes."""

    def __init__(self, window: int = 1000) -> None:
        self.window = int(window)
        self.n = 0  # scored samples
        self.unscored = 0  # samples without a prediction (module docstring)
        self.correct = 0
        self.log_loss_sum = 0.0
        self.confusion = np.zeros((0, 0), dtype=np.int64)
        self._ring = np.zeros(self.window, dtype=np.int8)
        self._ring_pos = 0
        self._ring_fill = 0
        self._ring_hits = 0  # sum of the ring: the hits among the last `window` samples

    def _grow(self, n_classes: int) -> None:
        k = self.confusion.shape[0]
        if n_classes > k:
            grown = np.zeros((n_classes, n_classes), dtype=np.int64)
            grown[:k, :k] = self.confusion
            self.confusion = grown

    def update(self, y_true: np.ndarray, proba: np.ndarray | None) -> None:
        """Score a batch: ``y_true`` class indices ``(n,)``, ``proba`` ``(n, K)`` or None.

        ``proba is None`` (or no column) means the model could not predict yet: the samples are
        *unscored* (counted in ``unscored``, in no metric; module docstring). Classes ``>= K``
        (new in this batch) count as wrong and add nothing to the log loss sum (river's
        convention).
        """
        n = int(y_true.shape[0])
        if n == 0:
            return
        if proba is None or proba.shape[1] == 0:
            self.unscored += n
            return
        if n == 1:
            self._update_one(int(y_true[0]), proba[0])
            return
        k = proba.shape[1]
        y_pred = proba.argmax(axis=1)
        top = int(y_true.max())
        p_true = proba[np.arange(n), y_true if top < k else np.minimum(y_true, k - 1)]
        # clip(p, a, b) as max then min: the same values, NaN included, without np.clip's wrapper
        losses = np.log(np.minimum(np.maximum(p_true, _EPS), 1.0 - _EPS))
        np.negative(losses, out=losses)
        if top >= k:  # a class new in this batch adds 0 (module docstring)
            losses = np.where(y_true < k, losses, 0.0)
        hits = (y_pred == y_true).view(np.int8)
        self.n += n
        self.correct += int(np.count_nonzero(hits))
        self.log_loss_sum += float(losses.sum())
        self._grow(max(top + 1, k))
        size = self.confusion.shape[0]
        counts = np.bincount(y_true * size + y_pred, minlength=size * size)
        self.confusion += counts.reshape(size, size)
        self._push(hits)

    def _update_one(self, y_true: int, proba: np.ndarray) -> None:
        """:meth:`update` for one sample with a prediction, in Python scalars (batch size 1)."""
        k = proba.shape[0]
        y_pred = int(proba.argmax())
        if y_true < k:
            p_true = min(max(float(proba[y_true]), _EPS), 1.0 - _EPS)
            self.log_loss_sum -= math.log(p_true)
        hit = int(y_pred == y_true)
        self.n += 1
        self.correct += hit
        if max(y_true + 1, k) > self.confusion.shape[0]:
            self._grow(max(y_true + 1, k))
        self.confusion[y_true, y_pred] += 1
        pos = self._ring_pos
        self._ring_hits += hit - int(self._ring[pos])
        self._ring[pos] = hit
        self._ring_pos = (pos + 1) % self.window
        self._ring_fill = min(self.window, self._ring_fill + 1)

    def _push(self, hits: np.ndarray) -> None:
        for start in range(0, hits.shape[0], self.window):
            chunk = hits[start : start + self.window]
            m = chunk.shape[0]
            end = self._ring_pos + m
            self._ring_hits += int(np.count_nonzero(chunk))  # the ring holds 0 and 1
            if end <= self.window:
                self._ring_hits -= int(np.count_nonzero(self._ring[self._ring_pos : end]))
                self._ring[self._ring_pos : end] = chunk
            else:
                first = self.window - self._ring_pos
                self._ring_hits -= int(self._ring[self._ring_pos :].sum())
                self._ring_hits -= int(self._ring[: m - first].sum())
                self._ring[self._ring_pos :] = chunk[:first]
                self._ring[: m - first] = chunk[first:]
            self._ring_pos = end % self.window
            self._ring_fill = min(self.window, self._ring_fill + m)

    def kappa(self) -> float:
        rows = np.add.reduce(self.confusion, axis=1)
        total = int(np.add.reduce(rows))
        if total == 0:
            return 0.0
        p_o = int(np.trace(self.confusion)) / total
        p_e = float(rows @ np.add.reduce(self.confusion, axis=0)) / total**2
        return 0.0 if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)

    def report(self) -> dict[str, float]:
        if self.n == 0:
            return {"accuracy": 0.0, "rolling_accuracy": 0.0, "log_loss": 0.0, "kappa": 0.0}
        rolling = self._ring_hits / self._ring_fill if self._ring_fill else 0.0
        return {
            "accuracy": self.correct / self.n,
            "rolling_accuracy": rolling,
            "log_loss": self.log_loss_sum / self.n,
            "kappa": self.kappa(),
        }

    def state(self) -> dict[str, Any]:
        # The ring buffer is stored in chronological order, oldest first.
        if self._ring_fill < self.window:
            order = self._ring[: self._ring_fill]
        else:
            order = np.roll(self._ring, -self._ring_pos)
        return {
            "window": self.window,
            "n": self.n,
            "unscored": self.unscored,
            "correct": self.correct,
            "log_loss_sum": self.log_loss_sum,
            "confusion": self.confusion.tolist(),
            "recent_hits": order.astype(int).tolist(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ClassificationMetrics:
        obj = cls(state["window"])
        obj.n, obj.correct = int(state["n"]), int(state["correct"])
        obj.unscored = int(state.get("unscored", 0))  # states written before it was kept: 0
        obj.log_loss_sum = float(state["log_loss_sum"])
        k = len(state["confusion"])
        obj.confusion = np.asarray(state["confusion"], dtype=np.int64).reshape(k, k)
        obj._push(np.asarray(state["recent_hits"], dtype=np.int8))
        return obj


class RegressionMetrics:
    """MAE, RMSE and R2 over the stream; samples without a prediction are only counted
    (``unscored``, module docstring)."""

    def __init__(self) -> None:
        self.n = 0  # scored samples
        self.unscored = 0
        self.abs_sum = 0.0
        self.sq_sum = 0.0
        self.y_mean = 0.0
        self.y_m2 = 0.0

    def update(self, y_true: np.ndarray, y_pred: np.ndarray | None) -> None:
        """Score a batch of targets against predictions; ``y_pred is None``: unscored."""
        n_b = int(y_true.shape[0])
        if n_b == 0:
            return
        if y_pred is None:
            self.unscored += n_b
            return
        err = y_true - y_pred
        self.abs_sum += float(np.abs(err).sum())
        self.sq_sum += float((err * err).sum())
        mu_b = float(y_true.mean())
        m2_b = float(((y_true - mu_b) ** 2).sum())
        n = self.n + n_b
        delta = mu_b - self.y_mean
        self.y_mean += delta * n_b / n
        self.y_m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    def report(self) -> dict[str, float]:
        if self.n == 0:
            return {"mae": 0.0, "rmse": 0.0, "r2": 0.0}
        r2 = 1.0 - self.sq_sum / self.y_m2 if self.y_m2 > 0 else 0.0
        return {"mae": self.abs_sum / self.n, "rmse": math.sqrt(self.sq_sum / self.n), "r2": r2}

    def state(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RegressionMetrics:
        obj = cls()
        obj.__dict__.update(state)  # a state written before ``unscored`` was kept leaves it 0
        return obj


def score_served_class(metrics: ClassificationMetrics, y_true: int, served: Any) -> None:
    """Score one label that arrived after its prediction was served: ``served`` holds the class
    probabilities served then, columns in the order of the classes as they were (a sequence or
    array; a class learned since has no column, so it is a miss adding 0 to the log loss sum,
    river's rule), or is ``None``/empty when no model existed (unscored)."""
    row = None if served is None else np.asarray(served, dtype=np.float64)
    if row is None or row.size == 0:
        metrics.update(np.asarray([y_true]), None)
        return
    metrics.update(np.asarray([y_true]), row.reshape(1, -1))


def score_served_value(metrics: RegressionMetrics, y_true: float, served: Any) -> None:
    """Score one regression target against the value served before it arrived (a number or a
    one-element array), or count it unscored when ``served`` is ``None``/empty."""
    value = None if served is None else np.asarray(served, dtype=np.float64).reshape(-1)
    if value is None or value.size == 0:
        metrics.update(np.asarray([y_true]), None)
        return
    metrics.update(np.asarray([y_true]), value[:1])


def score_served_classes(metrics: ClassificationMetrics, y_true: np.ndarray, served: Any) -> None:
    """:func:`score_served_class` over rows in order; one batch update when every row was
    served over the same classes (the usual case), else row by row."""
    widths = {0 if s is None else len(s) for s in served}
    if len(widths) == 1:
        width = widths.pop()
        proba = None if width == 0 else np.asarray(np.stack(served), dtype=np.float64)
        metrics.update(y_true, proba)
        return
    for y, row in zip(y_true.tolist(), served, strict=True):
        score_served_class(metrics, y, row)


def score_served_values(metrics: RegressionMetrics, y_true: np.ndarray, served: Any) -> None:
    """:func:`score_served_value` over rows in order; one batch update when every row was
    served a value (or none was)."""
    values = [None if s is None else np.asarray(s, dtype=np.float64).reshape(-1) for s in served]
    if all(v is not None and v.size for v in values):
        metrics.update(y_true, np.concatenate(values))  # type: ignore[arg-type]
        return
    for y, value in zip(y_true.tolist(), values, strict=True):
        score_served_value(metrics, y, value)
