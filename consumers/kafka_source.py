"""The Kafka record source: a consumer group member that hands out variable-size mini-batches.

A mini-batch is *what has arrived*: :meth:`KafkaRecordSource.poll_batch` waits at most
``max_wait_ms`` for the first records, then takes whatever else is already buffered, never more than
``max_batch_records`` messages in all. Under light load batches are small (often 1), under a backlog
they are full; the trainer downstream is built for exactly that.

Offsets
-------
Every offset this module hands out or accepts is a **next** offset, the offset of the next message
to read: after processing the message at offset ``o`` the next offset is ``o + 1`` (Kafka's commit
convention). They are keyed ``"topic:partition"`` (see :func:`partition_key`); topic names cannot
contain ``:``, so the key is unambiguous. Auto-commit is off: the service calls
:meth:`KafkaRecordSource.commit` only with the ``next_offsets`` of a checkpoint it has saved, in
the order stated in :mod:`stream_trainer.service.runner` ("Checkpoint order"), so Kafka's
committed offsets are never ahead of the checkpoint. Each committed offset may carry a metadata
string (the service's checkpoint version and the partition's origin;
:meth:`KafkaRecordSource.committed_metadata` reads them back). A batch's ``next_offsets`` also
hands out, once per assignment, the start position of each partition no message has come from
yet, so that a checkpoint holds every partition owned.

Rebalances
----------
On assignment each partition is positioned at ``offset_provider(topic, partition)`` (the trainer's
checkpointed next offset), or, when that returns ``None``, at the group's committed offset, or else
at ``auto_offset_reset``. On revocation (and on :meth:`close`) ``on_revoke(partitions)`` is called
so the service can checkpoint before another member takes over. Both callbacks run on
kafka-python's IO thread, which also drives heartbeats: they must return promptly (well under
``session_timeout_ms``). An exception raised by either is re-raised by the next :meth:`poll_batch`.
With the consumer in a child process (:mod:`consumers.process.source`, the service's default) they
run in the service's thread instead, while kafka-python's IO thread waits for them.

.. note::
   ``max_poll_interval_ms`` bounds the time between two :meth:`poll_batch` calls, i.e. one
   trainer step on up to ``max_batch_records`` records plus a checkpoint. Past it the consumer
   leaves the group and its partitions are reassigned; the next commit then fails
   (``SourceError``, not retriable) and the records are read again by the new owner. Size it as at
   least ``2 x (worst step time at max_batch_records + checkpoint time)``; the default, 300 s, is
   ample for CPU training at 512 records.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from kafka.consumer import KafkaConsumer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError, RetriableError
from kafka.structs import OffsetAndMetadata, TopicPartition

from consumers.deserializer import RecordDecoder
from consumers.kafka_config import KafkaSourceConfig, fast_crc32c
from consumers.retry import ExponentialBackoff, Retry
from consumers.topics import create_topic
from stream_trainer.errors import SourceError
from stream_trainer.records import Record, RejectedRecord

__all__ = [
    "KafkaRecordSource",
    "KafkaSourceConfig",
    "OffsetProvider",
    "RevokeHook",
    "SourceBatch",
    "fast_crc32c",
    "parse_partition_key",
    "partition_key",
]

log = logging.getLogger(__name__)

OffsetProvider = Callable[[str, int], "int | None"]
"""``(topic, partition) -> next offset to read``, or ``None`` to use the committed offset."""
RevokeHook = Callable[[list[TopicPartition]], None]
"""Called with the partitions about to be taken away (rebalance or close)."""


def partition_key(topic: str, partition: int) -> str:
    """``"topic:partition"``, the key of every offsets dict in this package."""
    return f"{topic}:{partition}"


def parse_partition_key(key: str) -> tuple[str, int]:
    """Inverse of :func:`partition_key`; a :class:`ValueError` for anything else."""
    topic, sep, partition = key.rpartition(":")
    if not sep or not topic or not partition.isdigit():
        raise ValueError(f"partition key must look like 'topic:partition', got {key!r}")
    return topic, int(partition)


@dataclass(slots=True)
class SourceBatch:
    """One mini-batch.

    ``next_offsets`` maps ``"topic:partition"`` to the offset *after* the last message of that
    partition in this batch (rejected messages included): committing it marks the whole batch done.
    It also holds, once per assignment, the start position of each newly assigned partition that
    no message has come from yet (the next offset to read there), so that a checkpoint can hold
    every partition owned; such a batch may hold no message at all.
    """

    records: list[Record] = field(default_factory=list)
    rejected: list[RejectedRecord] = field(default_factory=list)
    next_offsets: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Messages consumed: accepted plus rejected."""
        return len(self.records) + len(self.rejected)


def decode_batch(
    decoder: RecordDecoder,
    polled: Sequence[tuple[str, int, Sequence[Any]]],
    next_offsets: dict[str, int],
) -> SourceBatch:
    """Decode polled messages (``[(topic, partition, messages), ...]``) into a batch."""
    batch = SourceBatch(next_offsets=next_offsets)
    records, rejected = batch.records, batch.rejected
    decode = decoder.decode_message
    for _topic, _partition, messages in polled:
        for m in messages:
            item = decode(m)
            if type(item) is Record:
                records.append(item)
            else:
                rejected.append(item)  # type: ignore[arg-type]
    return batch


class _RebalanceListener(ConsumerRebalanceListener):
    def __init__(self, source: KafkaRecordSource) -> None:
        self._source = source

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self._source._on_assigned(list(assigned))

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self._source._on_revoked(list(revoked), lost=False)

    def on_partitions_lost(self, lost: Sequence[TopicPartition]) -> None:
        self._source._on_revoked(list(lost), lost=True)


class _ClosingKafkaConsumer(KafkaConsumer):
    """``KafkaConsumer`` that stops its IO thread when its constructor fails.

    kafka-python starts the IO thread before it bootstraps; when bootstrapping times out the
    half-built consumer keeps that thread alive, and a service retrying its connection would leak
    one thread per attempt.
    """

    def __init__(self, *topics: str, **configs: Any) -> None:
        try:
            super().__init__(*topics, **configs)
        except BaseException:
            client = getattr(self, "_client", None)
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            raise


def _default_retry(config: KafkaSourceConfig) -> Retry:
    return Retry(
        ExponentialBackoff(base=0.5, cap=5.0),
        retries=config.connect_retries,
        retry_on=(RetriableError, OSError),
    )


class ClosableSource:
    """``with`` support and ``repr`` of the Kafka sources (``config``, ``_closed``, ``close``)."""

    config: KafkaSourceConfig
    _closed: bool

    def close(self) -> None:
        raise NotImplementedError

    def _repr_extra(self) -> str:
        return ""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"{type(self).__name__}(topics={list(self.config.topics)}, "
            f"group_id={self.config.group_id!r}{self._repr_extra()}, {state})"
        )


class KafkaRecordSource(ClosableSource):
    """Kafka -> mini-batches of decoded records, as a member of a consumer group.

    Parameters
    ----------
    config
        The validated settings.
    offset_provider
        ``(topic, partition) -> next offset | None`` consulted on every assignment.
    on_revoke
        Called with the partitions about to be revoked (rebalance, or :meth:`close`).
    on_lost
        Called with partitions lost without a clean revocation (session expired); their offsets
        can no longer be committed. Default: log a warning.
    retry
        Connection retry policy (default: ``connect_retries`` retries, exponential backoff 0.5 s to
        5 s); tests inject one with a fake sleeper.
    consumer_factory
        Builds the ``KafkaConsumer`` from keyword arguments (production default: a
        ``KafkaConsumer`` that releases its IO thread when it cannot bootstrap).

    Raises
    ------
    SourceError
        Retriable when the broker could not be reached; not retriable when a topic is missing.
    """

    def __init__(
        self,
        config: KafkaSourceConfig,
        *,
        offset_provider: OffsetProvider | None = None,
        on_revoke: RevokeHook | None = None,
        on_lost: RevokeHook | None = None,
        retry: Retry | None = None,
        consumer_factory: Callable[..., KafkaConsumer] = _ClosingKafkaConsumer,
    ) -> None:
        self.config = config
        self._offset_provider = offset_provider
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self._retry = retry if retry is not None else _default_retry(config)
        self._consumer_factory = consumer_factory
        # Public: the consumer process decodes with it too (consumers.process.frames.pack_polled).
        self.decoder = RecordDecoder(config.target, config.features, config.max_record_bytes)
        self._pending_error: BaseException | None = None
        self._committed_here: dict[str, int] = {}
        self._closed = False
        # True from a revocation (the start of a rebalance) to the next assignment (its end).
        self._rebalancing = False
        # Next offsets known without asking the consumer (see caught_up): per "topic:partition",
        # the next offset after the last message handed out, the offset sought on assignment, or a
        # position read from the consumer; each is a lower bound of the consumer's position. The
        # rebalance callbacks (IO thread) reset them; _generation tells poll_batch and caught_up
        # that a callback ran meanwhile, so that they do not write back what they learned before.
        self._track_lock = threading.Lock()
        self._generation = 0
        self._next_known: dict[str, int] = {}
        # Per partition, the offset after the last message handed out since its assignment (the
        # lag's position); unlike _next_known, also kept for a poll a rebalance callback ran in.
        self._handed_out: dict[str, int] = {}
        self._last_read: frozenset[str] = frozenset()
        # Revocations counted; per partition, the count at its last revocation and at the last time
        # its reading restarted elsewhere than its position (lost, or sought on assignment):
        # poll_messages drops what it read before a revocation that came in the middle of its
        # polls (see there).
        self._revocations = 0
        self._revoked_at: dict[str, int] = {}
        self._restarted: dict[str, int] = {}
        # Assigned partitions whose start position no batch has handed out yet (_announce_starts).
        self._unannounced: set[TopicPartition] = set()
        self._consumer = self._connect()
        try:
            # Subscribe first, then read the topics' metadata: the metadata response is what fills
            # the group coordinator's partition snapshot, so the first JoinGroup already carries
            # every partition. The other order joins with an empty snapshot and rebalances a
            # second time as soon as the metadata arrives, a rebalance that a slow machine can
            # push to the end of a short run, where it fails the final offset commit.
            self._consumer.subscribe(topics=list(config.topics), listener=_RebalanceListener(self))
            self._ensure_topics()
        except BaseException:
            self._closed = True
            with contextlib.suppress(Exception):
                self._consumer.close(autocommit=False, timeout_ms=config.close_timeout_ms)
            raise

    # -- connection -----------------------------------------------------------------------------

    def _connect(self) -> KafkaConsumer:
        servers = ",".join(self.config.bootstrap_servers)
        attempts = self._retry.retries + 1
        started = time.monotonic()

        def on_failure(exc: BaseException, failures: int, delay: float) -> None:
            log.warning(
                "Kafka at %s not reachable (attempt %d/%d): %s; retrying in %.1f s",
                servers,
                failures,
                attempts,
                exc,
                delay,
            )

        try:
            return self._retry.call_with_retry(
                lambda: self._consumer_factory(**self.config.consumer_configs()), on_failure
            )
        except self._retry.retry_on as exc:
            msg = (
                f"Kafka broker at {servers} not reachable after {attempts} attempt(s) in "
                f"{time.monotonic() - started:.1f} s: {exc}"
            )
            raise SourceError(msg, retriable=True) from exc
        except KafkaError as exc:
            msg = f"cannot create a Kafka consumer for {servers}: {exc}"
            raise SourceError(msg, retriable=exc.retriable) from exc

    def _list_topics(self) -> set[str]:
        try:
            return set(self._consumer.topics())
        except KafkaError as exc:
            raise SourceError(f"cannot list Kafka topics: {exc}", retriable=True) from exc

    def _wait_for_topics(self, missing: list[str]) -> set[str]:
        """Ask the metadata again until ``missing`` exist or ``wait_for_topic_s`` passes; the
        topics the cluster has at the end."""
        started = time.monotonic()
        deadline = started + self.config.wait_for_topic_s
        next_log = started
        servers = ",".join(self.config.bootstrap_servers)
        while True:
            now = time.monotonic()
            if now >= next_log:
                log.info(
                    "waiting for Kafka topic(s) %s to be created on %s (%.0f s of %.0f s)",
                    ", ".join(missing),
                    servers,
                    now - started,
                    self.config.wait_for_topic_s,
                )
                next_log = now + 5.0
            time.sleep(max(0.0, min(0.5, deadline - now)))
            existing = self._list_topics()
            missing = [t for t in missing if t not in existing]
            if not missing or time.monotonic() >= deadline:
                return existing

    def _ensure_topics(self) -> None:
        existing = self._list_topics()
        missing = [t for t in self.config.topics if t not in existing]
        if missing and self.config.wait_for_topic_s > 0 and not self.config.create_topic:
            existing = self._wait_for_topics(missing)
            found = [t for t in missing if t in existing]
            missing = [t for t in missing if t not in existing]
            if found:
                log.info("Kafka topic(s) %s now exist", ", ".join(found))
                self._await_partition_metadata(found)
        if not missing:
            return
        if not self.config.create_topic:
            shown = sorted(existing)[:20]
            msg = (
                f"Kafka topic(s) {missing} do not exist on "
                f"{','.join(self.config.bootstrap_servers)} "
                f"(existing: {shown}); create them, set create_topic=True, or wait for them "
                f"(wait_for_topic_s, waited {self.config.wait_for_topic_s:g} s)"
            )
            raise SourceError(msg, retriable=False)
        for topic in missing:
            create_topic(
                list(self.config.bootstrap_servers),
                topic,
                self.config.create_topic_partitions,
                security=self.config.security,
            )
            log.info(
                "created Kafka topic %s with %d partition(s)",
                topic,
                self.config.create_topic_partitions,
            )
        self._await_partition_metadata(missing)

    def _await_partition_metadata(self, topics: Sequence[str]) -> None:
        """Refresh the metadata until every one of ``topics`` shows its partitions (new topics
        take a moment to appear), bounded by ``request_timeout_ms``."""
        deadline = time.monotonic() + self.config.request_timeout_ms / 1000.0
        pending = list(topics)
        while pending:
            try:
                self._consumer.topics()  # a metadata request for every topic, snapshot included
            except KafkaError as exc:
                raise SourceError(f"cannot read Kafka metadata: {exc}", retriable=True) from exc
            pending = [t for t in pending if not self._consumer.partitions_for_topic(t)]
            if not pending:
                return
            if time.monotonic() > deadline:
                msg = f"Kafka topic(s) {pending} created but their partitions never appeared"
                raise SourceError(msg, retriable=True)
            time.sleep(0.1)

    # -- rebalance callbacks (kafka-python IO thread) ------------------------------------------

    def _forget(self, keys: Sequence[str]) -> None:
        with self._track_lock:
            self._generation += 1
            self._unannounced.difference_update(
                TopicPartition(*parse_partition_key(k)) for k in keys
            )
            for key in keys:
                self._next_known.pop(key, None)
                self._handed_out.pop(key, None)
            self._last_read = self._last_read.difference(keys)

    def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        try:
            self._forget([partition_key(*tp) for tp in assigned])
            with self._track_lock:
                self._unannounced.update(assigned)
            for tp in sorted(assigned):
                offset = None
                if self._offset_provider is not None:
                    offset = self._offset_provider(tp.topic, tp.partition)
                if offset is None:
                    log.info("assigned %s: starting at the committed offset", partition_key(*tp))
                    continue
                if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                    msg = f"offset_provider returned {offset!r} for {partition_key(*tp)}"
                    raise SourceError(msg)
                self._consumer.seek(tp, offset)
                with self._track_lock:
                    self._generation += 1
                    self._next_known[partition_key(*tp)] = offset
                    self._restarted[partition_key(*tp)] = self._revocations
                log.info(
                    "assigned %s: seeking to checkpointed offset %d", partition_key(*tp), offset
                )
        except BaseException as exc:
            self._pending_error = exc
            raise
        finally:
            self._rebalancing = False

    def _on_revoked(self, partitions: list[TopicPartition], *, lost: bool) -> None:
        self._rebalancing = True
        keys = [partition_key(*tp) for tp in partitions]
        self._forget(keys)
        with self._track_lock:
            self._revocations += 1
            self._revoked_at.update(dict.fromkeys(keys, self._revocations))
            # kafka-python keeps the position of a revoked partition assigned again, not of a
            # lost one (it starts again from the committed offset)
            if lost:
                self._restarted.update(dict.fromkeys(keys, self._revocations))
        if not partitions:  # the eager protocol revokes "nothing" before a first assignment
            return
        for tp in partitions:
            self._committed_here.pop(partition_key(*tp), None)
        hook = self._on_lost if lost else self._on_revoke
        if hook is None:
            if lost:
                log.warning("partitions lost without revocation: %s", sorted(partitions))
            return
        try:
            hook(sorted(partitions))
        except BaseException as exc:
            self._pending_error = exc
            raise

    def _raise_pending(self) -> None:
        exc, self._pending_error = self._pending_error, None
        if exc is None:
            return
        if isinstance(exc, SourceError):
            raise exc
        msg = f"rebalance callback failed: {type(exc).__name__}: {exc}"
        raise SourceError(msg, retriable=False) from exc

    # -- reading --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SourceError("the Kafka source is closed")

    def poll_batch(self) -> SourceBatch:
        """Wait up to ``max_wait_ms`` for records; return what arrived (at most
        ``max_batch_records`` messages), split into accepted and rejected records."""
        polled, next_offsets = self.poll_messages()
        return decode_batch(self.decoder, polled, next_offsets)

    def poll_messages(
        self, timeout_ms: int | None = None
    ) -> tuple[list[tuple[str, int, list[Any]]], dict[str, int]]:
        """The reading half of :meth:`poll_batch`: the messages as kafka-python returns them.

        Waits up to ``timeout_ms`` (default ``max_wait_ms``) for the first messages, then takes
        what is already buffered, at most ``max_batch_records`` in all. Returns
        ``([(topic, partition, messages), ...], next_offsets)``.

        A rebalance can run inside any of those polls. When it revokes partitions, the messages
        the earlier polls read from them are dropped (:meth:`_drop_read_before_revocation`): the
        revocation's hook has run, so handed out now they would be read twice.
        """
        self._check_open()
        self._raise_pending()
        cap = self.config.max_batch_records
        polled_parts: list[tuple[str, int, list[Any]]] = []
        if timeout_ms is None:
            timeout_ms = self.config.max_wait_ms
        generation = self._generation
        revocations = self._revocations
        size = 0
        while size < cap:
            try:
                polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=cap - size)
            except KafkaError as exc:
                self._raise_pending()
                raise SourceError(f"Kafka poll failed: {exc}", retriable=exc.retriable) from exc
            if self._revocations != revocations and polled_parts:  # a rebalance in that poll
                polled_parts = self._drop_read_before_revocation(polled_parts, revocations)
                size = sum(len(ms) for _t, _p, ms in polled_parts)
            revocations = self._revocations
            if not polled:
                break
            for tp, messages in polled.items():
                if not messages:
                    continue
                polled_parts.append((tp.topic, tp.partition, messages))
                size += len(messages)
            # Only the first poll waits; then take what is already buffered.
            timeout_ms = 0
        # per partition, the offset after its last message (a later part of it comes later)
        next_offsets = {partition_key(t, p): ms[-1].offset + 1 for t, p, ms in polled_parts}
        with self._track_lock:
            # a partition handed out needs no start position (_announce_starts)
            self._unannounced.difference_update(TopicPartition(t, p) for t, p, _ms in polled_parts)
            self._handed_out.update(next_offsets)
            if self._generation == generation:  # no rebalance callback ran meanwhile
                starts = self._announce_starts()
                self._next_known.update(next_offsets)
                self._last_read = frozenset(next_offsets)
                next_offsets.update(starts)
        self._raise_pending()
        return polled_parts, next_offsets

    def _announce_starts(self) -> dict[str, int]:
        """The start position of each partition assigned since the last polls that no message
        has come from yet, once it is known (``self._track_lock`` held).

        Handed out in a batch's ``next_offsets``, they let a checkpoint hold every partition this
        member owns, the ones it has not read anything from too: a restore then seeks each of
        them, and never takes the group's committed offset instead. The position is read from
        kafka-python's subscription state without a request: valid once the consumer has sought,
        fetched the committed offset or reset the partition.
        """
        starts: dict[str, int] = {}
        if not self._unannounced:
            return starts
        assignment = getattr(getattr(self._consumer, "_subscription", None), "assignment", {})
        for tp in list(self._unannounced):
            key = partition_key(*tp)
            state = assignment.get(tp)
            if state is not None and state.has_valid_position:
                starts[key] = int(state.position.offset)
                self._next_known[key] = starts[key]
                self._unannounced.discard(tp)
        return starts

    def _drop_read_before_revocation(
        self, parts: list[tuple[str, int, list[Any]]], revocations: int
    ) -> list[tuple[str, int, list[Any]]]:
        """``parts`` (read by the earlier polls of one batch) without the messages of the
        partitions revoked since ``revocations``: handed out after the revocation's hook, they
        would be read again by the partition's next owner. Where they are read again from:

        - a partition sought on its new assignment (to the offset the service has handed out,
          which comes before them) or lost (kafka-python restarts it from the committed offset)
          restarts before them already;
        - any other partition still assigned (the rebalance is not over yet, or it came back:
          kafka-python keeps its position, right after them) is sought back to the first of them;
        - a partition no longer assigned is read by its next owner from the committed offset.
        """
        with self._track_lock:
            revoked = {k for k, n in self._revoked_at.items() if n > revocations}
            restarted = {k for k, n in self._restarted.items() if n > revocations}
        kept: list[tuple[str, int, list[Any]]] = []
        dropped: dict[str, int] = {}  # partition -> first offset dropped
        for part in parts:
            key = partition_key(part[0], part[1])
            if key not in revoked:
                kept.append(part)
            else:
                dropped[key] = min(dropped.get(key, part[2][0].offset), part[2][0].offset)
        if not dropped:
            return kept
        assigned = set(self._consumer.assignment())
        for key, offset in sorted(dropped.items()):
            tp = TopicPartition(*parse_partition_key(key))
            if key not in restarted and tp in assigned:
                try:
                    self._consumer.seek(tp, offset)
                except ValueError:  # unassigned since: its next owner reads it
                    log.info("%s was unassigned before it could be sought back", key)
        log.info(
            "dropped %d messages read before their partitions were revoked: %s (partition: first "
            "offset dropped)",
            sum(len(ms) for _t, _p, ms in parts) - sum(len(ms) for _t, _p, ms in kept),
            dropped,
        )
        return kept

    # -- offsets --------------------------------------------------------------------------------

    def commit(
        self, next_offsets: Mapping[str, int], metadata: Mapping[str, str] | None = None
    ) -> None:
        """Synchronously commit exactly these next offsets for the group, each with its
        ``metadata`` string when given (the service's checkpoint version and the partition's
        origin, read back by :meth:`committed_metadata`).

        An offset behind one this source committed for the same partition since it was assigned is
        refused (``SourceError``, not retriable): committed offsets only move forward.

        While a rebalance is in progress (:attr:`rebalancing`) nothing is sent and ``SourceError``
        (retriable) is raised: the group would refuse the commit anyway, and kafka-python can
        block a group leader that commits while it waits for its SyncGroup response. The offsets
        stay in the service's checkpoint; the next checkpoint commits them.
        """
        self._check_open()
        if self._rebalancing:
            msg = (
                f"not committing {dict(next_offsets)}: a consumer group rebalance is in progress "
                "(the offsets are committed with the next checkpoint after it)"
            )
            raise SourceError(msg, retriable=True)
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for key, offset in next_offsets.items():
            topic, partition = parse_partition_key(key)
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ValueError(f"next offset for {key} must be an integer >= 0, got {offset!r}")
            previous = self._committed_here.get(key)
            if previous is not None and offset < previous:
                msg = f"refusing to commit {key} at {offset}: behind {previous}, committed before"
                raise SourceError(msg, retriable=False)
            note = (metadata or {}).get(key, "")
            offsets[TopicPartition(topic, partition)] = OffsetAndMetadata(offset, note, -1)
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=offsets, timeout_ms=self.config.commit_timeout_ms)
        except KafkaError as exc:
            msg = f"Kafka commit of {dict(next_offsets)} failed: {exc}"
            raise SourceError(msg, retriable=exc.retriable) from exc
        self._committed_here.update(next_offsets)

    def _all_partitions(self) -> list[TopicPartition]:
        out: list[TopicPartition] = []
        for topic in self.config.topics:
            partitions = self._consumer.partitions_for_topic(topic) or set()
            out.extend(TopicPartition(topic, p) for p in sorted(partitions))
        return out

    def committed_offsets(self) -> dict[str, int]:
        """The group's committed next offsets, for every partition of the topics that has one."""
        self._check_open()
        out = {}
        try:
            for tp in self._all_partitions():
                offset = self._consumer.committed(tp, timeout_ms=self.config.request_timeout_ms)
                if offset is not None:
                    out[partition_key(*tp)] = int(offset)
        except KafkaError as exc:
            raise SourceError(f"cannot read committed offsets: {exc}", retriable=True) from exc
        return out

    def committed_metadata(self) -> dict[str, tuple[int, str]]:
        """``{"topic:partition": (committed next offset, its metadata string)}`` for every
        partition of the topics that has a committed offset."""
        self._check_open()
        out = {}
        try:
            for tp in self._all_partitions():
                found = self._consumer.committed(
                    tp, metadata=True, timeout_ms=self.config.request_timeout_ms
                )
                if found is not None and found.offset is not None and found.offset >= 0:
                    out[partition_key(*tp)] = (int(found.offset), str(found.metadata or ""))
        except KafkaError as exc:
            raise SourceError(f"cannot read committed offsets: {exc}", retriable=True) from exc
        return out

    def end_offsets(self) -> dict[str, int]:
        """The next offset to be written, per partition of the topics (assigned or not)."""
        self._check_open()
        try:
            ends = self._consumer.end_offsets(
                self._all_partitions(), timeout_ms=self.config.request_timeout_ms
            )
        except KafkaError as exc:
            raise SourceError(f"cannot read end offsets: {exc}", retriable=True) from exc
        return {partition_key(*tp): int(off) for tp, off in sorted(ends.items())}

    def _positions(self, timeout_ms: int) -> dict[str, int]:
        out = {}
        for tp in self.assignment():
            position = self._consumer.position(tp, timeout_ms=timeout_ms)
            if position is None:
                raise SourceError(f"position of {partition_key(*tp)} unknown", retriable=True)
            out[partition_key(*tp)] = int(position)
        return out

    def lag(self) -> dict[str, int]:
        """``end offset - next offset`` for each assigned partition: messages not yet handed out.

        The next offset is the one this source handed out last (or sought on assignment); the end
        offset is the high watermark of the partition's last fetch response, which the
        consumer keeps (no request). Only a partition not fetched yet is asked for its end offset,
        bounded by ``lag_timeout_ms`` (a retriable :class:`SourceError` past it): once every
        partition has been fetched, a lag query sends nothing and cannot wait on a broker that is
        away.
        """
        self._check_open()
        timeout = self.config.lag_timeout_ms
        try:
            with self._track_lock:
                known = {**self._next_known, **self._handed_out}
            assigned = self.assignment()
            if all(partition_key(*tp) in known for tp in assigned):
                positions = known  # what was handed out: no request
            else:
                positions = self._positions(timeout)
            ends: dict[TopicPartition, int] = {}
            unfetched = []
            for tp in assigned:
                highwater = self._consumer.highwater(tp)
                if highwater is None:
                    unfetched.append(tp)
                else:
                    ends[tp] = int(highwater)
            if unfetched:
                ends.update(self._consumer.end_offsets(unfetched, timeout_ms=timeout))
        except KafkaError as exc:
            raise SourceError(f"cannot compute lag: {exc}", retriable=True) from exc
        return {
            partition_key(*tp): max(0, int(end) - positions[partition_key(*tp)])
            for tp, end in sorted(ends.items())
        }

    def caught_up(self, end_offsets_at_start: Mapping[str, int]) -> bool:
        """True once every partition is read up to ``end_offsets_at_start`` (``--stop-at-end``).

        Meant for a group of one: a non-empty partition assigned to another member (or not yet
        assigned) counts as not caught up.

        Called after every batch, so it asks the consumer as little as it can: a partition whose
        last message handed out (or whose offset sought on assignment) is at or past its end is
        caught up; one that is behind and was read by the last :meth:`poll_batch` is not (its
        next messages are on their way). Only the others cost a ``position()`` lookup, whose answer
        is kept until the next rebalance. A partition that ends with offsets that are never handed
        out (transaction markers, compacted gaps) is therefore seen caught up one poll later, once
        a poll hands out nothing of it.
        """
        self._check_open()
        with self._track_lock:
            known = dict(self._next_known)
            last_read = self._last_read
            generation = self._generation
        unknown: list[tuple[str, int]] = []
        for key, end in end_offsets_at_start.items():
            if end <= 0:
                continue
            offset = known.get(key)
            if offset is not None and offset >= end:
                continue
            if offset is not None and key in last_read:
                return False
            unknown.append((key, end))
        if not unknown:
            return True
        timeout = self.config.request_timeout_ms
        learned: dict[str, int] = {}
        caught_up = True
        try:
            assigned = {partition_key(*tp): tp for tp in self._consumer.assignment()}
            for key, end in unknown:
                tp = assigned.get(key)
                position = None if tp is None else self._consumer.position(tp, timeout_ms=timeout)
                if position is None:
                    caught_up = False
                    break
                learned[key] = int(position)
                if position < end:
                    caught_up = False
                    break
        except KafkaError as exc:
            raise SourceError(f"cannot read positions: {exc}", retriable=True) from exc
        finally:
            with self._track_lock:
                if self._generation == generation:
                    for key, position in learned.items():
                        self._next_known[key] = max(position, self._next_known.get(key, position))
        return caught_up

    @property
    def rebalancing(self) -> bool:
        """True between a revocation (start of a rebalance) and the next assignment (its end)."""
        return self._rebalancing

    def assignment(self) -> list[TopicPartition]:
        """The partitions this member owns now, sorted."""
        self._check_open()
        return sorted(self._consumer.assignment())

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the group and close the connections; bounded by ``close_timeout_ms``. Idempotent.

        ``on_revoke`` is called for the owned partitions first (as on a rebalance).
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close(autocommit=False, timeout_ms=self.config.close_timeout_ms)
        except Exception as exc:  # closing must not fail the caller's shutdown
            log.warning("error while closing the Kafka consumer: %s", exc)
