"""Kafka message bytes -> :class:`~stream_trainer.records.Record` or
:class:`~stream_trainer.records.RejectedRecord`.

Every value goes through :func:`~stream_trainer.records.decode_json_record` (size, nesting depth
before parsing, UTF-8, JSON, object) and then :func:`~stream_trainer.records.check_values` (finite
scalars; the trainer's screen applies the magnitude and length limits). Python's ``json`` accepts
the non-standard literals ``NaN``, ``Infinity`` and ``-Infinity``; they decode to non-finite floats
and are rejected here as ``non_finite``. A null value (a tombstone) is rejected as ``not_json``.

When a feature subset is configured, only those fields and the target are kept, and the checks run
on what is kept (a malformed field that the model never reads does not reject the record).

Speed: a plain record (a UTF-8 text that is one JSON object with finite scalar features) takes a
fast path that reads it with ``orjson`` and checks the values in one loop; any other value takes
the path above (Python's ``json``), so every rejection keeps its reason and detail word for word.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import orjson

from stream_trainer.records import (
    DEFAULT_MAX_RECORD_BYTES,
    Record,
    RejectedRecord,
    RejectReason,
    check_values,
    decode_json_record,
)

__all__ = ["MessageLike", "RecordDecoder"]

# The fast path reads with orjson; only the common case takes it (see ``accept_plain``), and
# everything else goes through ``decode_json_record`` so errors read exactly the same.
_orjson_loads = orjson.loads
_OrjsonDecodeError = orjson.JSONDecodeError
_INT64_FLOAT = 2.0**63  # orjson reads a larger integer literal as a float


class MessageLike(Protocol):
    """What :meth:`RecordDecoder.decode_message` reads (a kafka-python ``ConsumerRecord``)."""

    @property
    def value(self) -> bytes | None: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def topic(self) -> str | None: ...
    @property
    def partition(self) -> int | None: ...
    @property
    def offset(self) -> int | None: ...
    @property
    def timestamp(self) -> int | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]] | None: ...


class _Message(NamedTuple):
    """A :class:`MessageLike` built from :meth:`RecordDecoder.decode`'s arguments."""

    value: bytes | None
    key: bytes | None
    topic: str | None
    partition: int | None
    offset: int | None
    timestamp: int | None
    headers: Sequence[tuple[str, bytes]] | None


class RecordDecoder:
    """Decode one message value; where it came from is copied onto the result.

    Parameters
    ----------
    target
        Name of the label field (kept, and skipped by the feature checks).
    features
        Feature subset to keep, or ``None`` for all fields.
    max_record_bytes
        Larger values are rejected as ``too_large`` without being decoded.
    """

    __slots__ = ("_keep", "features", "max_record_bytes", "target")

    def __init__(
        self,
        target: str | None = None,
        features: Sequence[str] | None = None,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        self.target = target
        self.features = tuple(features) if features is not None else None
        self.max_record_bytes = max_record_bytes
        keep: frozenset[str] | None = None
        if self.features is not None:
            keep = frozenset(self.features) | ({target} if target is not None else set())
        self._keep = keep

    @property
    def kept_fields(self) -> frozenset[str] | None:
        """The fields a decoded value keeps (the feature subset plus the target), or ``None``."""
        return self._keep

    def accept_plain(self, raw: bytes | None) -> dict[str, Any] | None:
        """The fast path: the kept fields when the record is plainly acceptable, else ``None``.

        *Plainly acceptable* also means that ``raw`` is exactly one JSON object, UTF-8, with
        nothing before or after it (its first byte ``{``, its last ``}``).

        ``None`` does not mean rejected; it means "let :meth:`_decode_checked` decide", which
        re-reads the value the documented way (Python's ``json``) and gives the exact reason and
        detail. Every record accepted here is one :meth:`_decode_checked` accepts with the same
        value, of the same types: the text is read by ``orjson`` (the cheaper path,
        ``python bench/bench_frames.py``), which refuses everything
        ``json`` would read differently or refuse (``NaN``/``Infinity`` literals, lone
        surrogates, a number out of a double's range, a BOM, trailing data) and reads everything
        else to the same values, except integers beyond 64 bits, which it reads as floats: a
        float of magnitude 2**63 or more (in any kept field, the target included, and a target
        that is not a scalar) therefore goes to the reference path too. The loop below is
        :func:`~stream_trainer.records.check_values` with its rejections left to that function
        (orjson's integers are finite; the range test fails for NaN and infinities).
        """
        if raw is None or len(raw) > self.max_record_bytes:
            return None
        if raw[:1] != b"{" or raw[-1:] != b"}":
            return None
        try:
            value = _orjson_loads(raw)
        except _OrjsonDecodeError:  # not UTF-8, not JSON, too deep: the exact path says which
            return None
        keep = self._keep
        if keep is not None:
            value = {k: v for k, v in value.items() if k in keep}
        target = self.target
        n_features = 0
        for name, v in value.items():
            t = type(v)
            if t is float:
                if not -_INT64_FLOAT < v < _INT64_FLOAT:  # NaN and infinities too
                    return None
            elif t is not int and t is not str and t is not bool and v is not None:
                return None  # the target too: a list or object may hold a huge integer
            if name != target:
                n_features += 1
        return value if n_features else None

    def decode(
        self,
        raw: bytes | None,
        *,
        key: bytes | None = None,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> Record | RejectedRecord:
        """Decode one value; ``key`` to ``headers`` are copied onto the result."""
        return self.decode_message(
            _Message(raw, key, topic, partition, offset, timestamp_ms, headers)
        )

    def decode_message(self, message: MessageLike) -> Record | RejectedRecord:
        """:meth:`decode` for a kafka-python ``ConsumerRecord`` (value, key, where it came from,
        its timestamp and headers)."""
        raw = message.value
        kept = self.accept_plain(raw)
        if kept is not None:
            return Record(
                value=kept,
                key=message.key,
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                timestamp_ms=message.timestamp,
                raw=raw,
            )
        return self._decode_checked(
            raw,
            message.key,
            message.topic,
            message.partition,
            message.offset,
            message.timestamp,
            message.headers or (),
        )

    def _decode_checked(
        self,
        raw: bytes | None,
        key: bytes | None,
        topic: str | None,
        partition: int | None,
        offset: int | None,
        timestamp_ms: int | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> Record | RejectedRecord:
        """The reference path: :func:`decode_json_record`, then :func:`check_values`."""
        kept: dict[str, Any] | None = None
        if raw is None:
            reason, detail = RejectReason.NOT_JSON, "value is null (tombstone)"
        else:
            decoded = decode_json_record(raw, max_bytes=self.max_record_bytes)
            if isinstance(decoded, dict):
                kept = decoded
                if self._keep is not None:
                    kept = {k: v for k, v in decoded.items() if k in self._keep}
                problem = check_values(kept, self.target)
                if problem is None:
                    return Record(
                        value=kept,
                        key=key,
                        topic=topic,
                        partition=partition,
                        offset=offset,
                        timestamp_ms=timestamp_ms,
                        raw=raw,
                    )
                reason, detail = problem
            else:
                reason, detail = decoded
        return RejectedRecord(
            reason=reason,
            detail=detail,
            raw=raw,
            value=kept,
            key=key,
            topic=topic,
            partition=partition,
            offset=offset,
            timestamp_ms=timestamp_ms,
            headers=list(headers),
        )
