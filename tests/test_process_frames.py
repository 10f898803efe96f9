"""The frames between the service and its consumer process (broker-free)."""

from __future__ import annotations

import io
import json
import math
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.deserializer import RecordDecoder, _Message
from consumers.kafka_source import SourceBatch, decode_batch
from consumers.process.frames import (
    JSON_HEADER,
    FrameError,
    pack_polled,
    read_frame,
    unpack_batch,
    write_frame,
)

_scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
)
_values = st.dictionaries(
    st.sampled_from(["a", "b", "c", "y", "é", "x y"]),
    st.one_of(_scalars, st.lists(st.integers(), max_size=2)),
    max_size=5,
)


@st.composite
def _raw_values(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.sampled_from(["json", "json", "json", "spaced", "bytes", "none"]))
    if kind == "none":
        return None
    if kind == "bytes":
        return draw(st.binary(max_size=20))
    text = json.dumps(draw(_values), ensure_ascii=draw(st.booleans()))
    return (f" {text}\n" if kind == "spaced" else text).encode()


@st.composite
def _polled(draw: st.DrawFn) -> list[tuple[str, int, list[_Message]]]:
    out = []
    for partition in range(draw(st.integers(0, 3))):
        messages = []
        for offset in range(draw(st.integers(0, 6))):
            key = draw(st.one_of(st.none(), st.binary(max_size=4)))
            header_value = st.one_of(st.none(), st.binary(max_size=3))
            headers = draw(st.lists(st.tuples(st.text(max_size=3), header_value)))
            ts = draw(st.one_of(st.none(), st.integers(0, 2**41)))
            messages.append(_Message(draw(_raw_values()), key, "t", partition, offset, ts, headers))
        out.append(("t", partition, messages))
    return out


def _comparable(batch: SourceBatch) -> tuple[object, ...]:
    def value_items(value: dict[str, object] | None) -> object:
        return None if value is None else json.dumps(list(value.items()))  # order, NaN, -0.0

    records = [
        (r.topic, r.partition, r.offset, r.timestamp_ms, r.key, r.raw, value_items(r.value))
        for r in batch.records
    ]
    rejected = [
        (x.topic, x.partition, x.offset, x.timestamp_ms, x.key, x.raw, x.reason, x.detail,
         value_items(x.value), list(x.headers))
        for x in batch.rejected
    ]  # fmt: skip
    return records, rejected, batch.next_offsets


@settings(max_examples=150, deadline=None)
@given(
    polled=_polled(),
    features=st.one_of(st.none(), st.just(("a", "c"))),
    max_bytes=st.sampled_from([1_000_000, 30]),
)
def test_a_batch_crosses_the_pipe_as_the_in_process_decoder_reads_it(
    polled: list[tuple[str, int, list[_Message]]],
    features: tuple[str, ...] | None,
    max_bytes: int,
) -> None:
    decoder = RecordDecoder("y", features, max_bytes)
    next_offsets = {f"t:{p}": len(m) for _, p, m in polled if m}
    fields, blob = pack_polled(decoder, polled, next_offsets)
    header, blob = _through_a_pipe({"type": "batch", **fields}, blob)
    got = unpack_batch(header, blob)
    assert _comparable(got) == _comparable(decode_batch(decoder, polled, next_offsets))


def _through_a_pipe(header: dict[str, object], blob: bytes) -> tuple[dict[str, object], bytes]:
    """What the pipe carries: ``write_frame`` then ``read_frame`` (orjson or json header)."""
    stream = io.BytesIO()
    write_frame(stream, header, blob)
    stream.seek(0)
    return read_frame(stream)


def _header_is_json(header: dict[str, object]) -> bool:
    stream = io.BytesIO()
    write_frame(stream, header)
    return bool(int.from_bytes(stream.getvalue()[:4], "little") & JSON_HEADER)


def test_batch_headers_go_through_orjson_unless_it_would_change_them() -> None:
    decoder = RecordDecoder("y")
    plain = _Message(b'{"a": 0.5, "n": 7, "c": "k", "y": 1}', None, "t", 0, 0, 1, [])
    huge = _Message(b'{"a": 100000000000000000000000000000, "y": 1}', None, "t", 0, 1, 1, [])
    nan = _Message(b'{"a": NaN, "y": 1}', None, "t", 0, 2, 1, [])
    nan_label = _Message(b'{"a": 1.5, "y": NaN}', None, "t", 0, 3, 1, [])  # accepted: a label
    cases = {
        "plain": ([plain], False),
        "huge int": ([plain, huge], True),
        "NaN": ([nan], True),
        "NaN label": ([plain, nan_label], True),  # the target is not checked: NaN must stay NaN
    }
    got = {}
    for name, (messages, as_json) in cases.items():
        polled = [("t", 0, messages)]
        fields, blob = pack_polled(decoder, polled, {"t:0": len(messages)})
        header = {"type": "batch", **fields}
        assert _header_is_json(header) is as_json, name
        got[name] = unpack_batch(*_through_a_pipe(header, blob))
        expected = decode_batch(decoder, polled, {"t:0": len(messages)})
        assert _comparable(got[name]) == _comparable(expected), name
    assert got["huge int"].records[1].value == {"a": 10**29, "y": 1}
    assert type(got["huge int"].records[1].value["a"]) is int
    assert math.isnan(got["NaN label"].records[1].value["y"])
    rejected_value = got["NaN"].rejected[0].value
    assert rejected_value is not None and math.isnan(rejected_value["a"])
    assert _header_is_json({"type": "event", "x": 1.5})  # only batch frames take orjson


def _one_batch() -> tuple[dict[str, object], bytes]:
    message = _Message(b'{"a": 0.5, "c": "k", "y": 1}', b"k", "t", 0, 3, 7, [])
    fields, blob = pack_polled(RecordDecoder("y"), [("t", 0, [message])], {"t:0": 4})
    return json.loads(json.dumps({"type": "batch", **fields})), blob


def test_a_batch_whose_rows_do_not_match_its_blob_is_refused() -> None:
    header, blob = _one_batch()
    assert unpack_batch(header, blob).records[0].value == {"a": 0.5, "c": "k", "y": 1}
    with pytest.raises(FrameError, match="rows account for"):
        unpack_batch(header, b"extra" + blob)
    with pytest.raises(FrameError, match="rows account for"):
        unpack_batch(header, blob[:3])
    with pytest.raises(FrameError, match="do not match the records"):
        unpack_batch({**header, "values": [{"a": 1.0}]}, blob)  # a value no record takes
    rows = header["records"][0][2]  # type: ignore[index]
    rows[0][4] = 0  # not plain: its value should have come in "values"
    with pytest.raises(FrameError, match="do not match the records"):
        unpack_batch(header, blob)
    rows[0][4] = 1
    with pytest.raises(FrameError, match="does not read back"):
        unpack_batch(header, blob.replace(b"{", b"<"))


def test_frames_round_trip_through_a_pipe_and_a_closed_pipe_is_a_frame_error() -> None:
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb", buffering=0)
    writer = os.fdopen(write_fd, "wb", buffering=0)
    big = os.urandom(300_000)  # more than a pipe holds: written while the other end reads

    def write() -> None:
        write_frame(writer, {"type": "batch", "n": 1})
        write_frame(writer, {"type": "blob", "x": float("nan")}, big)
        writer.close()

    thread = threading.Thread(target=write)
    thread.start()
    assert read_frame(reader) == ({"type": "batch", "n": 1}, b"")
    header, blob = read_frame(reader)
    thread.join()
    assert header["type"] == "blob" and header["x"] != header["x"] and blob == big
    with pytest.raises(FrameError, match="pipe closed after 0 of 8 bytes"):
        read_frame(reader)
    reader.close()


def test_a_frame_without_a_type_is_refused() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "wb", buffering=0) as writer:
        head = b'{"no": "type"}'
        writer.write(len(head).to_bytes(4, "little") + (0).to_bytes(4, "little") + head)
    reader = os.fdopen(read_fd, "rb", buffering=0)
    with reader, pytest.raises(FrameError, match="malformed"):
        read_frame(reader)
