"""RecordDecoder's fast path gives exactly what the reference path gives (broker-free)."""

from __future__ import annotations

import json
from collections import namedtuple
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.deserializer import RecordDecoder
from stream_trainer.records import Record, RejectedRecord, RejectReason

Message = namedtuple("Message", "value key topic partition offset timestamp headers")

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)
_values = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=2),
    st.dictionaries(st.text(max_size=2), _scalars, max_size=2),
)
_objects = st.dictionaries(st.sampled_from(["a", "b", "c", "y", "é"]), _values, max_size=5)


def _reference(decoder: RecordDecoder, raw: bytes | None, **where: Any) -> Record | RejectedRecord:
    return decoder._decode_checked(
        raw,
        where.get("key"),
        where.get("topic"),
        where.get("partition"),
        where.get("offset"),
        where.get("timestamp_ms"),
        where.get("headers", ()),
    )


def _encodings(obj: dict[str, Any]) -> list[bytes]:
    text = json.dumps(obj)
    return [
        text.encode(),
        json.dumps(obj, separators=(",", ":")).encode(),
        (" " + text).encode(),
        (text + "\n").encode(),
        (text + " x").encode(),
        (text + text).encode(),
        text.encode()[:-1],
        b"\xef\xbb\xbf" + text.encode(),
    ]


@settings(max_examples=300, deadline=None)
@given(obj=_objects, features=st.sampled_from([None, ("a",), ("a", "b", "zz")]))
def test_fast_path_matches_the_reference(
    obj: dict[str, Any], features: tuple[str, ...] | None
) -> None:
    decoder = RecordDecoder(target="y", features=features, max_record_bytes=120)
    for raw in _encodings(obj):
        where = {"key": b"k", "topic": "t", "partition": 2, "offset": 9, "timestamp_ms": 5}
        expected = _reference(decoder, raw, headers=[("h", b"v")], **where)
        got = decoder.decode(raw, headers=[("h", b"v")], **where)
        assert got == expected
        assert _types(got) == _types(expected)  # 1 == 1.0: equality alone would not see a change
        message = Message(raw, b"k", "t", 2, 9, 5, [("h", b"v")])
        assert decoder.decode_message(message) == expected


def _types(item: Record | RejectedRecord) -> list[tuple[str, type]]:
    return [(k, type(v)) for k, v in (item.value or {}).items()]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"x": 18446744073709551615, "y": 1}',  # 2**64 - 1: orjson's largest integer
        b'{"x": 18446744073709551616, "y": 1}',  # 2**64: orjson reads it as a float
        b'{"x": -9223372036854775809, "y": 1}',  # -2**63 - 1
        b'{"x": 100000000000000000000000000000, "y": 1}',
        b'{"x": 1e19, "y": 1}',  # a float that large takes the reference path; same value
        b'{"x": -0.0, "x": 2, "y": 1}',  # a repeated key: the last value, the first position
        b'{"x": "\\ud800", "y": 1}',  # a lone surrogate: json reads it, orjson does not
        b'{"x": 5e-324, "y": 1}',
        b'{"x": 1E400, "y": 1}',
        b'{"x": NaN}',
        b'{"x": 1}\n',
        b'{"x": 1, "y": 18446744073709551616}',  # the target is not checked, but kept as read
        b'{"x": 1, "y": [100000000000000000000000000000]}',
    ],
)
def test_edge_values_match_the_reference_with_their_types(raw: bytes) -> None:
    decoder = RecordDecoder(target="y")
    got = decoder.decode(raw, topic="t", partition=0, offset=1)
    expected = _reference(decoder, raw, topic="t", partition=0, offset=1)
    assert got == expected
    assert _types(got) == _types(expected)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, RejectReason.NOT_JSON),
        (b"\xff{", RejectReason.NOT_UTF8),
        (b'{"x": 1} extra', RejectReason.NOT_JSON),
        (b"[" * 100_000, RejectReason.TOO_DEEP),
        (b'{"x": ' + b"[" * 100_000, RejectReason.TOO_DEEP),
        (b'{"x": 1e400}', RejectReason.NON_FINITE),
        (b'{"x": 1' + b"0" * 400 + b', "y": 1}', RejectReason.NON_FINITE),  # no float holds it
        (b'{"x": {"a": 1}}', RejectReason.WRONG_TYPE),
        (b'{"y": 0}', RejectReason.NO_FEATURES),
        (b"{}", RejectReason.NO_FEATURES),
    ],
)
def test_rejections_keep_their_reason_and_detail(raw: bytes | None, reason: RejectReason) -> None:
    decoder = RecordDecoder(target="y", max_record_bytes=10_000_000)
    message = Message(raw, None, "t", 0, 1, 2, None)
    item = decoder.decode_message(message)
    assert isinstance(item, RejectedRecord) and item.reason == reason
    assert item == _reference(decoder, raw, topic="t", partition=0, offset=1, timestamp_ms=2)
    assert item.headers == []


def test_accepted_record_carries_where_it_came_from() -> None:
    raw = b'{"a": 1.5, "b": "x", "c": null, "d": true, "y": 1}'
    item = RecordDecoder(target="y").decode_message(Message(raw, b"k", "t", 3, 7, 11, None))
    assert item == Record(
        value={"a": 1.5, "b": "x", "c": None, "d": True, "y": 1},
        key=b"k",
        topic="t",
        partition=3,
        offset=7,
        timestamp_ms=11,
        raw=raw,
    )


def test_an_integer_too_large_for_a_float_is_set_aside_not_raised() -> None:
    """JSON integers have no size limit; one past ~1.8e308 cannot become a float (``math.isfinite``
    raises on it): it is a non-finite feature, and as a regression target a bad label."""
    from stream_trainer.training.labels import parse_regression_target

    huge = 10**400
    raw = json.dumps({"x": huge, "y": 1}).encode()
    item = RecordDecoder(target="y").decode_message(Message(raw, None, "t", 0, 1, 2, None))
    assert isinstance(item, RejectedRecord) and item.reason == RejectReason.NON_FINITE
    assert "an integer of 1329 bits" in item.detail
    assert parse_regression_target(huge) == (
        RejectReason.BAD_LABEL,
        "regression target is an integer of 1329 bits",
    )
    assert parse_regression_target(2**60) == float(2**60)
