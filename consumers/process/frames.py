"""The wire between the service and its consumer process (:mod:`consumers.process.child`).

Everything crosses a pair of pipes as *frames*, and nothing on them is pickled: a frame is

    <u32 header length> <u32 blob length> <header: UTF-8 JSON object> <blob: raw bytes>

(little-endian lengths). The header carries a ``"type"`` and the small fields; the blob carries
message keys and values exactly as the broker returned them, so that a record the service sets
aside (dead letter) keeps its original bytes.

A batch's header (:func:`pack_polled`) whose records are all plain (below) and none rejected is
written by ``orjson``, much cheaper than ``json`` each way: it holds no float at all (rows of
integers, names, the next offsets), and orjson refuses what it could not write back as it was (an
integer beyond 64 bits, a lone surrogate). Every other header is written by Python's ``json``, which
reads back what it writes, NaN included (a rejected value, or an accepted record's label, may hold
one: orjson would write it as ``null``); the top bit of the header length (:data:`JSON_HEADER`)
tells the reader which.

The child decodes and checks the values itself, and a decoded batch
(:class:`~consumers.kafka_source.SourceBatch`) travels as one frame (:func:`pack_polled` /
:func:`unpack_batch`). Its header holds one row per record, grouped by partition (offset,
timestamp, the lengths of its key and original bytes, ``-1`` for null, and whether it is
*plain*), the decoded values of the records that are not plain, the fields a value keeps (the
feature subset and the target, or null for all), one row per rejected record (reason, detail, the
value when there was one, headers as ``[[name, base64 value or null], ...]``) and the next
offsets. The blob is the keys and original bytes of the records in row order, then those of the
rejected records.

A *plain* record is one :meth:`~consumers.deserializer.RecordDecoder.accept_plain` accepted: its
original bytes are one JSON object that ``orjson`` reads to its decoded value (before the kept
fields are picked). So its value does not travel twice: the service reads the original bytes of
all plain records of a batch back with one ``orjson.loads`` of ``[raw, raw, ...]`` and picks the
kept fields (``python bench/bench_frames.py`` times each side of the pipe).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from typing import Any, BinaryIO

import orjson

from consumers.deserializer import MessageLike, RecordDecoder
from consumers.kafka_source import SourceBatch
from stream_trainer.records import Record, RejectedRecord, RejectReason

__all__ = [
    "JSON_HEADER",
    "PROTOCOL_VERSION",
    "FrameError",
    "pack_polled",
    "read_frame",
    "unpack_batch",
    "write_frame",
]

PROTOCOL_VERSION = 2
_LENGTHS = struct.Struct("<II")
JSON_HEADER = 1 << 31
"""Set in the header length when the header was written by ``json`` rather than ``orjson``."""


class FrameError(EOFError):
    """The other side closed the pipe (or sent a frame cut short)."""


def write_frame(stream: BinaryIO, header: dict[str, Any], blob: bytes = b"") -> None:
    """Write one frame, all of it (an unbuffered pipe may take a write in parts), and flush."""
    head, flag = _dumps(header)
    for part in (_LENGTHS.pack(len(head) | flag, len(blob)) + head, blob):
        view = memoryview(part)
        while view:
            written = stream.write(view)
            if not written:  # only a non-blocking pipe does this, and ours block
                raise BlockingIOError("the pipe took none of the frame")
            view = view[written:]
    stream.flush()


def _dumps(header: dict[str, Any]) -> tuple[bytes, int]:
    """The header's bytes and the flag for its length (module docstring)."""
    # Only plain records (their rows, no decoded value) and no rejected ones: every number in it
    # is an integer of 64 bits at most. A decoded value may hold a NaN label (the target is not
    # checked by the decoder), which orjson would write as null.
    if header["type"] == "batch" and not header.get("rejected") and not header.get("values"):
        try:
            return orjson.dumps(header), 0
        except (TypeError, orjson.JSONEncodeError):  # a huge integer, a lone surrogate
            pass
    return json.dumps(header, separators=(",", ":")).encode(), JSON_HEADER


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
    if head_len & JSON_HEADER:
        header = json.loads(_read_exact(stream, head_len & ~JSON_HEADER))
    else:
        header = orjson.loads(_read_exact(stream, head_len))
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


def pack_polled(
    decoder: RecordDecoder,
    polled: Sequence[tuple[str, int, Sequence[MessageLike]]],
    next_offsets: dict[str, int],
) -> tuple[dict[str, Any], bytes]:
    """Decode and check polled messages (``[(topic, partition, messages), ...]``) with
    ``decoder``, as :func:`~consumers.kafka_source.decode_batch` does, into (header fields, blob).

    A plain record (:meth:`~consumers.deserializer.RecordDecoder.accept_plain`) travels as its
    original bytes only (module docstring); any other accepted record with its decoded value.
    """
    chunks: list[bytes] = []  # keys and original bytes of the records, in row order
    rejected_chunks: list[bytes] = []  # then those of the rejected records
    parts: list[Any] = []
    values: list[Any] = []  # the decoded values of the records that are not plain
    rejected: list[Any] = []
    accept_plain = decoder.accept_plain
    for topic, partition, messages in polled:
        rows: list[Any] = []
        parts.append([topic, partition, rows])
        for m in messages:
            item: Record | RejectedRecord
            if accept_plain(m.value) is not None:
                rows.append(
                    [
                        m.offset,
                        m.timestamp,
                        _pack_bytes(m.key, chunks),
                        _pack_bytes(m.value, chunks),
                        1,
                    ]
                )
                continue
            item = decoder.decode_message(m)
            if isinstance(item, Record):
                key_len = _pack_bytes(item.key, chunks)
                raw_len = _pack_bytes(item.raw, chunks)
                rows.append([m.offset, m.timestamp, key_len, raw_len, 0])
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
    kept = decoder.kept_fields
    fields = {
        "records": parts,
        "values": values,
        "kept": None if kept is None else sorted(kept),
        "rejected": rejected,
        "next_offsets": next_offsets,
    }
    return fields, b"".join(chunks)


def _cut(blob: bytes, at: int, n: int) -> tuple[bytes | None, int]:
    """``n`` bytes of ``blob`` from ``at`` (``None`` for ``-1``) and where the next part starts."""
    if n < 0:
        return None, at
    return blob[at : at + n], at + n


def unpack_batch(header: dict[str, Any], blob: bytes) -> SourceBatch:
    """The inverse of :func:`pack_polled`. Raises :class:`FrameError` when the rows do not account
    for the blob exactly or the values do not match the records."""
    rows = [
        (topic, partition, *row) for topic, partition, part in header["records"] for row in part
    ]
    # The blob: a key and the original bytes per record row, then per rejected row, in order.
    keys: list[bytes | None] = []
    raws: list[bytes | None] = []
    at = 0
    for row in rows:
        key, at = _cut(blob, at, row[4])
        raw, at = _cut(blob, at, row[5])
        keys.append(key)
        raws.append(raw)
    rejected_cuts = []
    for row in header["rejected"]:
        key, at = _cut(blob, at, row[7])
        raw, at = _cut(blob, at, row[8])
        rejected_cuts.append((key, raw))
    if at != len(blob):
        raise FrameError(f"batch frame: rows account for {at} bytes, the blob has {len(blob)}")

    plain_raws = [raw for raw, row in zip(raws, rows, strict=True) if row[6]]
    try:
        plain = orjson.loads(b"[" + b",".join(plain_raws) + b"]")  # type: ignore[arg-type]
    except (TypeError, orjson.JSONDecodeError) as exc:
        raise FrameError(f"batch frame: a plain record does not read back: {exc}") from exc
    kept = header.get("kept")
    if kept is not None:
        keep = frozenset(kept)
        plain = [{k: v for k, v in value.items() if k in keep} for value in plain]
    others = header["values"]
    if len(plain) + len(others) != len(rows) or not all(isinstance(v, dict) for v in plain):
        raise FrameError("batch frame: the values do not match the records")
    plain_values, other_values = iter(plain), iter(others)

    batch = SourceBatch(next_offsets={k: int(v) for k, v in header["next_offsets"].items()})
    records = batch.records
    for (topic, partition, offset, timestamp, _k, _r, is_plain), key, raw in zip(
        rows, keys, raws, strict=True
    ):
        value = next(plain_values) if is_plain else next(other_values)
        records.append(Record(value, key, topic, partition, offset, timestamp, raw))
    for row, (key, raw) in zip(header["rejected"], rejected_cuts, strict=True):
        reason, detail, value, topic, partition, offset, timestamp, _k, _r, hs = row
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
    return batch
