r"""Synchronized statistics and gradients: the three places where replicas must agree on numbers.

Notation: replica :math:`r` holds :math:`n_r` labelled rows of the step, :math:`N = \sum_r n_r`,
and computes the *mean* loss :math:`L_r` over its rows; the global objective is the mean loss over
all :math:`N` rows, :math:`L = \sum_r \frac{n_r}{N} L_r` (what one process would minimize on the
concatenated batch).

* :class:`GradientAllReduce` (the trainer's ``gradient_sync`` hook): after ``backward``,
  :math:`g \leftarrow \frac{1}{N}\sum_r n_r\, g_r`, one flat all-reduce of every gradient plus
  :math:`n_r` (so a replica with no rows contributes zero). Every replica then clips, scales the
  learning rate with :math:`N` and steps on the same gradient: identical weights.
* :class:`SynchronizedMomentReducer` (every norm layer's ``moment_reducer``): the per-feature
  :math:`(n, S_1, S_2) = (n, \sum x, \sum x^2)` are summed over the replicas, so
  :math:`\mu_B = S_1/n` and :math:`\sigma_B^2 = S_2/n - \mu_B^2` are the moments of the
  concatenated batch (float64 sums, as in :mod:`stream_trainer.norms._moments`). The backward is
  exact too: the output of every replica depends on the *global* sums, so
  :math:`\partial L / \partial S = \sum_q \frac{n_q}{N} \partial L_q / \partial S`; because the
  gradient all-reduce later weighs replica :math:`r`'s gradient by :math:`n_r/N`, the backward
  returns :math:`G_r = \frac{1}{n_r}\sum_q n_q\,\partial L_q/\partial S` (zero when
  :math:`n_r = 0`). Together the two give exactly the single-process gradient (up to float
  rounding): see ``tests/test_distributed.py``.
* :class:`SynchronizedStandardizer` (the feature encoder's and the regression target's running
  standardizer): each replica reduces its batch to :math:`(n_b, \mu_b, M_{2,b})` per column; the
  replicas all-gather them and merge them in rank order with Chan's formula, then fold the merged
  batch into the running state, so the statistics equal those of the concatenated batch.

The reducer is *inactive* (the identity) except while :class:`~stream_trainer.distributed.trainer.
DistributedTrainer` runs a training forward/backward in lock-step, so telemetry that runs a norm
layer in training mode on one replica (``train_serve_gap``) never enters a collective alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stream_trainer.distributed.collectives import Collectives
from stream_trainer.features import RunningStandardizer

__all__ = ["GradientAllReduce", "SynchronizedMomentReducer", "SynchronizedStandardizer"]


class _AllReduceMoments(torch.autograd.Function):
    """Sum ``(count, s1, s2)`` over replicas; backward as in the module docstring."""

    @staticmethod
    def forward(
        ctx: Any, count: Tensor, s1: Tensor, s2: Tensor, weight: float, comm: Collectives
    ) -> tuple[Tensor, Tensor, Tensor]:
        packed = torch.stack([count, s1.detach(), s2.detach()])
        if weight == 0.0:  # a replica without rows runs a placeholder row: it contributes nothing
            packed.zero_()
        comm.all_reduce_(packed)
        ctx.weight, ctx.comm = weight, comm
        return packed[0], packed[1], packed[2]

    @staticmethod
    def backward(
        ctx: Any, _g_count: Tensor, g1: Tensor | None, g2: Tensor | None
    ) -> tuple[None, Tensor, Tensor, None, None]:
        like = g1 if g1 is not None else g2
        assert like is not None
        grads = torch.stack(
            [
                g1 if g1 is not None else torch.zeros_like(like),
                g2 if g2 is not None else torch.zeros_like(like),
            ]
        )
        weight = ctx.weight
        grads.mul_(weight)
        ctx.comm.all_reduce_(grads)
        if weight == 0.0:
            grads.zero_()
        else:
            grads.div_(weight)
        return None, grads[0], grads[1], None, None


class SynchronizedMomentReducer:
    """A :data:`~stream_trainer.norms.MomentReducer` that all-reduces while :attr:`active`.

    ``placeholder=True`` marks a replica that runs a one-row placeholder batch because it has no
    labelled rows this step: its sums are replaced by zeros (and its gradient by zero).
    """

    def __init__(self, comm: Collectives) -> None:
        self.comm = comm
        self.active = False
        self.placeholder = False

    @property
    def is_identity(self) -> bool:
        """True while calls return their arguments unchanged (the compiled engine reads it; see
        :func:`~stream_trainer.norms._moments.reducer_is_identity`)."""
        return not self.active or self.comm.world_size == 1

    def __call__(self, count: Tensor, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.is_identity:
            return count, s1, s2
        weight = 0.0 if self.placeholder else float(count[0].item())
        return _AllReduceMoments.apply(count, s1, s2, weight, self.comm)

    @contextmanager
    def synchronized(self, *, placeholder: bool = False) -> Any:
        self.active, self.placeholder = True, placeholder
        try:
            yield self
        finally:
            self.active, self.placeholder = False, False


class GradientAllReduce:
    """The trainer's ``gradient_sync`` hook: :math:`g \\leftarrow \\sum_r n_r g_r / N`.

    One all-reduce of a flat float32 buffer (every gradient times :math:`n_r`, then :math:`n_r`).
    Parameters without a gradient (not in the graph) keep ``None`` on every replica: the graphs
    are the same. ``placeholder`` (set by the trainer) makes this replica's weight 0. ``calls`` and
    ``seconds`` count the all-reduces (for the benchmark).
    """

    def __init__(self, comm: Collectives) -> None:
        self.comm = comm
        self.placeholder = False
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, params: list[nn.Parameter], rows: int) -> int:
        import time

        if self.comm.world_size == 1:
            return rows
        weight = 0.0 if self.placeholder else float(rows)
        grads = [p.grad for p in params if p.grad is not None]
        t0 = time.perf_counter()
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.ones(1)])
        flat.mul_(weight)
        self.comm.all_reduce_(flat)
        total = float(flat[-1].item())
        if total > 0:
            flat.div_(total)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return round(total)


def _chan_merge(
    a: tuple[np.ndarray, np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chan et al.'s merge of two ``(count, mean, m2)`` per column (the standardizer's update)."""
    n_a, mu_a, m2_a = a
    n_b, mu_b, m2_b = b
    n = n_a + n_b
    delta = mu_b - mu_a
    ratio = np.divide(n_b, n, out=np.zeros_like(n), where=n > 0)
    return n, mu_a + delta * ratio, m2_a + m2_b + delta * delta * n_a * ratio


class SynchronizedStandardizer(RunningStandardizer):
    """A :class:`~stream_trainer.features.RunningStandardizer` whose :meth:`update` folds in the
    *global* batch: per-replica ``(n_b, mu_b, m2_b)`` are all-gathered and Chan-merged in rank
    order, then merged into the running state. Every replica must call :meth:`update` at the same
    point of the step (a replica without rows passes an empty ``(0, n_columns)`` batch). The state
    (and the checkpoint format) is the parent's."""

    def __init__(self, comm: Collectives, n_columns: int = 0, **kwargs: Any) -> None:
        super().__init__(n_columns, **kwargs)
        self.comm = comm

    @classmethod
    def wrap(cls, comm: Collectives, plain: RunningStandardizer) -> SynchronizedStandardizer:
        obj = cls(comm, 0, clip=plain.clip, eps=plain.eps)
        obj.count, obj.mean, obj.m2 = plain.count.copy(), plain.mean.copy(), plain.m2.copy()
        return obj

    def standardize_into(
        self, x: np.ndarray, out: np.ndarray, columns: np.ndarray, *, learn: bool
    ) -> None:
        """The parent's contract with the global :meth:`update` (a collective when ``learn``)."""
        if learn:
            self.update(x)
        out[:, columns] = self.transform(x)

    def update(self, x: np.ndarray) -> None:
        x = self._clipped(x)  # against the running state, the same on every replica
        present = ~np.isnan(x)
        n_b = present.sum(axis=0).astype(np.float64)
        filled = np.where(present, x, 0.0)
        mu_b = np.divide(filled.sum(axis=0), n_b, out=np.zeros_like(n_b), where=n_b > 0)
        dev = np.where(present, x - mu_b, 0.0)
        m2_b = (dev * dev).sum(axis=0)
        parts = self.comm.all_gather(torch.from_numpy(np.stack([n_b, mu_b, m2_b])))
        zeros = np.zeros(self.n_columns, dtype=np.float64)
        merged = (zeros, zeros, zeros)
        for part in parts:
            p = part.numpy()
            merged = _chan_merge(merged, (p[0], p[1], p[2]))
        if not (merged[0] > 0).any():
            return
        self.count, self.mean, self.m2 = _chan_merge((self.count, self.mean, self.m2), merged)
