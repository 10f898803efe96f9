"""Producing into Kafka for ``stream-trainer replay``: recordings and any file or bundled source.

Pacing
------
A :class:`Pacer` decides when each message goes out. Its clock and sleeper are injected (production
defaults ``time.monotonic`` / ``time.sleep``), so tests replay hours of traffic in no time.

- ``speed=s`` (recordings): message *i* with timestamp :math:`t_i` is due at
  :math:`T_0 + (t_i - t_0)/s` where :math:`T_0` is the wall time the first message went out and
  :math:`t_0` its timestamp; inter-arrival times are kept, scaled by :math:`1/s`. A message whose
  timestamp is earlier than the previous one's (several partitions interleaved) is due at once.
- ``rate=r``: message *i* is due at :math:`T_0 + i/r`.
- neither: as fast as the producer accepts.

The producer never sleeps to catch up: a late message goes out at once and the schedule is kept.

Looping
-------
:func:`looped` replays a source again and again (``replay --loop``). With one :class:`Pacer` over
all the passes, ``rate=r`` stays steady across the seams. For recordings paced by ``speed``, pass
:math:`k` has its timestamps shifted by :math:`k P`, :math:`P = (t_{last} - t_0) + g` where
:math:`g` is the mean gap between consecutive messages of the first pass, so the schedule keeps
going forward instead of restarting in the past (which would send a whole pass at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kafka.errors import KafkaError
from kafka.producer import KafkaProducer

from consumers.client_options import check_client_options
from consumers.security import KafkaSecurity
from consumers.topics import create_topic, existing_topics
from stream_trainer.errors import ConfigError, SourceError
from stream_trainer.records import Record, RejectedRecord
from stream_trainer.sources.recording import RecordingEntry

__all__ = [
    "Pacer",
    "ReplayReport",
    "TopicProducer",
    "looped",
    "replay_entries",
    "replay_records",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Pacer:
    """When to send each message (see the module docstring for the schedule)."""

    def __init__(
        self,
        *,
        speed: float | None = None,
        rate: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if speed is not None and rate is not None:
            raise ConfigError(f"give speed or rate, not both (speed={speed!r}, rate={rate!r})")
        if speed is not None and not speed > 0:
            raise ConfigError(f"speed must be > 0, got {speed!r}")
        if rate is not None and not rate > 0:
            raise ConfigError(f"rate must be > 0 messages/s, got {rate!r}")
        self.speed = speed
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._start_wall: float | None = None
        self._start_ts: int | None = None
        self._count = 0
        self.slept_s = 0.0

    def wait(self, timestamp_ms: int | None = None) -> None:
        """Block until the next message is due (``timestamp_ms``: its recorded time)."""
        now = self._clock()
        if self._start_wall is None:
            self._start_wall = now
            self._start_ts = timestamp_ms
            self._count = 1
            return
        due = now
        if self.rate is not None:
            due = self._start_wall + self._count / self.rate
        elif self.speed is not None and timestamp_ms is not None:
            if self._start_ts is None:
                self._start_ts = timestamp_ms
            due = self._start_wall + (timestamp_ms - self._start_ts) / 1000.0 / self.speed
        self._count += 1
        delay = due - now
        if delay > 0:
            self.slept_s += delay
            self._sleep(delay)


@dataclass(slots=True)
class ReplayReport:
    """What a replay sent."""

    sent: int = 0
    skipped: int = 0
    per_partition: dict[int, int] = field(default_factory=dict)
    elapsed_s: float = 0.0


class TopicProducer:
    """A ``KafkaProducer`` bound to one topic, creating it when asked.

    Parameters
    ----------
    bootstrap_servers, topic
        Where to produce.
    create_missing
        Create ``topic`` with ``partitions`` partitions when it does not exist.
    partitions
        Partitions for a created topic.
    security, producer_options
        The connection security and other kafka-python producer settings (``[kafka.producer]``),
        passed through.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        topic: str,
        *,
        create_missing: bool = False,
        partitions: int = 1,
        security: KafkaSecurity | None = None,
        producer_options: Mapping[str, Any] | None = None,
        producer_factory: Callable[..., KafkaProducer] = KafkaProducer,
        linger_ms: int = 5,
    ) -> None:
        self.topic = topic
        self.security = security or KafkaSecurity()
        topics = existing_topics(bootstrap_servers, self.security)
        if topic not in topics:
            if not create_missing:
                msg = f"topic {topic!r} does not exist on {bootstrap_servers}; pass --create-topic"
                raise SourceError(msg)
            create_topic(bootstrap_servers, topic, partitions, security=self.security)
            log.info("created topic %s with %d partition(s)", topic, partitions)
        try:
            self._producer = producer_factory(
                bootstrap_servers=bootstrap_servers,
                client_id="stream-trainer-replay",
                acks="all",
                **{
                    "linger_ms": linger_ms,
                    **check_client_options("producer", producer_options or {}),
                },
                **self.security.client_configs(),
            )
        except KafkaError as exc:
            msg = f"cannot create a Kafka producer for {bootstrap_servers!r}: {exc}"
            raise SourceError(msg, retriable=exc.retriable) from exc
        partitions_now = self._producer.partitions_for(topic)
        self.partitions = len(partitions_now) if partitions_now else partitions
        self._failed: list[BaseException] = []
        self._closed = False

    def send(
        self,
        value: bytes | None,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        future = self._producer.send(
            self.topic, value=value, key=key, partition=partition, headers=headers
        )
        future.add_errback(self._failed.append)

    def flush(self, timeout_s: float | None = 60.0) -> None:
        """Wait for every message sent so far; raise :class:`SourceError` if any failed."""
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise SourceError(f"producer flush failed: {exc}", retriable=True) from exc
        if self._failed:
            first = self._failed[0]
            msg = f"{len(self._failed)} message(s) to {self.topic} failed: {first!r}"
            raise SourceError(msg, retriable=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._producer.close(timeout=10)

    def __enter__(self) -> TopicProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def looped(open_pass: Callable[[], Iterable[_T]], *, passes: int | None = None) -> Iterator[_T]:
    """The items of ``open_pass()``, called again for each pass: forever (``passes=None``) or
    ``passes`` times. Recording entries get their timestamps shifted forward per pass (see the
    module docstring); an empty pass ends the loop (nothing to repeat)."""
    if passes is not None and passes < 1:
        raise ConfigError(f"passes must be >= 1, got {passes!r}")
    done = 0
    period = 0
    while passes is None or done < passes:
        first: int | None = None
        last: int | None = None
        count = 0
        for item in open_pass():
            count += 1
            if isinstance(item, RecordingEntry) and item.timestamp_ms is not None:
                if done == 0:
                    first = item.timestamp_ms if first is None else first
                    last = item.timestamp_ms
                elif period:
                    shifted = item.timestamp_ms + done * period
                    item = dataclasses.replace(item, timestamp_ms=shifted)
            yield item
        if count == 0:
            return
        if done == 0 and first is not None and last is not None:
            span = max(0, last - first)
            period = max(1, span + (span // (count - 1) if count > 1 else 1000))
        done += 1


def replay_entries(
    entries: Iterable[RecordingEntry],
    producer: TopicProducer,
    pacer: Pacer,
    *,
    keep_partitions: bool = True,
    progress: Callable[[int], Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ReplayReport:
    """Produce recorded messages with their keys, values and (when the topic has enough
    partitions and ``keep_partitions``) their partitions; otherwise the key picks the partition."""
    report = ReplayReport()
    started = clock()
    warned = False
    for entry in entries:
        pacer.wait(entry.timestamp_ms)
        partition: int | None = entry.partition
        if not keep_partitions or entry.partition >= producer.partitions:
            if keep_partitions and not warned:
                log.warning(
                    "%s has %d partition(s), the recording uses partition %d: "
                    "partitioning by key instead",
                    producer.topic,
                    producer.partitions,
                    entry.partition,
                )
                warned = True
            partition = None
        producer.send(entry.value, key=entry.key, partition=partition)
        report.sent += 1
        if partition is not None:
            report.per_partition[partition] = report.per_partition.get(partition, 0) + 1
        if progress is not None:
            progress(1)
    producer.flush()
    report.elapsed_s = clock() - started
    return report


def replay_records(
    items: Iterable[Record | RejectedRecord],
    producer: TopicProducer,
    pacer: Pacer,
    *,
    key_field: str | None = None,
    progress: Callable[[int], Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ReplayReport:
    """Produce records from any source as JSON objects.

    Without ``key_field`` the messages go to the partitions in turn (round-robin, no key); with
    it, the key is ``str(value[key_field])`` in UTF-8 and Kafka's partitioner places it. A rejected
    record that kept its original bytes (a malformed line) is produced as those bytes, so the
    stream keeps its defects; one without bytes is skipped.
    """
    report = ReplayReport()
    started = clock()
    for item in items:
        if isinstance(item, RejectedRecord):
            value, fields_ = item.raw, item.value
            if value is None:
                report.skipped += 1
                continue
        else:
            value, fields_ = json.dumps(item.value).encode("utf-8"), item.value
        pacer.wait(item.timestamp_ms if pacer.speed is not None else None)
        key: bytes | None = None
        partition: int | None = None
        if key_field is not None:
            if fields_ is not None and fields_.get(key_field) is not None:
                key = str(fields_[key_field]).encode("utf-8")
        else:
            partition = report.sent % producer.partitions
        producer.send(value, key=key, partition=partition)
        report.sent += 1
        if partition is not None:
            report.per_partition[partition] = report.per_partition.get(partition, 0) + 1
        if progress is not None:
            progress(1)
    producer.flush()
    report.elapsed_s = clock() - started
    return report
