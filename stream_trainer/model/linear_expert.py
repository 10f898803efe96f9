r"""An online linear model trained with Adagrad: the second expert beside the MLP.

**Why.** On streams whose concept is linear (river's SEA, Hyperplane, LED) the MLP trained with
Adam keeps a noise floor that a per-record logistic regression does not have: it scores under
river's ``LogisticRegression`` there (``python bench/bench_baselines.py``). A linear
model with a per-coordinate step size that shrinks as gradients accumulate (Adagrad) converges on
such a concept in a few hundred records and then stays put. The trainer runs one beside the MLP on
the same standardized inputs and serves a mixture of the two
(:mod:`stream_trainer.training.mixture`), so the stream decides which one it listens to.

**Model.** Logits :math:`z = W x + b` with :math:`W \in \mathbb{R}^{K \times D}`. Classification:
softmax over the :math:`K` classes seen so far, batch-mean cross-entropy (multinomial logistic
regression, not one-vs-rest). Regression (:math:`K = 1`): :math:`z` predicts the standardized
target, loss :math:`\tfrac12 (z - y)^2` averaged over the batch. Parameters start at zero (the
loss is convex: no symmetry to break), so the first prediction is uniform (or the running mean).

**Update** (Adagrad, Duchi et al. 2011) after *each record*, in the order of the batch, with
:math:`g` the gradient of that record's loss:

.. math::

    G \leftarrow G + g^2, \qquad
    \theta \leftarrow \theta - \eta\, \frac{g}{\sqrt{G} + \epsilon}

with :math:`\eta` = :data:`EXPERT_LR` and :math:`\epsilon = 10^{-8}`, for :math:`W` and :math:`b`
alike. A batch of :math:`n` records is :math:`n` steps, so the expert computes the same function of
the stream whatever its batching (only the predictions, made before the batch, see less). This is
what lets it match a per-record logistic regression at ``--batch-sizes 1:64``, where one step on
the batch-mean gradient does not (docs/decisions.md). The per-row steps run compiled
(:func:`stream_trainer.engine.kernels.adagrad_rows`).

**Growth.** New input columns (features or categories appearing mid-stream) and new classes add
zero weights and zero accumulators: the logits of the old classes do not change and a new class
starts at logit 0.

Parameters and accumulators are float64 ``torch`` tensors with numpy views, so checkpoints read
them without copies. A distributed trainer gathers the labelled rows of the global batch and runs
:meth:`LinearExpert.learn` on them on every replica: the same steps in the same order as one
process on the concatenated batch.
"""

from __future__ import annotations

import numpy as np
import torch

from stream_trainer.engine.kernels import adagrad_rows

__all__ = ["EXPERT_LR", "MAX_STEPS", "LinearExpert"]

EXPERT_LR = 0.07
"""Adagrad's step size (see the module docstring): the largest smallest margin over river's
``LogisticRegression`` on linear streams (docs/decisions.md, "The linear expert")."""
MAX_STEPS = 64
"""Most Adagrad steps one batch takes (see the module docstring): batches up to this size are
stepped record by record, larger ones in that many chunks, so the cost of a batch is bounded."""
_EPS = 1e-8
_STATE = ("weight", "bias", "sum_sq_weight", "sum_sq_bias")


class LinearExpert:
    """Multinomial logistic regression (or linear regression) with per-record Adagrad (module
    docstring).

    The bias is stored as the last column of one float64 matrix ``[W | b]`` (and Adagrad's sums
    of squares likewise), so a record's step is one outer product and one update; ``weight``,
    ``bias``, ``sum_sq_weight`` and ``sum_sq_bias`` come out as torch tensors through
    :meth:`state_tensors`.
    """

    def __init__(self, in_features: int, out_features: int, *, regression: bool) -> None:
        self.regression = regression
        self._theta = np.zeros((out_features, in_features + 1))
        self._sum_sq = np.zeros_like(self._theta)

    @property
    def in_features(self) -> int:
        return self._theta.shape[1] - 1

    @property
    def out_features(self) -> int:
        return self._theta.shape[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """:math:`x W^\\top + b` in float64 for rows ``x`` (columns beyond the model's are
        ignored, missing ones read as zero)."""
        theta = self._theta
        d = theta.shape[1] - 1
        if x.shape[1] != d:
            d = min(d, x.shape[1])
            x = x[:, :d]
        out: np.ndarray = x @ theta[:, :d].T  # float64: theta's type wins
        out += theta[:, -1]
        return out

    def learn(self, x: np.ndarray, y: np.ndarray) -> None:
        """Adagrad steps on the rows of ``x`` in order (``y``: class indices, or standardized
        targets): one per row for a batch of up to :data:`MAX_STEPS` rows, else one per chunk of
        ``ceil(n / MAX_STEPS)`` consecutive rows (module docstring)."""
        n, d = x.shape
        if n == 0:
            return
        if d != self.in_features:
            self.grow(d, self.out_features)
        chunk = -(-n // MAX_STEPS)
        if chunk > 1:
            rows = np.empty((n, d + 1))
            rows[:, :d] = x
            rows[:, d] = 1.0
            for start in range(0, n, chunk):
                self._chunk_step(rows[start : start + chunk], y[start : start + chunk])
            return
        labels = np.zeros(1, np.int64) if self.regression else np.asarray(y, dtype=np.int64)
        targets = np.asarray(y, dtype=np.float64) if self.regression else np.zeros(1)
        adagrad_rows(
            self._theta, self._sum_sq, np.ascontiguousarray(x, dtype=np.float64), labels, targets,
            self.regression, EXPERT_LR, _EPS,
        )  # fmt: skip

    def _chunk_step(self, rows: np.ndarray, y: np.ndarray) -> None:
        """One step for a chunk of rows: their summed gradient at the current parameters, and
        each row's squared gradient added to the accumulator (for one row: the per-row step)."""
        z = rows @ self._theta.T
        if self.regression:
            dz = z - y[:, None]
        else:
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=1, keepdims=True)
            z[np.arange(rows.shape[0]), y] -= 1.0
            dz = z
        self._sum_sq += (dz * dz).T @ (rows * rows)
        self._theta -= EXPERT_LR * (dz.T @ rows) / (np.sqrt(self._sum_sq) + _EPS)

    def grow(self, in_features: int, out_features: int) -> None:
        """Add zero input columns (before the bias) and zero class rows; never shrinks."""
        k0, d0 = self.out_features, self.in_features
        d, k = max(in_features, d0), max(out_features, k0)
        if (k, d) == (k0, d0):
            return
        for name in ("_theta", "_sum_sq"):
            old = getattr(self, name)
            new = np.zeros((k, d + 1))
            new[:k0, :d0] = old[:, :-1]
            new[:k0, -1] = old[:, -1]
            setattr(self, name, new)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``weight``, ``bias`` and Adagrad's ``sum_sq_weight``, ``sum_sq_bias`` (copies, split off
        the stored ``[W | b]`` matrices)."""
        out = {}
        for prefix, store in (("", self._theta), ("sum_sq_", self._sum_sq)):
            out[f"{prefix}weight"] = torch.from_numpy(store[:, :-1].copy())
            out[f"{prefix}bias"] = torch.from_numpy(store[:, -1].copy())
        return out

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], *, regression: bool) -> LinearExpert:
        """The expert :meth:`state_tensors` describes; a missing tensor or a shape that does not
        match the weight's raises ``ValueError``."""
        missing = [name for name in _STATE if name not in tensors]
        if missing:
            raise ValueError(f"linear expert state lacks {', '.join(missing)}")
        weight = tensors["weight"]
        if weight.dim() != 2:
            raise ValueError(f"linear expert weight: shape {tuple(weight.shape)}, expected 2-D")
        k, d = weight.shape
        expected = {"weight": (k, d), "bias": (k,), "sum_sq_weight": (k, d), "sum_sq_bias": (k,)}
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"linear expert {name}: shape {tuple(tensors[name].shape)}, expected {shape}"
                )
        expert = cls(d, k, regression=regression)
        for store, w, b in (
            (expert._theta, "weight", "bias"),
            (expert._sum_sq, "sum_sq_weight", "sum_sq_bias"),
        ):
            store[:, :-1] = tensors[w].to(torch.float64).numpy()
            store[:, -1] = tensors[b].to(torch.float64).numpy()
        return expert
