r"""Serving a mixture of experts weighted by their discounted prequential losses.

The trainer runs its MLP members (one by default; one per norm momentum with
``member_momenta``) and, by default, an online linear model
(:class:`~stream_trainer.model.linear_expert.LinearExpert`) on the same inputs; every step scores
each one on the labelled records *before* they learn from them (the same test-then-train order as
the metrics) and serves the weighted average of their predictions. The experts are named by
:func:`expert_names`: ``mlp`` (one member) or ``mlp0``, ``mlp1``, ... (members in the order of
``member_momenta``), then ``linear``.

**Weights** (exponentially weighted average forecaster with discounting; Cesa-Bianchi & Lugosi,
*Prediction, Learning, and Games*, 2006, ch. 2-3). Expert :math:`k` carries a discounted loss

.. math::

    L_k \leftarrow \gamma^{n} L_k + \sum_{i \in \text{batch}} \ell_k(i), \qquad
    w_k = \frac{\exp(-\eta L_k)}{\sum_j \exp(-\eta L_j)}

for a batch of :math:`n` labelled records (the discount counts samples, as the norms' momentum
does, so the weights do not depend on how the stream was cut into batches beyond the order of
updates), :math:`\gamma` = :data:`DISCOUNT` (a memory of about :math:`1/(1-\gamma)` = 1,000
records, so the mixture follows a drift that changes which expert is better), :math:`\eta` =
:data:`ETA` = 0.5.

- Classification: :math:`\ell_k(i) = [\arg\max_c p_k(c \mid x_i) \ne y_i]`, the 0/1 loss of the
  metric users watch, and the served probabilities are :math:`\sum_k w_k p_k`. An expert six
  errors behind the other over the last thousand records or so weighs about 5 %, so the mixture
  follows whichever expert has been more *accurate* lately, and averages the two while they are
  about even. (Not the log loss, i.e. Bayesian model averaging: it follows the better-calibrated
  expert rather than the more accurate one; docs/decisions.md.) A class that no expert knows yet
  (first seen in this batch) is an error for both, so it moves no weight.
- Regression: :math:`\ell_k(i) = \tfrac12 (\hat z_k(i) - z_i)^2` in standardized target units
  (with :math:`\eta` = 0.5, the weights of a Gaussian likelihood of variance 2), and the served
  value is :math:`\sum_k w_k \hat z_k` de-standardized.

Before any label the weights are equal. The losses are part of the trainer's checkpoint.

With members that differ in their norm's memory, the same weights choose the stream's time scale
online: a member whose statistics follow the drift at the right speed makes fewer errors, and
within about a thousand records it carries the served prediction (docs/decisions.md).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stream_trainer.engine.kernels import argmax_errors

__all__ = [
    "DISCOUNT",
    "ETA",
    "ExpertMixture",
    "classification_losses",
    "expert_names",
    "regression_losses",
    "softmax64",
]

DISCOUNT = 0.999
ETA = 0.5
# Chosen with the linear expert's step size (docs/decisions.md, "The linear expert"): a faster
# rate or a shorter memory flips the mixture back and forth where the experts are about even.


def expert_names(members: int, linear: bool) -> tuple[str, ...]:
    """The experts of a trainer with ``members`` MLP members and (``linear``) a linear expert."""
    mlps = ("mlp",) if members == 1 else tuple(f"mlp{k}" for k in range(members))
    return (*mlps, "linear") if linear else mlps


def softmax64(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (what ``torch.softmax(out.double(), 1)`` computes)."""
    out = logits.astype(np.float64)
    out -= out.max(axis=1, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out


def classification_losses(probas: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per row and expert, the 0/1 loss of the arg-max of the expert's probabilities ``probas[m]``
    (``probas``: ``(M, N, C)``; 1: wrong), ``(N, M)``. A class index beyond the columns (a class
    first seen in this batch) can never be the arg-max: an error."""
    losses = np.ones((target.shape[0], probas.shape[0]))
    if probas.shape[2]:
        rows = np.arange(target.shape[0])
        argmax_errors(probas, rows, np.asarray(target, dtype=np.int64), losses)
    return losses


def regression_losses(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-row :math:`\\tfrac12 (\\hat z - z)^2` (standardized units)."""
    err = pred - target
    return 0.5 * err * err


class ExpertMixture:
    """Discounted exponential weights over the experts ``names`` (module docstring)."""

    def __init__(self, names: tuple[str, ...], losses: np.ndarray | None = None) -> None:
        self.names = tuple(names)
        self.losses = np.zeros(len(names)) if losses is None else np.asarray(losses, float)
        if self.losses.shape != (len(names),):
            raise ValueError(f"{len(names)} experts {names!r} need as many losses")
        self._weights = self._compute_weights()

    def _compute_weights(self) -> np.ndarray:
        # A handful of experts: plain Python costs less than numpy's per-call overhead.
        z = [-ETA * loss for loss in self.losses.tolist()]
        top = max(z)
        w = [math.exp(v - top) for v in z]
        total = sum(w)
        return np.array([v / total for v in w])

    def weights_view(self) -> np.ndarray:
        """The weights themselves (read-only use: replaced, never changed, by :meth:`observe`)."""
        return self._weights

    def weights(self) -> np.ndarray:
        """:math:`w_k \\propto \\exp(-\\eta L_k)`, summing to 1 (a copy)."""
        return self._weights.copy()

    def observe(self, loss_sums: np.ndarray, rows: int) -> None:
        """Fold in one batch: the experts' summed losses over its ``rows`` labelled records."""
        keep = DISCOUNT**rows
        sums = loss_sums.tolist()
        self.losses = np.array(
            [v * keep + s for v, s in zip(self.losses.tolist(), sums, strict=True)]
        )
        self._weights = self._compute_weights()

    def mix(self, outputs: list[np.ndarray]) -> np.ndarray:
        """The weighted average of the experts' outputs (probabilities or standardized values)."""
        w = self._weights.tolist()
        mixed = outputs[0] * w[0]
        for weight, out in zip(w[1:], outputs[1:], strict=True):
            mixed += out * weight
        return mixed

    def state(self) -> dict[str, Any]:
        return {"experts": list(self.names), "losses": [float(v) for v in self.losses]}

    @classmethod
    def from_state(cls, state: dict[str, Any], names: tuple[str, ...]) -> ExpertMixture:
        """The mixture of ``state`` for the experts ``names``. A state saved without a linear
        expert named one anyway (``mlp``, ``linear``): its MLP loss is kept."""
        stored = tuple(state.get("experts", ()))
        losses = list(state["losses"])
        if stored == ("mlp", "linear") and names == ("mlp",):
            stored, losses = names, losses[:1]
        if stored != names:
            raise ValueError(f"mixture state names experts {list(stored)!r}, not {list(names)!r}")
        return cls(names, np.asarray(losses, dtype=np.float64))
