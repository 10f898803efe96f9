"""Running per-column mean and variance over variable-size batches, with missing values.

For each column the state is ``(count, mean, m2)`` with ``m2 = sum((x - mean)^2)``. A batch with
``n_b`` present values, mean ``mu_b`` and ``m2_b`` is folded in with Chan et al.'s parallel update
(the same merge as ``river.stats.Var.__iadd__``)::

    n     = n_a + n_b
    delta = mu_b - mu_a
    mean  = mu_a + delta * n_b / n
    m2    = m2_a + m2_b + delta^2 * n_a * n_b / n

which gives the exact cumulative mean and variance whatever the batch sizes (one batch of n equals n
batches of 1, up to rounding). Missing values (NaN in the input matrix) are not counted. The
variance used to scale is the *biased* one, ``m2 / n``; a column with fewer than 2 values or zero
variance is scaled by 1. Standardized values are clipped to ``[-clip, clip]`` so that one outlier
cannot blow up a step; missing values become 0 (the running mean).

The statistics see what the model sees: once a column has :data:`WARMUP` values, each new value is
clipped to ``mean +- clip * std`` of the statistics before its batch, then folded in. Values within
that band (all of them, for most streams) give the exact moments above; one accepted but absurd
value (``2**62`` in a feature of scale 1) moves the mean by at most ``clip * std / n`` instead of
swamping the variance for the rest of the stream.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stream_trainer.engine.kernels import standardize_rows

__all__ = ["WARMUP", "RunningStandardizer"]

WARMUP = 16  # values a column needs before its statistics clip new ones (module docstring)
_ROW_CHECK_COLUMNS = 256  # up to this many columns a one-row batch is checked in plain Python


class RunningStandardizer:
    """Exact running standardization of a growing set of numeric columns."""

    def __init__(self, n_columns: int = 0, *, clip: float = 10.0, eps: float = 1e-12) -> None:
        self.clip = float(clip)
        self.eps = float(eps)
        self.count = np.zeros(n_columns, dtype=np.float64)
        self.mean = np.zeros(n_columns, dtype=np.float64)
        self.m2 = np.zeros(n_columns, dtype=np.float64)
        # std() and the (m2, count) arrays it was computed from: the state arrays are replaced,
        # never changed in place, so an identity check tells whether it is current.
        self._std: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def n_columns(self) -> int:
        return int(self.count.shape[0])

    def grow(self, n_columns: int) -> None:
        """Add columns (with no observations) up to ``n_columns``."""
        extra = n_columns - self.n_columns
        if extra > 0:
            pad = np.zeros(extra, dtype=np.float64)
            self.count = np.concatenate([self.count, pad])
            self.mean = np.concatenate([self.mean, pad])
            self.m2 = np.concatenate([self.m2, pad])

    def update(self, x: np.ndarray) -> None:
        """Fold a batch ``x`` of shape ``(N, n_columns)`` (NaN = missing) into the statistics.

        A batch without missing values (the common case) takes a shorter path with the same
        formulas in the same order, hence the same bits."""
        if x.shape[0] == 0:
            return
        x = self._clipped(x)
        if not math.isnan(np.add.reduce(x, axis=None)):
            self._update_complete(x)
            return
        present = ~np.isnan(x)
        n_b = present.sum(axis=0).astype(np.float64)
        seen = n_b > 0
        if not seen.any():
            return
        filled = np.where(present, x, 0.0)
        mu_b = np.divide(filled.sum(axis=0), n_b, out=np.zeros_like(n_b), where=seen)
        dev = np.where(present, x - mu_b, 0.0)
        m2_b = (dev * dev).sum(axis=0)
        n = self.count + n_b
        delta = mu_b - self.mean
        ratio = np.divide(n_b, n, out=np.zeros_like(n), where=n > 0)
        self.mean = self.mean + delta * ratio
        self.m2 = self.m2 + m2_b + delta * delta * self.count * ratio
        self.count = n

    def _clipped(self, x: np.ndarray) -> np.ndarray:
        """``x`` with each value clipped to ``mean +- clip * std`` in the columns that have
        :data:`WARMUP` values (NaN stays NaN); ``x`` itself when nothing is clipped."""
        count = self.count
        if x.shape[0] == 1 and count.size <= _ROW_CHECK_COLUMNS:
            # One record (the service's common batch): the same test in plain Python, far cheaper
            # than numpy's per-call cost on a few values. NaN compares False: left as it is.
            clip = self.clip
            rows = zip(
                x[0].tolist(), self.mean.tolist(), self.std().tolist(), count.tolist(), strict=True
            )
            if not any(n >= WARMUP and abs(v - m) > clip * sd for v, m, sd, n in rows):
                return x
        elif not count.size or count.max() < WARMUP:
            return x
        half = self.clip * self.std()
        if count.min() < WARMUP:
            half = np.where(count >= WARMUP, half, np.inf)
        if not (np.abs(x - self.mean) > half).any():  # NaN compares False: left as it is
            return x
        return np.clip(x, self.mean - half, self.mean + half)

    def _update_complete(self, x: np.ndarray) -> None:
        """:meth:`update` for a batch in which every value is present (``n_b = N``). The state
        arrays are replaced, not changed in place (:meth:`std` relies on it)."""
        rows = x.shape[0]
        n = self.count + float(rows)
        ratio = float(rows) / n
        if rows == 1:  # m2_b = 0 (m2 + 0.0 is m2)
            delta = x[0] - self.mean
            m2 = self.m2
        else:
            mu_b = np.add.reduce(x, axis=0) / float(rows)
            dev = x - mu_b
            m2 = self.m2 + np.add.reduce(dev * dev, axis=0)
            delta = mu_b - self.mean
        self.mean = self.mean + delta * ratio
        self.m2 = m2 + delta * delta * self.count * ratio
        self.count = n

    def std(self) -> np.ndarray:
        """Per-column biased standard deviation; 1 where it is not above ``eps`` or a column
        has fewer than 2 values."""
        cached = self._std
        if cached is not None and cached[0] is self.m2 and cached[1] is self.count:
            return cached[2]
        var = np.divide(self.m2, self.count, out=np.zeros_like(self.m2), where=self.count > 1)
        std = np.sqrt(var)
        std = np.where(std > self.eps, std, 1.0)
        self._std = (self.m2, self.count, std)
        return std

    def standardize_into(
        self, x: np.ndarray, out: np.ndarray, columns: np.ndarray, *, learn: bool
    ) -> None:
        """``out[:, columns] =`` the standardized ``x`` (raw float64 rows, NaN = missing), after
        :meth:`update` with ``x`` when ``learn``: what :meth:`update` then
        :meth:`transform` give, bit for bit, in one compiled call
        (:func:`stream_trainer.engine.kernels.standardize_rows`)."""
        self._std = None  # the kernel changes the state arrays in place
        standardize_rows(
            x, self.count, self.mean, self.m2, self.clip, self.eps, float(WARMUP), learn, out,
            columns,
        )  # fmt: skip

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardize ``x`` (NaN = missing -> 0) with the current statistics."""
        z = x - self.mean
        z /= self.std()
        np.copyto(z, 0.0, where=np.isnan(z))
        np.minimum(z, self.clip, out=z)
        return np.maximum(z, -self.clip, out=z)

    def state(self) -> dict[str, Any]:
        return {
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "clip": self.clip,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunningStandardizer:
        obj = cls(0, clip=state["clip"])
        obj.count = np.asarray(state["count"], dtype=np.float64)
        obj.mean = np.asarray(state["mean"], dtype=np.float64)
        obj.m2 = np.asarray(state["m2"], dtype=np.float64)
        return obj
