"""Records as they flow from a source to the trainer, and the checks every record passes.

A record is a flat JSON object (``dict[str, scalar]``). Values may be ``int``/``float``
(numeric features), ``str`` (categorical features), ``bool`` (numeric 0/1) or ``None`` (missing).
Anything else (lists, nested objects), non-finite numbers, a label of the wrong kind or an
oversized payload is a *rejection*: the record is counted by reason, set aside (dead-lettered) and
never reaches the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "DEFAULT_MAX_RECORD_BYTES",
    "Record",
    "RejectReason",
    "RejectedRecord",
    "check_values",
    "decode_json_record",
]

DEFAULT_MAX_RECORD_BYTES = 1_000_000


class RejectReason(StrEnum):
    """Why a record was set aside. The values are stable: they are metric labels and DLQ headers."""

    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    WRONG_TYPE = "wrong_type"
    NON_FINITE = "non_finite"
    BAD_LABEL = "bad_label"
    TOO_LARGE = "too_large"
    NO_FEATURES = "no_features"


@dataclass(slots=True)
class Record:
    """One decoded record and, when it came from Kafka or a recording, where it came from."""

    value: dict[str, Any]
    key: bytes | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    timestamp_ms: int | None = None
    raw: bytes | None = None


@dataclass(slots=True)
class RejectedRecord:
    """A record set aside, with its original bytes when there were any, and the reason."""

    reason: RejectReason
    detail: str
    raw: bytes | None = None
    value: dict[str, Any] | None = None
    key: bytes | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    timestamp_ms: int | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    @classmethod
    def of(cls, record: Record, reason: RejectReason, detail: str) -> RejectedRecord:
        raw = record.raw
        if raw is None:
            raw = json.dumps(record.value, default=str).encode()
        return cls(
            reason=reason,
            detail=detail,
            raw=raw,
            value=record.value,
            key=record.key,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp_ms,
        )


def decode_json_record(
    raw: bytes, *, max_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> dict[str, Any] | tuple[RejectReason, str]:
    """Decode a Kafka value (or a JSON Lines line) into a flat object, or say why not.

    Returns the object, or ``(reason, detail)``. Only shape is checked here; value types are
    checked by :func:`check_values` and feature-kind consistency by the feature encoder.
    """
    if len(raw) > max_bytes:
        return RejectReason.TOO_LARGE, f"{len(raw)} bytes > limit {max_bytes}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RejectReason.NOT_UTF8, str(exc)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        return RejectReason.NOT_JSON, str(exc)
    if not isinstance(value, dict):
        return RejectReason.NOT_OBJECT, f"top-level JSON value is {type(value).__name__}"
    return value


def is_finite_number(v: int | float) -> bool:
    """True for a finite float, or an int a float can hold: JSON integers have no size limit, and
    ``math.isfinite`` raises ``OverflowError`` on one beyond ~1.8e308 instead of answering."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def check_values(value: dict[str, Any], target: str | None) -> tuple[RejectReason, str] | None:
    """Check that every feature value is a finite scalar; the label is checked by the trainer.

    Returns ``None`` when the record is acceptable, else ``(reason, detail)``.
    """
    n_features = 0
    for name, v in value.items():
        if name == target:
            continue
        if v is None or isinstance(v, str | bool):
            n_features += 1
            continue
        if isinstance(v, int | float):
            if not is_finite_number(v):
                shown = repr(v) if isinstance(v, float) else f"an integer of {v.bit_length()} bits"
                return RejectReason.NON_FINITE, f"feature {name!r} is {shown}"
            n_features += 1
            continue
        return RejectReason.WRONG_TYPE, f"feature {name!r} has type {type(v).__name__}"
    if n_features == 0:
        return RejectReason.NO_FEATURES, "record has no feature besides the target"
    return None
