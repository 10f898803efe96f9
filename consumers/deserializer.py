"""Kafka message bytes -> :class:`~stream_trainer.records.Record` or
:class:`~stream_trainer.records.RejectedRecord`.

Every value goes through :func:`~stream_trainer.records.decode_json_record` (size, UTF-8, JSON,
object) and then :func:`~stream_trainer.records.check_values` (finite scalars). Python's ``json``
accepts the non-standard literals ``NaN``, ``Infinity`` and ``-Infinity``; they decode to
non-finite floats and are rejected here as ``non_finite``. A null value (a tombstone) is
rejected as ``not_json``.

When a feature subset is configured, only those fields and the target are kept, and the checks run
on what is kept (a malformed field that the model never reads does not reject the record).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stream_trainer.records import (
    DEFAULT_MAX_RECORD_BYTES,
    Record,
    RejectedRecord,
    RejectReason,
    check_values,
    decode_json_record,
)

__all__ = ["RecordDecoder"]


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
