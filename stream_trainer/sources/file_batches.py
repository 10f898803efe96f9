"""File sources for the service: a :class:`~stream_trainer.sources.protocol.BatchSource`.

A :class:`FileBatchSource` reads anything :func:`stream_trainer.sources.open_source` opens and hands
out batches like :class:`consumers.KafkaRecordSource` does (the
:class:`~stream_trainer.sources.protocol.BatchSource` protocol), so the service loop has one code
path.

Offsets: records from a recording keep their Kafka coordinates (``topic:partition`` -> next
offset). Other files are one partition, ``<spec>:0``, whose offset is the record's position in the
stream (0-based). Resuming from a checkpoint skips every record below the checkpointed next offset.

Batches: cut with :class:`~stream_trainer.sources.BatchSizes` (seeded), or, with a batch log
(:mod:`stream_trainer.service.batch_log`), exactly as a logged run cut them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from stream_trainer.records import Record, RejectedRecord
from stream_trainer.service.batch_log import read_batch_log
from stream_trainer.sources import BatchSizes, open_source

__all__ = ["FileBatch", "FileBatchSource"]


@dataclass
class FileBatch:
    records: list[Record] = field(default_factory=list)
    rejected: list[RejectedRecord] = field(default_factory=list)
    next_offsets: dict[str, int] = field(default_factory=dict)


def _key(item: Record | RejectedRecord) -> str:
    return f"{item.topic}:{item.partition}"


class FileBatchSource:
    """Batches from a file, recording or bundled dataset (see the module docstring)."""

    def __init__(
        self,
        spec: str,
        *,
        target: str | None,
        batch_sizes: BatchSizes,
        seed: int,
        start_offsets: Mapping[str, int] | None = None,
        replay_batches: str | None = None,
    ) -> None:
        self.spec = spec
        start = dict(start_offsets or {})
        self._items = self._positioned(open_source(spec, target=target), start)
        self._sizes = batch_sizes.sizes(seed)
        self._segments = read_batch_log(replay_batches) if replay_batches else None
        self._index: dict[tuple[str, int | None], Record | RejectedRecord] | None = None
        self._done = False
        self.committed: dict[str, int] = {}

    def _positioned(
        self, items: Iterator[Record | RejectedRecord], start: dict[str, int]
    ) -> Iterator[Record | RejectedRecord]:
        for position, item in enumerate(items):
            if item.topic is None:
                item.topic, item.partition, item.offset = self.spec, 0, position
            if item.offset is not None and item.offset < start.get(_key(item), 0):
                continue
            yield item

    def _next_items(self) -> list[Record | RejectedRecord]:
        if self._segments is None:
            return list(itertools.islice(self._items, next(self._sizes)))
        if self._index is None:
            # Replaying a log needs random access: the recording is indexed in memory once.
            self._index = {(_key(i), i.offset): i for i in self._items}
        segments = next(self._segments, None)
        if segments is None:
            return []
        index = self._index
        return [index[(k, o)] for k, a, b in segments for o in range(a, b) if (k, o) in index]

    def poll_batch(self) -> FileBatch:
        batch = FileBatch()
        if self._done:
            return batch
        items = self._next_items()
        if not items:
            self._done = True
            return batch
        for item in items:
            if isinstance(item, RejectedRecord):
                batch.rejected.append(item)
            else:
                batch.records.append(item)
            if item.offset is not None:
                key = _key(item)
                batch.next_offsets[key] = max(batch.next_offsets.get(key, 0), item.offset + 1)
        return batch

    def commit(
        self, next_offsets: Mapping[str, int], metadata: Mapping[str, str] | None = None
    ) -> None:
        """Nothing to commit to for a file: remembered for the report only."""
        self.committed.update(next_offsets)

    def committed_metadata(self) -> dict[str, tuple[int, str]]:
        return {}

    def lag(self) -> dict[str, int]:
        return {}

    def end_offsets(self) -> dict[str, int]:
        return {}

    def caught_up(self, end_offsets_at_start: Mapping[str, int]) -> bool:
        return self._done

    @property
    def exhausted(self) -> bool:
        return self._done

    def committed_offsets(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        """Stop handing out records (idempotent)."""
        self._done = True
