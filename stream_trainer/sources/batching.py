"""Mini-batch sizes: fixed, or drawn per batch from a seeded distribution.

``BatchSizes.parse("32")`` gives batches of 32. ``BatchSizes.parse("1:64")`` draws every batch size
independently from a *log-uniform* distribution on the integers ``1..64`` (``round(exp(U(log 1,
log 64.5)))``, clipped), which reproduces what a Kafka consumer sees: mostly small batches, now and
then a large one (median about 8 for 1:64). The draws depend only on the seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from stream_trainer.errors import ConfigError

__all__ = ["BatchSizes", "iter_batches"]

T = TypeVar("T")


@dataclass(frozen=True)
class BatchSizes:
    """Inclusive range of batch sizes; ``low == high`` means a fixed size."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low < 1 or self.high < self.low:
            msg = f"batch sizes must satisfy 1 <= MIN <= MAX, got {self.low}:{self.high}"
            raise ConfigError(msg)

    @classmethod
    def parse(cls, text: str | int) -> BatchSizes:
        """Parse ``"N"`` or ``"MIN:MAX"``."""
        if isinstance(text, int):
            return cls(text, text)
        low, sep, high = str(text).partition(":")
        try:
            return cls(int(low), int(high)) if sep else cls(int(low), int(low))
        except ValueError:
            raise ConfigError(f"batch sizes must be N or MIN:MAX, got {text!r}") from None

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def __str__(self) -> str:
        return str(self.low) if self.fixed else f"{self.low}:{self.high}"

    def sizes(self, seed: int) -> Iterator[int]:
        """An endless iterator of batch sizes, deterministic in ``seed``."""
        if self.fixed:
            while True:
                yield self.low
        rng = random.Random(seed)
        lo, hi = math.log(self.low), math.log(self.high + 0.5)
        while True:
            yield min(self.high, max(self.low, round(math.exp(rng.uniform(lo, hi)))))


def iter_batches(items: Iterable[T], sizes: Iterator[int]) -> Iterator[list[T]]:
    """Cut ``items`` into consecutive lists whose lengths follow ``sizes`` (the last may be
    short)."""
    iterator = iter(items)
    for size in sizes:
        batch = []
        for item in iterator:
            batch.append(item)
            if len(batch) == size:
                break
        if not batch:
            return
        yield batch
        if len(batch) < size:
            return
