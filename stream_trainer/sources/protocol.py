"""The protocols every source of batches and every dead-letter sink of the service implements.

The service loop (:mod:`stream_trainer.service.runner`) is written against these two protocols
only; the implementations are the file adapters beside this module
(:class:`~stream_trainer.sources.file_batches.FileBatchSource`,
:class:`~stream_trainer.sources.dead_letter_file.DeadLetterFile`) and the Kafka ones in
:mod:`consumers` (:class:`~consumers.kafka_source.KafkaRecordSource`,
:class:`~consumers.process.source.ProcessKafkaSource`, :class:`~consumers.DeadLetterSink`).
``tests/test_source_contract.py`` runs one suite of checks over all of them.

Offsets
-------
Every offset is a **next** offset, the offset of the next message to read (after the message at
``o``, ``o + 1``), keyed ``"topic:partition"``. A batch's ``next_offsets`` covers every message it
holds, rejected ones included, so committing them marks the whole batch done; a source re-opened
at those offsets hands out the message after, none twice and none skipped. Offsets committed are
never ahead of what the service has checkpointed: the service commits only the offsets of a
checkpoint it has saved (the order is in the runner's docstring).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

from stream_trainer.records import Record, RejectedRecord

__all__ = ["Batch", "BatchSource", "DeadLetterSink"]


class Batch(Protocol):
    """One mini-batch: accepted records, rejected ones, and the next offset of each partition
    read (a partition assigned but not read from yet may appear with its start position)."""

    records: list[Record]
    rejected: list[RejectedRecord]
    next_offsets: dict[str, int]


@runtime_checkable
class BatchSource(Protocol):
    """A resumable source of variable-size batches."""

    def poll_batch(self) -> Batch:
        """The next batch; an empty one when nothing arrived in time (or the source ended)."""
        ...

    def commit(
        self, next_offsets: Mapping[str, int], metadata: Mapping[str, str] | None = None
    ) -> None:
        """Mark everything before ``next_offsets`` done (each partition's offset may carry a
        metadata string); a source without durable commits (a file) only remembers them."""
        ...

    def committed_offsets(self) -> dict[str, int]:
        """The durably committed next offsets (``{}`` for a source that keeps none)."""
        ...

    def committed_metadata(self) -> dict[str, tuple[int, str]]:
        """Per partition, ``(committed next offset, its metadata)``."""
        ...

    def end_offsets(self) -> dict[str, int]:
        """The next offset to be written, per partition (``{}`` when unknown: a file)."""
        ...

    def lag(self) -> dict[str, int]:
        """Messages between the position and the end, per assigned partition."""
        ...

    def caught_up(self, end_offsets_at_start: Mapping[str, int]) -> bool:
        """Whether every message below ``end_offsets_at_start`` has been handed out (a file: it
        has ended)."""
        ...

    def close(self) -> None:
        """Release the source; idempotent, bounded in time."""
        ...


@runtime_checkable
class DeadLetterSink(Protocol):
    """Where rejected records go, each with its reason, detail, original bytes and coordinates."""

    @property
    def counts(self) -> Mapping[str, int]:
        """Letters queued so far, by reason."""
        ...

    def send_many(self, rejected: Iterable[RejectedRecord]) -> int:
        """Queue ``rejected``; returns how many were queued."""
        ...

    def flush(self) -> None:
        """Make every queued letter durable, or raise a retriable ``SourceError``."""
        ...

    def close(self) -> None:
        """Flush what can be flushed and release the sink; idempotent."""
        ...
