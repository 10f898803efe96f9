"""Capturing a topic into a recording (``stream-trainer record``).

The recorder is not a group member: it assigns itself every partition of the topic, commits nothing,
and so never disturbs the consumer groups that train from the topic.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka.consumer import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from consumers.client_options import check_client_options
from consumers.security import KafkaSecurity
from stream_trainer.errors import ConfigError, SourceError
from stream_trainer.sources.recording import RecordingEntry

__all__ = ["record_topic"]

log = logging.getLogger(__name__)


def record_topic(
    bootstrap_servers: str | Sequence[str],
    topic: str,
    write: Callable[[RecordingEntry], None],
    *,
    from_beginning: bool = False,
    max_records: int | None = None,
    until_end: bool = False,
    security: KafkaSecurity | None = None,
    consumer_options: Mapping[str, Any] | None = None,
    poll_timeout_ms: int = 500,
    connect_timeout_ms: int = 10_000,
    progress: Callable[[int], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Pass every message of ``topic`` to ``write`` (in consumption order; offset order within a
    partition) and return how many.

    Stops after ``max_records``, or (``until_end``) once every partition has been read up to its end
    offset at the start, or when ``should_stop()`` is true; otherwise runs until interrupted.
    ``security`` and ``consumer_options`` (other kafka-python consumer settings, e.g.
    ``isolation_level``) are passed to the consumer.
    """
    if max_records is not None and max_records < 0:
        raise ConfigError(f"max_records must be >= 0, got {max_records!r}")
    if max_records is not None and until_end:
        raise ConfigError("give max_records or until_end, not both")
    security = security or KafkaSecurity()
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            client_id="stream-trainer-record",
            group_id=None,
            enable_auto_commit=False,
            allow_auto_create_topics=False,
            bootstrap_timeout_ms=connect_timeout_ms,
            **check_client_options("consumer", consumer_options or {}),
            **security.client_configs(),
        )
    except KafkaError as exc:
        msg = f"Kafka broker at {bootstrap_servers} not reachable: {exc}"
        raise SourceError(msg, retriable=exc.retriable) from exc
    count = 0
    try:
        if topic not in consumer.topics():
            raise SourceError(f"topic {topic!r} does not exist on {bootstrap_servers}")
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(partitions)
        if from_beginning:
            consumer.seek_to_beginning(*partitions)
        else:
            consumer.seek_to_end(*partitions)
        ends: dict[TopicPartition, int] = {}
        if until_end:
            ends = {tp: int(off) for tp, off in consumer.end_offsets(partitions).items()}

        def done() -> bool:
            if max_records is not None and count >= max_records:
                return True
            if should_stop is not None and should_stop():
                return True
            return until_end and all(consumer.position(tp) >= end for tp, end in ends.items())

        while not done():
            limit = 500 if max_records is None else min(500, max_records - count)
            polled = consumer.poll(timeout_ms=poll_timeout_ms, max_records=limit)
            for messages in polled.values():
                for m in messages:
                    write(
                        RecordingEntry(
                            topic=m.topic,
                            partition=m.partition,
                            offset=m.offset,
                            timestamp_ms=m.timestamp,
                            key=m.key,
                            value=m.value,
                        )
                    )
                    count += 1
                    if progress is not None:
                        progress(1)
    except KafkaError as exc:
        raise SourceError(f"recording {topic!r} failed: {exc}", retriable=exc.retriable) from exc
    finally:
        with contextlib.suppress(Exception):
            consumer.close(autocommit=False, timeout_ms=5_000)
    return count
