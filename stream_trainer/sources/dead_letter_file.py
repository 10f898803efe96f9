"""Dead letters of file sources: a JSON Lines file beside the run, one rejected record a line.

A :class:`~stream_trainer.sources.protocol.DeadLetterSink`, like the Kafka one
(:class:`consumers.DeadLetterSink`). Each line keeps the original bytes (base64), the reason, the
detail and where the record came from, so nothing is lost.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from stream_trainer.records import RejectedRecord

__all__ = ["DeadLetterFile"]


class DeadLetterFile:
    """Append rejected records to ``path`` (created on the first letter)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.counts: Counter[str] = Counter()
        self._handle: TextIO | None = None

    def send_many(self, rejected: Iterable[RejectedRecord]) -> int:
        n = 0
        for r in rejected:
            if self._handle is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._handle = self.path.open("a")
            line = {
                "reason": r.reason.value,
                "detail": r.detail,
                "topic": r.topic,
                "partition": r.partition,
                "offset": r.offset,
                "raw_b64": base64.b64encode(r.raw).decode() if r.raw is not None else None,
            }
            self._handle.write(json.dumps(line) + "\n")
            self.counts[r.reason.value] += 1
            n += 1
        return n

    def flush(self, timeout_s: float | None = None) -> None:
        if self._handle is not None:
            self._handle.flush()

    def close(self, timeout_s: float | None = None) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
