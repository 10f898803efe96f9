"""Records as they flow from a source to the trainer, and the checks every record passes.

A record is a flat JSON object (``dict[str, scalar]``). Values may be ``int``/``float``
(numeric features), ``str`` (categorical features), ``bool`` (numeric 0/1) or ``None`` (missing).
Anything else (lists, nested objects), non-finite numbers, a label of the wrong kind or an
oversized payload is a *rejection*: the record is counted by reason, set aside (dead-lettered) and
never reaches the model.

The limits a record must stay within (each one a trainer or source setting, defaults below):

- ``max_record_bytes`` (:data:`DEFAULT_MAX_RECORD_BYTES`): the encoded value, else ``too_large``;
- :data:`MAX_JSON_DEPTH`: nesting of the JSON text, checked before it is parsed, else
  ``too_deep``; an accepted record is flat (depth 1), so the limit only bounds the cost of
  reading a nested one and decides the reason, which is why it is a constant and not a setting;
- ``max_abs_value`` (:data:`DEFAULT_MAX_ABS_VALUE`): the magnitude of a number, else
  ``out_of_range``;
- ``max_string_length`` (:data:`DEFAULT_MAX_STRING_LENGTH`): a string value or a field name, in
  characters, else ``too_large``.

The limits on what a batch may add to the model (new features, columns, classes) are the
trainer's (:meth:`stream_trainer.training.IncrementalTrainer.screen`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "DEFAULT_MAX_ABS_VALUE",
    "DEFAULT_MAX_RECORD_BYTES",
    "DEFAULT_MAX_STRING_LENGTH",
    "MAX_JSON_DEPTH",
    "Record",
    "RejectReason",
    "RejectedRecord",
    "check_values",
    "decode_json_record",
]

DEFAULT_MAX_RECORD_BYTES = 1_000_000
# Squares of deviations up to 2e100 summed over 1e100 records stay below float64's 1.8e308, so the
# running moments (features, regression target, its metrics) never overflow.
DEFAULT_MAX_ABS_VALUE = 1e100
# Strings become category and feature names in the checkpoint: at most max_features of them.
DEFAULT_MAX_STRING_LENGTH = 1024
MAX_JSON_DEPTH = 16


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
    OUT_OF_RANGE = "out_of_range"
    TOO_DEEP = "too_deep"
    TOO_MANY_NEW_FEATURES = "too_many_new_features"
    TOO_MANY_FEATURES = "too_many_features"
    TOO_MANY_CLASSES = "too_many_classes"
    BAD_ID = "bad_id"
    DUPLICATE_ID = "duplicate_id"


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
        if raw is None:  # a record built in Python: any object, a cycle even
            try:
                raw = json.dumps(record.value, default=str).encode("utf-8", "backslashreplace")
            except (TypeError, ValueError, RecursionError):
                raw = repr(record.value)[:DEFAULT_MAX_RECORD_BYTES].encode("utf-8", "replace")
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

    Returns the object, or ``(reason, detail)``. Only shape is checked here (size, then nesting
    depth before anything is parsed); value types are checked by :func:`check_values` and
    feature-kind consistency by the feature encoder.
    """
    if len(raw) > max_bytes:
        return RejectReason.TOO_LARGE, f"{len(raw)} bytes > limit {max_bytes}"
    if json_depth_exceeds(raw, MAX_JSON_DEPTH):
        return RejectReason.TOO_DEEP, f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RejectReason.NOT_UTF8, str(exc)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        return RejectReason.NOT_JSON, str(exc)
    except ValueError as exc:  # an integer literal past Python's digit limit for int()
        return RejectReason.OUT_OF_RANGE, str(exc)
    if not isinstance(value, dict):
        return RejectReason.NOT_OBJECT, f"top-level JSON value is {type(value).__name__}"
    return value


# A JSON string (escapes included) as one token, or one bracket.
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_OPENING = frozenset(b"[{")


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """True when the JSON text ``raw`` nests arrays and objects deeper than ``limit`` (the top-level
    object is depth 1). Brackets inside strings do not count; malformed text is answered as well
    as it can be (the parser rejects it next). Costs one ``bytes.count`` per bracket kind when
    there are too few brackets to go that deep, and stops at the first level beyond ``limit``."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for match in _JSON_TOKENS.finditer(raw):
        first = match.group()[0]
        if first in _OPENING:
            depth += 1
            if depth > limit:
                return True
        elif first != 0x22:  # a closing bracket (0x22 is a string's quote)
            depth -= 1
    return False


def is_finite_number(v: int | float) -> bool:
    """True for a finite float, or an int a float can hold: JSON integers have no size limit, and
    ``math.isfinite`` raises ``OverflowError`` on one beyond ~1.8e308 instead of answering."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def describe_number(v: int | float) -> str:
    """A number for a rejection's detail: a float as written, an integer by its size when long."""
    if isinstance(v, int) and v.bit_length() > 64:
        return f"an integer of {v.bit_length()} bits"
    return repr(v)


def check_values(
    value: dict[str, Any],
    target: str | None,
    *,
    max_abs_value: float | None = None,
    max_string_length: int | None = None,
) -> tuple[RejectReason, str] | None:
    """Check that every field name is a string and every feature value a finite scalar, within
    the limits given (``None``: no limit); the label is checked by the trainer.

    Returns ``None`` when the record is acceptable, else ``(reason, detail)``.
    """
    n_features = 0
    for name, v in value.items():
        if type(name) is not str:
            return RejectReason.WRONG_TYPE, f"field name {name!r} is not a string"
        if max_string_length is not None and len(name) > max_string_length:
            detail = f"field name of {len(name)} characters > limit {max_string_length}"
            return RejectReason.TOO_LARGE, detail
        if name == target:
            continue
        if v is None or isinstance(v, bool):
            n_features += 1
            continue
        if isinstance(v, str):
            if max_string_length is not None and len(v) > max_string_length:
                detail = f"feature {name!r} is a string of {len(v)} characters > limit"
                return RejectReason.TOO_LARGE, f"{detail} {max_string_length}"
            n_features += 1
            continue
        if isinstance(v, int | float):
            if not is_finite_number(v):
                return RejectReason.NON_FINITE, f"feature {name!r} is {describe_number(v)}"
            if max_abs_value is not None and not -max_abs_value <= v <= max_abs_value:
                detail = f"feature {name!r} is {describe_number(v)}, beyond +-{max_abs_value:g}"
                return RejectReason.OUT_OF_RANGE, detail
            n_features += 1
            continue
        return RejectReason.WRONG_TYPE, f"feature {name!r} has type {type(v).__name__}"
    if n_features == 0:
        return RejectReason.NO_FEATURES, "record has no feature besides the target"
    return None
