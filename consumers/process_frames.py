"""The wire between the service and its consumer process (:mod:`consumers.consumer_process`).

Everything crosses a pair of pipes as *frames*, and nothing on them is pickled: a frame is

    <u32 header length> <u32 blob length> <header: UTF-8 JSON object> <blob: raw bytes>

(little-endian lengths). The header carries a ``"type"`` and the small fields; the blob carries
message keys and values exactly as the broker returned them, so that a record the service sets
aside (dead letter) keeps its original bytes.

The child decodes and checks the values itself, and a decoded batch
(:class:`~consumers.kafka_source.SourceBatch`) travels as one frame (:func:`pack_polled` /
:func:`unpack_batch`). Its header holds one row per record, grouped by partition (offset,
timestamp, the lengths of its key and original bytes, ``-1`` for null, and its schema), the
records' non-float values as JSON, the schemas (field names in order, and which hold floats), one
row per rejected record (reason, detail, the value when there was one, headers as
``[[name, base64 value or null], ...]``) and the next offsets. The blob is the keys and original
bytes of the records in row order, then those of the rejected records, then the records' floats as
native doubles: the two ends of the pipe are one machine.
"""

from __future__ import annotations

import base64
import json
import struct
from array import array
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, BinaryIO

from consumers.deserializer import MessageLike, RecordDecoder
from consumers.kafka_source import SourceBatch
from stream_trainer.records import Record, RejectedRecord, RejectReason

__all__ = [
    "PROTOCOL_VERSION",
    "FrameError",
    "pack_polled",
    "read_frame",
    "unpack_batch",
    "write_frame",
]

PROTOCOL_VERSION = 1
_LENGTHS = struct.Struct("<II")


class FrameError(EOFError):
    """The other side closed the pipe (or sent a frame cut short)."""


def write_frame(stream: BinaryIO, header: dict[str, Any], blob: bytes = b"") -> None:
    """Write one frame, all of it (an unbuffered pipe may take a write in parts), and flush."""
    # NaN and infinities only appear in a rejected record's value (they are why it was rejected);
    # both sides are Python's json, which reads back what it writes.
    head = json.dumps(header, separators=(",", ":")).encode()
    for part in (_LENGTHS.pack(len(head), len(blob)) + head, blob):
        view = memoryview(part)
        while view:
            written = stream.write(view)
            if not written:  # only a non-blocking pipe does this, and ours block
                raise BlockingIOError("the pipe took none of the frame")
            view = view[written:]
    stream.flush()


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    if n == 0:
        return b""
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        k = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            raise FrameError(f"pipe closed after {got} of {n} bytes")
        got += k
    return bytes(buffer)


def read_frame(stream: BinaryIO) -> tuple[dict[str, Any], bytes]:
    """Read one frame: ``(header, blob)``. Raises :class:`FrameError` when the pipe is closed."""
    head_len, blob_len = _LENGTHS.unpack(_read_exact(stream, _LENGTHS.size))
    header = json.loads(_read_exact(stream, head_len))
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise FrameError(f"malformed frame header {str(header)[:200]!r}")
    return header, _read_exact(stream, blob_len)


def _pack_bytes(value: bytes | None, chunks: list[bytes]) -> int:
    if value is None:
        return -1
    if value:
        chunks.append(value)
    return len(value)


def _pack_headers(headers: Sequence[tuple[str, bytes | None]]) -> list[Any] | None:
    if not headers:
        return None
    return [[k, None if v is None else base64.b64encode(v).decode()] for k, v in headers]


Getter = Callable[[Sequence[Any]], tuple[Any, ...]]


def _picker(positions: list[int]) -> Getter:
    """``held -> tuple(held[i] for i in positions)`` at C speed (``itemgetter``)."""
    if len(positions) > 1:
        return itemgetter(*positions)
    if positions:
        (i,) = positions
        return lambda held: (held[i],)
    return lambda held: ()


def _getters(types: tuple[type, ...]) -> tuple[Getter, Getter]:
    """Two pickers for a schema: its float values, and its other values, in order."""
    is_float = [t is float for t in types]
    return (
        _picker([i for i, f in enumerate(is_float) if f]),
        _picker([i for i, f in enumerate(is_float) if not f]),
    )


def pack_polled(
    decoder: RecordDecoder,
    polled: Sequence[tuple[str, int, Sequence[MessageLike]]],
    next_offsets: dict[str, int],
) -> tuple[dict[str, Any], bytes]:
    """Decode and check polled messages (``[(topic, partition, messages), ...]``) with
    ``decoder``, as :func:`~consumers.kafka_source.decode_batch` does, into (header fields, blob).

    Floats are what costs: writing the decoded values as JSON and reading them back takes more
    than the whole decode (``python bench/bench_frames.py``: about 13 us a record of 10 floats,
    against 9 us for ``decode_batch``). So a plainly acceptable record
    (:meth:`~consumers.deserializer.RecordDecoder.accept_plain`) travels as its *schema* (its field
    names, in order, and which of them hold floats; one header entry per distinct schema), its float
    values as raw doubles at the end of the blob, and its other values as JSON. Any other accepted
    record travels with its decoded value as JSON (schema ``-1``).
    """
    chunks: list[bytes] = []  # keys and original bytes of the records, in row order
    rejected_chunks: list[bytes] = []  # then those of the rejected records
    parts: list[Any] = []
    values: list[Any] = []
    rejected: list[Any] = []
    # (field names, value types) -> (schema id, float getter, other getter)
    plans: dict[tuple[tuple[str, ...], tuple[type, ...]], tuple[int, Getter, Getter]] = {}
    floats = array("d")
    accept_plain = decoder.accept_plain
    for topic, partition, messages in polled:
        rows: list[Any] = []
        parts.append([topic, partition, rows])
        for m in messages:
            item: Record | RejectedRecord
            kept = accept_plain(m.value)
            if kept is not None:
                key_len = _pack_bytes(m.key, chunks)
                raw_len = _pack_bytes(m.value, chunks)
                held = tuple(kept.values())
                schema = (tuple(kept), tuple(map(type, held)))
                plan = plans.get(schema)
                if plan is None:
                    plan = plans[schema] = (len(plans), *_getters(schema[1]))
                sid, float_values, other_values = plan
                floats.extend(float_values(held))
                values.append(other_values(held))
                rows.append([m.offset, m.timestamp, key_len, raw_len, sid])
                continue
            item = decoder.decode_message(m)
            if isinstance(item, Record):
                key_len = _pack_bytes(item.key, chunks)
                raw_len = _pack_bytes(item.raw, chunks)
                rows.append([m.offset, m.timestamp, key_len, raw_len, -1])
                values.append(item.value)
                continue
            key_len = _pack_bytes(item.key, rejected_chunks)
            raw_len = _pack_bytes(item.raw, rejected_chunks)
            rejected.append(
                [
                    str(item.reason),
                    item.detail,
                    item.value,
                    topic,
                    partition,
                    m.offset,
                    m.timestamp,
                    key_len,
                    raw_len,
                    _pack_headers(item.headers),
                ]
            )
    chunks += rejected_chunks
    chunks.append(floats.tobytes())
    fields = {
        "records": parts,
        "values": values,
        "rejected": rejected,
        "schemas": [[list(names), [t is float for t in types]] for names, types in plans],
        "floats": len(floats),
        "next_offsets": next_offsets,
    }
    return fields, b"".join(chunks)


def _merge_plan(names: list[str], is_float: list[bool]) -> tuple[tuple[str, ...], int, Getter]:
    """For a schema: its names, its float count, and the picker that puts ``floats + others``
    back in field order."""
    float_at = [i for i, f in enumerate(is_float) if f]
    other_at = [i for i, f in enumerate(is_float) if not f]
    source = {field: k for k, field in enumerate(float_at + other_at)}
    return tuple(names), len(float_at), _picker([source[i] for i in range(len(names))])


def unpack_batch(header: dict[str, Any], blob: bytes) -> SourceBatch:
    """The inverse of :func:`pack_polled`. Raises :class:`FrameError` when the rows do not account
    for the blob exactly."""
    n_floats = int(header["floats"])
    floats_at = len(blob) - 8 * n_floats
    if floats_at < 0:
        raise FrameError(f"batch frame: {n_floats} floats announced, {len(blob)} bytes sent")
    doubles = array("d")
    doubles.frombytes(blob[floats_at:])
    floats = doubles.tolist()
    plans = [_merge_plan(names, mask) for names, mask in header["schemas"]]
    at = 0

    def take(n: int) -> bytes | None:
        nonlocal at
        if n < 0:
            return None
        at += n
        return blob[at - n : at]

    batch = SourceBatch(next_offsets={k: int(v) for k, v in header["next_offsets"].items()})
    records = batch.records
    values = iter(header["values"])
    used = 0  # floats taken so far
    for topic, partition, rows in header["records"]:
        for offset, timestamp, key_len, raw_len, sid in rows:
            key = take(key_len)
            raw = take(raw_len)
            held = next(values)
            if sid >= 0:
                names, n_float, pick = plans[sid]
                merged = floats[used : used + n_float] + held
                used += n_float
                held = dict(zip(names, pick(merged), strict=True))
            records.append(Record(held, key, topic, partition, offset, timestamp, raw))
    if next(values, None) is not None or used != n_floats:
        raise FrameError("batch frame: values and floats do not match the records")
    for row in header["rejected"]:
        reason, detail, value, topic, partition, offset, timestamp, key_len, raw_len, hs = row
        key = take(key_len)
        raw = take(raw_len)
        headers = [(k, None if v is None else base64.b64decode(v)) for k, v in hs or ()]
        batch.rejected.append(
            RejectedRecord(
                RejectReason(reason),
                detail,
                raw,
                value,
                key,
                topic,
                partition,
                offset,
                timestamp,
                headers,  # type: ignore[arg-type]
            )
        )
    if at != floats_at:
        raise FrameError(f"batch frame: rows account for {at} bytes, the blob has {len(blob)}")
    return batch
