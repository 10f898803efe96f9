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
asynchronous; :meth:`DeadLetterSink.flush` waits for them. The service calls ``flush()``
*before* committing the offsets of the batch, so a dead letter is never lost behind a commit.

Letters the broker refuses
--------------------------
A dead letter can be refused for good: a record of several megabytes on a topic that allows it is
larger than the producer's request limit or the dead-letter topic's ``max.message.bytes``. Such a
letter (any send error that is not retriable) is **cut down** and sent again: its value becomes a
JSON object

.. code-block:: json

   {"cut_down": true, "reason": "...", "detail": "...", "refused": "<the send error>",
    "source": {"topic": "...", "partition": 0, "offset": 42, "timestamp_ms": 0},
    "length": 3000000, "sha256": "<hex digest of the whole value>",
    "head": "<base64 of its first 1024 bytes>", "key_length": 8, "key_sha256": "<hex or null>"}

with the ``x-*`` headers above plus ``x-cut-down: 1``, the original key when it is at most 1024
bytes, and none of the original headers. A cut-down letter that is refused too is counted
(:attr:`DeadLetterSink.undeliverable`) and logged, never raised and never sent again: a record
must not stop the service. While the broker is away, :meth:`~DeadLetterSink.flush` raises a
retriable :class:`SourceError` (the offsets behind the letters must not be committed before they
are delivered) and the next flush waits for the same letters again: those the producer still
holds are never sent twice, those it gave up on (a retriable error) are sent again. Nothing is
retried in a loop, and since no record stops the service any more, a restart does not send the
same letters again and again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kafka.errors import KafkaError
from kafka.producer import KafkaProducer

from consumers.client_options import check_client_options
from consumers.security import KafkaSecurity
from consumers.topics import create_topic, existing_topics
from stream_trainer.errors import SourceError
from stream_trainer.records import RejectedRecord

__all__ = [
    "CUT_DOWN_HEAD_BYTES",
    "DEAD_LETTER_SUFFIX",
    "DeadLetterSink",
    "cut_down_value",
    "dead_letter_topic",
]

log = logging.getLogger(__name__)

DEAD_LETTER_SUFFIX = ".dead-letter"
_MAX_DETAIL = 1000
#: Bytes of the original value a cut-down dead letter keeps (and the largest key it keeps).
CUT_DOWN_HEAD_BYTES = 1024


def dead_letter_topic(source_topic: str) -> str:
    """``<source_topic>.dead-letter``."""
    return source_topic + DEAD_LETTER_SUFFIX


def _header(value: object) -> bytes:
    return b"" if value is None else str(value).encode("utf-8")


@dataclass(slots=True)
class _Letter:
    """One dead letter on its way: the record, and whether it is the cut-down form."""

    rejected: RejectedRecord
    topic: str
    cut_down: bool = False
    refused: str = ""


def _headers(rejected: RejectedRecord, *, cut_down: bool) -> list[tuple[str, bytes]]:
    headers = [] if cut_down else [(k, bytes(v)) for k, v in rejected.headers]
    headers += [
        ("x-reason", _header(rejected.reason.value)),
        ("x-detail", _header(rejected.detail[:_MAX_DETAIL])),
        ("x-source-topic", _header(rejected.topic)),
        ("x-source-partition", _header(rejected.partition)),
        ("x-source-offset", _header(rejected.offset)),
        ("x-source-timestamp", _header(rejected.timestamp_ms)),
    ]
    if cut_down:
        headers.append(("x-cut-down", b"1"))
    return headers


def cut_down_value(rejected: RejectedRecord, refused: str) -> bytes:
    """The JSON value of a cut-down dead letter (module docstring): what identifies the record
    (its coordinates, length and SHA-256) and its first :data:`CUT_DOWN_HEAD_BYTES` bytes."""
    raw = rejected.raw or b""
    key = rejected.key
    body = {
        "cut_down": True,
        "reason": rejected.reason.value,
        "detail": rejected.detail[:_MAX_DETAIL],
        "refused": refused[:_MAX_DETAIL],
        "source": {
            "topic": rejected.topic,
            "partition": rejected.partition,
            "offset": rejected.offset,
            "timestamp_ms": rejected.timestamp_ms,
        },
        "length": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "head": base64.b64encode(raw[:CUT_DOWN_HEAD_BYTES]).decode("ascii"),
        "key_length": None if key is None else len(key),
        "key_sha256": None if key is None else hashlib.sha256(key).hexdigest(),
    }
    return json.dumps(body).encode()


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
    producer_options
        Other kafka-python producer settings (``[kafka.producer]``), passed through.
    producer
        An injected ``KafkaProducer`` (production default: built here, ``acks='all'``).

    ``counts`` maps each reject reason (its string value) to the records queued so far; the
    service exports it as a metric. ``cut_down`` counts, by reason, the letters refused by the
    broker and sent again cut down; ``undeliverable`` those whose cut-down form was refused too
    (dropped, logged).
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        topic: str | None = None,
        create_topics: bool = True,
        security: KafkaSecurity | None = None,
        producer_options: Mapping[str, Any] | None = None,
        producer: KafkaProducer | None = None,
        producer_factory: Callable[..., KafkaProducer] = KafkaProducer,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.create_topics = create_topics
        self.security = security or KafkaSecurity()
        self.counts: Counter[str] = Counter()
        self.cut_down: Counter[str] = Counter()
        self.undeliverable: Counter[str] = Counter()
        self._known_topics: set[str] = set()
        self._pending: list[tuple[Any, _Letter]] = []
        # letters whose send failed for a transient reason: sent again by the next flush
        self._unsent: list[_Letter] = []
        self._closed = False
        self._owns_producer = producer is None
        if producer is None:
            try:
                producer = producer_factory(
                    bootstrap_servers=bootstrap_servers,
                    client_id="stream-trainer-dead-letter",
                    acks="all",
                    **{"linger_ms": 5, **check_client_options("producer", producer_options or {})},
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
        self.counts[rejected.reason.value] += 1
        self._dispatch(_Letter(rejected, topic))

    def _dispatch(self, letter: _Letter) -> None:
        """Hand ``letter`` to the producer; a refusal is handled as :meth:`_refused` says, a
        transient failure keeps it for the next :meth:`flush`."""
        r = letter.rejected
        value: bytes | None
        if letter.cut_down:
            value, key = cut_down_value(r, letter.refused), r.key
            if key is not None and len(key) > CUT_DOWN_HEAD_BYTES:
                key = None
        else:
            value, key = r.raw, r.key
        try:
            future = self._producer.send(
                letter.topic,
                value=value,
                key=key,
                headers=_headers(r, cut_down=letter.cut_down),
            )
        except KafkaError as exc:
            if exc.retriable:
                self._unsent.append(letter)
            else:
                self._refused(letter, exc)
            return
        self._pending.append((future, letter))

    def _refused(self, letter: _Letter, exc: BaseException) -> None:
        """The broker or the producer refused ``letter`` for good: send it cut down, or, when
        the cut-down form was refused, count and log it (never raised)."""
        r = letter.rejected
        where = f"{r.topic}:{r.partition}@{r.offset}"
        if not letter.cut_down:
            log.warning(
                "dead letter of %s (%s, %d bytes) refused (%s): sending it cut down",
                where,
                r.reason.value,
                len(r.raw or b""),
                exc,
            )
            self.cut_down[r.reason.value] += 1
            self._dispatch(_Letter(r, letter.topic, cut_down=True, refused=repr(exc)))
            return
        self.undeliverable[r.reason.value] += 1
        log.error(
            "dead letter of %s (%s) refused even cut down (%s): dropped, counted as undeliverable",
            where,
            r.reason.value,
            exc,
        )

    def send_many(self, rejected: Iterable[RejectedRecord]) -> int:
        """Queue several dead letters; return how many."""
        n = 0
        for item in rejected:
            self.send(item)
            n += 1
        return n

    def flush(self, timeout_s: float | None = 30.0) -> None:
        """Wait until every queued dead letter is acknowledged, cut down or counted as
        undeliverable (module docstring).

        Raises
        ------
        SourceError
            Retriable, when some letters could not be delivered for a transient reason (they are
            sent again by the next call); the offsets of the batch must not be committed.
        """
        for _ in range(2):  # the letters, then the cut-down forms of those refused
            unsent, self._unsent = self._unsent, []
            for letter in unsent:
                self._dispatch(letter)
            if not self._pending:
                break
            pending, self._pending = self._pending, []
            try:
                self._producer.flush(timeout=timeout_s)
            except KafkaError as exc:
                # still in the producer's hands: waited for again, never sent twice
                self._pending = pending + self._pending
                msg = f"dead letters not delivered within {timeout_s} s: {exc}"
                raise SourceError(msg, retriable=True) from exc
            for future, letter in pending:
                if not future.failed():
                    continue
                error = future.exception
                if getattr(error, "retriable", False):
                    self._unsent.append(letter)
                else:
                    self._refused(letter, error)
            if self._unsent and not self._pending:
                break
        if self._unsent or self._pending:
            waiting = [*self._unsent, *(letter for _f, letter in self._pending)]
            first = waiting[0].rejected
            msg = (
                f"{len(waiting)} dead letter(s) not delivered yet, first "
                f"{first.topic}:{first.partition}@{first.offset}; the next flush waits for them"
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
