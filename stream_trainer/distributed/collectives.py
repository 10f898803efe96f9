"""The few collectives the data-parallel trainer needs, on an injected :class:`Collectives`.

Nothing here pickles: torch's ``*_object`` collectives are never used. Names, labels and offsets
travel as UTF-8 JSON in ``uint8`` tensors (:meth:`Collectives.all_gather_json`: an all-gather of
the lengths, then of the padded bytes), numbers as float64 / int64 tensors.

:class:`Collectives` wraps ``torch.distributed`` (``group=None``: the default process group);
:class:`LocalCollectives` is the world of one (every collective is the identity), so the same code
runs in a single process and the tests of the single-process equivalence need no process group.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Collectives", "LocalCollectives"]


class Collectives:
    """Collectives over ``torch.distributed`` (already initialized) for this process's rank."""

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            msg = "torch.distributed is not initialized (see distributed.init_process_group)"
            raise RuntimeError(msg)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    # ------------------------------------------------------------------ tensors
    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (``"sum"`` or ``"max"``); returns ``tensor``."""
        dist.all_reduce(tensor, op=_OPS[op], group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """One tensor per rank (all the same shape), in rank order."""
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous(), group=self.group)
        return out

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src=src, group=self.group)
        return tensor

    # ------------------------------------------------------------------ derived
    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order (two collectives: lengths, then padded bytes)."""
        lengths = self.all_gather(torch.tensor([len(data)], dtype=torch.int64))
        sizes = [int(t.item()) for t in lengths]
        buf = torch.zeros(max(max(sizes), 1), dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return [t[:n].numpy().tobytes() for t, n in zip(self.all_gather(buf), sizes, strict=True)]

    def all_gather_json(self, value: Any) -> list[Any]:
        """Every rank's JSON-serializable ``value``, in rank order (no pickling)."""
        payload = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        return [json.loads(b.decode()) for b in self.all_gather_bytes(payload)]

    def all_gather_rows(self, rows: np.ndarray, counts: list[int]) -> np.ndarray:
        """Concatenate every rank's float64 ``rows`` ``(counts[rank], k)`` in rank order."""
        width = rows.shape[1]
        buf = torch.zeros((max(max(counts), 1), width), dtype=torch.float64)
        if rows.shape[0]:
            buf[: rows.shape[0]] = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float64))
        parts = self.all_gather(buf)
        return np.concatenate([p[:n].numpy() for p, n in zip(parts, counts, strict=True)], axis=0)


class LocalCollectives(Collectives):
    """The world of one process: every collective returns its input."""

    def __init__(self) -> None:
        self.group = None
        self.rank = 0
        self.world_size = 1

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor.clone()]

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX} if dist.is_available() else {}
