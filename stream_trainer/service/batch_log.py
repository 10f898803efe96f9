"""The batch log: which records each training step took, so a run can be replayed bit for bit.

One JSON line per trained step::

    {"step": 17, "segments": [["clicks:0", 120, 128], ["clicks:2", 40, 43]]}

Each segment is ``[partition key, first offset, next offset]``: the step trained the accepted
records of that partition with ``first <= offset < next``, segments in the order the trainer saw
them. Replaying a recording with this log (``run --source REC.jsonl --replay-batches LOG``) cuts
exactly the same batches, and with the same seed gives bit-identical weights.

After a crash the service truncates the log to the steps its checkpoint covers (the checkpoint
stores how many lines that is), so the log always describes exactly what the persisted model
learned: it doubles as a ledger of which record trained where. With delayed labels a step that
learned labels lists the ids it learned (``"learned": [...]``) and the segments of the labels;
such a log is a ledger, not a replay plan.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from stream_trainer.records import Record

__all__ = ["BatchLog", "read_batch_log", "segments_of"]

Segment = tuple[str, int, int]


def segments_of(records: Sequence[Record]) -> list[Segment]:
    """Runs of consecutive offsets of one partition, in record order."""
    segments: list[Segment] = []
    for r in records:
        if r.offset is None:
            continue
        key = f"{r.topic}:{r.partition}"
        if segments and segments[-1][0] == key and r.offset >= segments[-1][2]:
            segments[-1] = (key, segments[-1][1], r.offset + 1)
        else:
            segments.append((key, r.offset, r.offset + 1))
    return segments


class BatchLog:
    """Append-only writer of the batch log (flushed every line)."""

    def __init__(self, path: str | Path, *, keep_lines: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            if keep_lines is not None:
                lines = lines[:keep_lines]
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, self.path)
        self.lines = len(lines)
        self._handle = self.path.open("a")

    def append(
        self, step: int, segments: Sequence[Segment], *, learned: Sequence[str | int] | None = None
    ) -> None:
        """One step; ``learned``: with delayed labels, the ids the step learned (its segments are
        then those of the labels)."""
        entry: dict[str, object] = {"step": step, "segments": [list(s) for s in segments]}
        if learned is not None:
            entry["learned"] = list(learned)
        self._handle.write(json.dumps(entry) + "\n")
        self._handle.flush()
        self.lines += 1

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


def read_batch_log(path: str | Path) -> Iterator[list[Segment]]:
    """The segments of every step, in order."""
    with Path(path).open() as handle:
        for line in handle:
            if line.strip():
                entry = json.loads(line)
                yield [(str(k), int(a), int(b)) for k, a, b in entry["segments"]]
