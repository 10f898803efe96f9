"""Dead letters: rejected records set aside in a Kafka topic, byte for byte, with the reason.

Each :class:`~stream_trainer.records.RejectedRecord` is produced to ``<source topic>.dead-letter``
(or a configured topic) with the **original** value bytes and key, the original headers, and:

==================== ================================================================
header               value (UTF-8)
==================== ================================================================
``x-reason``         the :class:`~stream_trainer.records.RejectReason` value
``x-detail``         a human-readable detail (truncated to 1000 characters)
``x-source-topic``   topic the record was read from
``x-source-partition`` its partition
``x-source-offset``  its offset
``x-source-timestamp`` its timestamp in ms since the epoch
==================== ================================================================

(a header whose value is unknown, e.g. for a record from a file, is sent empty). Sends are
asynchronous; :meth:`DeadLetterSink.flush` waits for them and raises if any failed. The service
calls ``flush()`` *before* committing the offsets of the batch, so a dead letter is never lost
behind a commit.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kafka.errors import KafkaError
from kafka.producer import KafkaProducer

from consumers.security import KafkaSecurity
from consumers.topics import create_topic, existing_topics
from stream_trainer.errors import SourceError
from stream_trainer.records import RejectedRecord

__all__ = ["DEAD_LETTER_SUFFIX", "DeadLetterSink", "dead_letter_topic"]

log = logging.getLogger(__name__)

DEAD_LETTER_SUFFIX = ".dead-letter"
_MAX_DETAIL = 1000


def dead_letter_topic(source_topic: str) -> str:
    """``<source_topic>.dead-letter``."""
    return source_topic + DEAD_LETTER_SUFFIX


def _header(value: object) -> bytes:
    return b"" if value is None else str(value).encode("utf-8")


class DeadLetterSink:
    """Produce rejected records to a dead-letter topic and count them by reason.

    Parameters
    ----------
    bootstrap_servers
        Kafka to produce to.
    topic
        Dead-letter topic for every record; ``None`` derives it from each record's source topic.
    create_topics
        Create a missing dead-letter topic (one partition) on first use.
    security
        Passed through to the producer.
    producer
        An injected ``KafkaProducer`` (production default: built here, ``acks='all'``).

    ``counts`` maps each reject reason (its string value) to the records sent so far; the service
    exports it as a metric.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        topic: str | None = None,
        create_topics: bool = True,
        security: KafkaSecurity | None = None,
        producer: KafkaProducer | None = None,
        producer_factory: Callable[..., KafkaProducer] = KafkaProducer,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.create_topics = create_topics
        self.security = security or KafkaSecurity()
        self.counts: Counter[str] = Counter()
        self._known_topics: set[str] = set()
        self._pending: list[tuple[Any, RejectedRecord]] = []
        self._closed = False
        self._owns_producer = producer is None
        if producer is None:
            try:
                producer = producer_factory(
                    bootstrap_servers=bootstrap_servers,
                    client_id="stream-trainer-dead-letter",
                    acks="all",
                    linger_ms=5,
                    **self.security.client_configs(),
                )
            except KafkaError as exc:
                msg = f"cannot create the dead-letter producer for {bootstrap_servers!r}: {exc}"
                raise SourceError(msg, retriable=exc.retriable) from exc
        self._producer = producer

    def topic_for(self, rejected: RejectedRecord) -> str:
        if self.topic is not None:
            return self.topic
        if rejected.topic is None:
            raise SourceError(
                "a rejected record without a source topic needs a configured dead-letter topic"
            )
        return dead_letter_topic(rejected.topic)

    def _ensure_topic(self, topic: str) -> None:
        if topic in self._known_topics:
            return
        if self.create_topics and topic not in existing_topics(
            self.bootstrap_servers, self.security
        ):
            create_topic(self.bootstrap_servers, topic, 1, security=self.security)
            log.info("created dead-letter topic %s", topic)
        self._known_topics.add(topic)

    def send(self, rejected: RejectedRecord) -> None:
        """Queue one dead letter (asynchronous; see :meth:`flush`)."""
        if self._closed:
            raise SourceError("the dead-letter sink is closed")
        topic = self.topic_for(rejected)
        self._ensure_topic(topic)
        headers = [(k, bytes(v)) for k, v in rejected.headers]
        headers += [
            ("x-reason", _header(rejected.reason.value)),
            ("x-detail", _header(rejected.detail[:_MAX_DETAIL])),
            ("x-source-topic", _header(rejected.topic)),
            ("x-source-partition", _header(rejected.partition)),
            ("x-source-offset", _header(rejected.offset)),
            ("x-source-timestamp", _header(rejected.timestamp_ms)),
        ]
        try:
            future = self._producer.send(
                topic, value=rejected.raw, key=rejected.key, headers=headers
            )
        except KafkaError as exc:
            msg = f"cannot queue a dead letter for {topic}: {exc}"
            raise SourceError(msg, retriable=exc.retriable) from exc
        self._pending.append((future, rejected))
        self.counts[rejected.reason.value] += 1

    def send_many(self, rejected: Iterable[RejectedRecord]) -> int:
        """Queue several dead letters; return how many."""
        n = 0
        for item in rejected:
            self.send(item)
            n += 1
        return n

    def flush(self, timeout_s: float | None = 30.0) -> None:
        """Wait until every queued dead letter is acknowledged; raise if one failed.

        Raises
        ------
        SourceError
            Retriable, naming the first failure; the offsets of the batch must not be committed.
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            self._pending = pending
            msg = f"dead letters not delivered within {timeout_s} s: {exc}"
            raise SourceError(msg, retriable=True) from exc
        failed = [(f, r) for f, r in pending if f.failed()]
        if failed:
            future, rejected = failed[0]
            msg = (
                f"{len(failed)} dead letter(s) failed, first {rejected.topic}:"
                f"{rejected.partition}@{rejected.offset}: {future.exception!r}"
            )
            raise SourceError(msg, retriable=True)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush what is queued (best effort) and close the producer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.flush(timeout_s)
        if self._owns_producer:
            with contextlib.suppress(Exception):
                self._producer.close(timeout=timeout_s)

    def __enter__(self) -> DeadLetterSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
