"""Recordings: a Kafka topic captured to a file, byte for byte, to train or replay from later.

Format (JSON Lines, UTF-8; gzip-compressed when the file name ends in ``.gz``)::

    {"format": "stream-trainer-recording", "version": 1, "topic": "clicks", "created_at": "..."}
    {"topic": "clicks", "partition": 0, "offset": 0, "timestamp": 1717171717000,
     "key": "user-1", "value": "{\\"x\\": 1.5, \\"y\\": 0}"}
    {"topic": "clicks", "partition": 2, "offset": 7, "timestamp": 1717171717003,
     "key": null, "value": null, "value_b64": "/w=="}

The first line is the header; each following line is one message, in the order it was consumed (so
in offset order within each partition). ``key`` and ``value`` hold the bytes as a string when they
are valid UTF-8; otherwise the string is ``null`` and ``key_b64`` / ``value_b64`` hold the bytes in
base64, so malformed records round-trip exactly. ``null`` without a ``_b64`` field is a null key or
value (a tombstone). ``timestamp`` is in ms since the epoch, or ``null``.

A reader refuses a header with another ``format`` or a ``version`` it does not know
(:class:`~stream_trainer.errors.DataError`); version 1 is the only one so far.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

from stream_trainer.errors import DataError

__all__ = [
    "RECORDING_FORMAT",
    "RECORDING_VERSION",
    "RecordingEntry",
    "RecordingHeader",
    "RecordingWriter",
    "decode_entry",
    "encode_entry",
    "is_recording",
    "read_recording",
    "read_recording_header",
]

RECORDING_FORMAT = "stream-trainer-recording"
RECORDING_VERSION = 1
_SNIFF_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class RecordingEntry:
    """One recorded message."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class RecordingHeader:
    topic: str | None
    created_at: str
    version: int = RECORDING_VERSION


def _open_text(path: Path, mode: str) -> IO[str]:
    if path.suffix.lower() == ".gz":
        return cast(IO[str], gzip.open(path, mode + "t", encoding="utf-8", newline="\n"))
    return open(path, mode, encoding="utf-8", newline="\n")


def _put_bytes(out: dict[str, Any], name: str, data: bytes | None) -> None:
    if data is None:
        out[name] = None
        return
    try:
        out[name] = data.decode("utf-8")
    except UnicodeDecodeError:
        out[name] = None
        out[name + "_b64"] = base64.b64encode(data).decode("ascii")


def _get_bytes(line: dict[str, Any], name: str, where: str) -> bytes | None:
    encoded = line.get(name + "_b64")
    if encoded is not None:
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise DataError(f"{where}: {name}_b64 is not valid base64: {exc}") from None
    text = line.get(name)
    if text is None:
        return None
    if not isinstance(text, str):
        raise DataError(f"{where}: {name} must be a string or null, got {type(text).__name__}")
    return text.encode("utf-8")


def encode_entry(entry: RecordingEntry) -> str:
    """One JSON line (without the newline) for ``entry``."""
    out: dict[str, Any] = {
        "topic": entry.topic,
        "partition": entry.partition,
        "offset": entry.offset,
        "timestamp": entry.timestamp_ms,
    }
    _put_bytes(out, "key", entry.key)
    _put_bytes(out, "value", entry.value)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def decode_entry(text: str, where: str = "recording") -> RecordingEntry:
    """Inverse of :func:`encode_entry`; a :class:`DataError` naming ``where`` when malformed."""
    try:
        line = json.loads(text)
    except (ValueError, RecursionError) as exc:  # not JSON, too deep, an integer of 4,300+ digits
        raise DataError(f"{where}: not JSON: {exc}") from None
    if not isinstance(line, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(line).__name__}")
    try:
        topic, partition, offset = line["topic"], line["partition"], line["offset"]
    except KeyError as exc:
        raise DataError(f"{where}: missing field {exc.args[0]!r}") from None
    timestamp = line.get("timestamp")
    if not isinstance(topic, str):
        raise DataError(f"{where}: topic must be a string, got {topic!r}")
    for name, value in (("partition", partition), ("offset", offset), ("timestamp", timestamp)):
        if value is None and name == "timestamp":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{where}: {name} must be an integer, got {value!r}")
    return RecordingEntry(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=timestamp,
        key=_get_bytes(line, "key", where),
        value=_get_bytes(line, "value", where),
    )


def _parse_header(text: str, path: Path) -> RecordingHeader:
    try:
        header = json.loads(text)
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != RECORDING_FORMAT:
        raise DataError(f"{path}: not a stream-trainer recording (no header line)")
    version = header.get("version")
    if version != RECORDING_VERSION:
        msg = (
            f"{path}: recording format version {version!r} is not supported "
            f"(this stream-trainer reads version {RECORDING_VERSION})"
        )
        raise DataError(msg)
    return RecordingHeader(
        topic=header.get("topic"), created_at=str(header.get("created_at", "")), version=version
    )


def read_recording_header(path: str | Path) -> RecordingHeader:
    """The header of a recording; :class:`DataError` when ``path`` is not one."""
    path = Path(path)
    try:
        with _open_text(path, "r") as f:
            first = f.readline()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    return _parse_header(first, path)


def is_recording(path: str | Path) -> bool:
    """True when the first line of ``path`` is a recording header (any version)."""
    path = Path(path)
    try:
        with _open_text(path, "r") as f:
            first = f.readline(_SNIFF_BYTES)
        header = json.loads(first)
    except (OSError, EOFError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(header, dict) and header.get("format") == RECORDING_FORMAT


def read_recording(path: str | Path) -> Iterator[RecordingEntry]:
    """Yield the entries of a recording in file order.

    Raises
    ------
    DataError
        When the file is not a recording, has an unsupported version, or a line is malformed (the
        error names the line number).
    """
    path = Path(path)
    try:
        f = _open_text(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc}") from None
    with f:
        try:
            _parse_header(f.readline(), path)
            for lineno, text in enumerate(f, start=2):
                if text.strip():
                    yield decode_entry(text, where=f"{path}:{lineno}")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read: {exc}") from None


class RecordingWriter:
    """Write a recording; use as a context manager.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.jsonl.gz"
    >>> with RecordingWriter(path, topic="t") as w:
    ...     w.write(RecordingEntry("t", 0, 0, 1000, b"k", b'{"x": 1}'))
    ...     w.write(RecordingEntry("t", 1, 0, 1001, None, b"\\xff"))
    >>> [e.value for e in read_recording(path)]
    [b'{"x": 1}', b'\\xff']
    """

    def __init__(
        self,
        path: str | Path,
        *,
        topic: str | None,
        created_at: datetime | None = None,
    ) -> None:
        self.path = Path(path)
        self.topic = topic
        self.count = 0
        stamp = (created_at or datetime.now(UTC)).isoformat(timespec="seconds")
        self._file: IO[str] | None = _open_text(self.path, "w")
        header = {
            "format": RECORDING_FORMAT,
            "version": RECORDING_VERSION,
            "topic": topic,
            "created_at": stamp,
        }
        self._file.write(json.dumps(header) + "\n")

    def write(self, entry: RecordingEntry) -> None:
        if self._file is None:
            raise DataError(f"{self.path}: recording writer is closed")
        self._file.write(encode_entry(entry) + "\n")
        self.count += 1

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Close the file (a gzip file is only complete once closed). Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
