r"""Batch moments and the sample-counted running-moment update shared by the batch-family layers.

Three pieces (and their fast-path variants), used by :class:`~stream_trainer.norms.batch.BatchNorm`,
:class:`~stream_trainer.norms.batch.EMABatchNorm`, :class:`~stream_trainer.norms.batch.BatchRenorm`
and :class:`~stream_trainer.norms.online.OnlineNorm`:

* :func:`batch_moments` reduces a batch to per-feature sums
  :math:`(n, S_1, S_2) = (n, \sum_i x_i, \sum_i x_i^2)` (over ``N`` and ``L``), passes them through
  a :data:`MomentReducer` (identity by default, an all-reduce under ``torch.distributed``) and
  returns :math:`\mu_B = S_1 / n` and the *biased* :math:`\sigma_B^2 = S_2 / n - \mu_B^2`.
  The sums are accumulated in float64 so that the cancellation in :math:`S_2/n - \mu_B^2` loses
  nothing for float32 inputs whose mean is up to ~1e4 standard deviations from zero; the result is
  differentiable (the gradient flows through :math:`S_1` and :math:`S_2`). (The compiled engine,
  :mod:`stream_trainer.engine`, takes shifted two-pass moments in the input dtype instead.)
* :func:`sample_weight` turns a per-sample momentum :math:`m` into the weight of a batch of
  :math:`n` samples, :math:`a_n = 1 - (1 - m)^n`, optionally raised to :math:`n / (t + n)` (warm
  start, :math:`t` = samples seen so far; :math:`1/2` for a first batch of one sample, see
  :func:`sample_weight`); :func:`sample_weight_value` is the same for one count as a Python
  float.
* :func:`mixture_update` merges the running moments with the batch moments as a two-component
  mixture:

  .. math::

      \mu' = (1 - a)\,\mu + a\,\mu_B, \qquad
      \sigma'^2 = (1 - a)\,\sigma^2 + a\,\sigma_B^2 + a (1 - a) (\mu_B - \mu)^2 .

  With :math:`a = n / (t + n)` this is Chan et al.'s exact pooled mean and biased variance (the
  merge River's ``stats.Var`` does); with :math:`n = 1` (:math:`\sigma_B^2 = 0`) it is the
  exponentially weighted variance update :math:`\sigma'^2 = (1-m)\,(\sigma^2 + m (x - \mu)^2)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BatchMoments",
    "MomentReducer",
    "batch_moments",
    "identity_moment_reducer",
    "mixture_update",
    "reduce_dims",
    "reducer_is_identity",
    "sample_weight",
    "sample_weight_value",
]

MomentReducer = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
"""``(count, sum, sum_of_squares) -> (count, sum, sum_of_squares)``, all float64 of shape ``(C,)``.

The sums are raw (not shifted), so an element-wise all-reduce (``SUM``) of the three tensors is a
correct reducer. A reducer object may have a boolean attribute ``is_identity``: while it is
``True`` the reducer promises to return its arguments unchanged, and the compiled engine may train
``ema_batch`` / ``batch_renorm`` without it (:func:`reducer_is_identity`)."""


def identity_moment_reducer(count: Tensor, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The single-process reducer: returns its arguments unchanged."""
    return count, s1, s2


def reducer_is_identity(reducer: MomentReducer) -> bool:
    """Whether ``reducer`` returns its arguments unchanged right now: it is
    :func:`identity_moment_reducer`, or its ``is_identity`` attribute is ``True``."""
    return reducer is identity_moment_reducer or getattr(reducer, "is_identity", False) is True


class BatchMoments(NamedTuple):
    """Per-feature moments of one (reduced) batch, float64, shape ``(C,)``."""

    n: Tensor
    """Number of samples per feature after the reducer (float64)."""
    mean: Tensor
    var: Tensor
    """Biased variance :math:`S_2 / n - \\mu_B^2`, clamped at 0."""


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """Dimensions the statistics are taken over: ``(0,)`` for ``(N, C)``, ``(0, 2)`` for
    ``(N, C, L)``."""
    return (0,) if x.dim() == 2 else (0, 2)


def batch_moments(x: Tensor, reducer: MomentReducer = identity_moment_reducer) -> BatchMoments:
    """Per-feature count, mean and biased variance of ``x`` after ``reducer``.

    Differentiable with respect to ``x``. ``x`` must have at least one sample.
    """
    dims = reduce_dims(x)
    acc = x if x.dtype == torch.float64 else x.to(torch.float64)
    per_feature = x.numel() // x.shape[1]
    count = torch.full((x.shape[1],), float(per_feature), dtype=torch.float64, device=x.device)
    s1 = acc.sum(dim=dims)
    s2 = (acc * acc).sum(dim=dims)
    count, s1, s2 = reducer(count, s1, s2)
    mean = s1 / count
    var = (s2 / count - mean * mean).clamp_min(0.0)
    return BatchMoments(count, mean, var)


def sample_weight(
    count: Tensor, samples_seen: Tensor, momentum: float, *, warm_start: bool
) -> Tensor:
    r"""Weight of a batch of ``count`` samples: :math:`a = 1 - (1 - m)^n`, or with ``warm_start``
    :math:`a = \max(1 - (1 - m)^n,\ n / (t + n))`, except that a *first batch of one sample*
    (:math:`t = 0, n = 1`) gets :math:`a = 1/2`: a variance estimated from one value is 0, and
    the next serving forward would divide by :math:`\sqrt\epsilon` (a regression stream served
    one record at a time predicted the second record thousands of units off). So a lone first
    sample is mixed half and half with the initial moments (mean 0, variance 1); from then on
    the two share one sample's weight, :math:`1/t` after :math:`t` samples.

    ``count`` is float64 ``(C,)``, ``samples_seen`` (:math:`t`) an int64 scalar tensor. Computed as
    ``-expm1(n * log1p(-m))`` so that tiny momenta keep their precision; ``m = 1`` gives ``a = 1``.
    """
    if momentum >= 1.0:
        a = torch.ones_like(count)
    else:
        a = -torch.expm1(count * torch.log1p(torch.tensor(-momentum, dtype=torch.float64)))
    if warm_start:
        seen = samples_seen.to(count.dtype)
        a = torch.maximum(a, count / (seen + count + (seen == 0) * (count == 1)))
    return a


def sample_weight_value(
    count: int, samples_seen: int, momentum: float, *, warm_start: bool
) -> float:
    """:func:`sample_weight` for one count shared by every feature, as a Python float (the same
    float64 formula, with :mod:`math` instead of tensors)."""
    a = 1.0 if momentum >= 1.0 else -math.expm1(count * math.log1p(-momentum))
    if warm_start:
        lone_first = samples_seen == 0 and count == 1
        a = max(a, count / (float(samples_seen) + count + lone_first))
    return a


def mixture_update(
    mean: Tensor, var: Tensor, batch_mean: Tensor, batch_var: Tensor, a: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Merge running and batch moments as a mixture with weights :math:`(1 - a, a)`.

    :math:`\mu' = (1-a)\mu + a\mu_B`, :math:`\sigma'^2 = (1-a)\sigma^2 + a\sigma_B^2 +
    a(1-a)(\mu_B-\mu)^2`. Gradients flow into whichever arguments carry them; the callers pass the
    running moments detached.
    """
    delta = batch_mean - mean
    new_mean = mean + a * delta
    new_var = (1.0 - a) * var + a * batch_var + a * (1.0 - a) * delta * delta
    return new_mean, new_var
