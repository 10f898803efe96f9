"""Readers for record files: CSV (optionally gzipped), ARFF and JSON Lines.

Every reader yields :class:`~stream_trainer.records.Record` for rows it could read and
:class:`~stream_trainer.records.RejectedRecord` for rows it could not (a JSON line that is not an
object, say). Type checks on values happen later, in one place (the trainer), so that a record
from a file and a record from Kafka are judged by the same rules.

CSV typing: the first ``SCHEMA_SCAN_ROWS`` rows decide which columns are numeric (a column is
numeric when at least half of its non-empty cells parse as numbers: the majority rule with which
the trainer decides a new feature's kind, so a stray word in a numeric column never turns it
categorical). In a numeric column a cell that does not parse is kept as its string, which the
trainer then rejects as ``wrong_type``; an empty cell is a missing value (``None``); ``nan``/``inf``
parse as floats and are rejected as ``non_finite``. Integral numbers become ``int`` so that class
labels such as ``1`` and ``1.0`` agree. A row the ``csv`` module cannot read (a cell over its field
size limit, a NUL byte) is rejected as ``wrong_type`` and reading goes on.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from stream_trainer.errors import DataError
from stream_trainer.records import Record, RejectedRecord, RejectReason, decode_json_record

__all__ = ["SCHEMA_SCAN_ROWS", "iter_arff", "iter_csv", "iter_jsonl", "open_text"]

SCHEMA_SCAN_ROWS = 1000
_NUMERIC_SHARE = 0.5


def open_text(path: Path) -> IO[str]:
    """Open a text file, transparently gunzipping ``*.gz``."""
    if not path.exists():
        raise DataError(f"source file {str(path)!r} does not exist")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _parse_number(cell: str) -> int | float | None:
    try:
        number = float(cell)
    except ValueError:
        return None
    if number.is_integer() and "." not in cell and "e" not in cell.lower():
        return int(number)
    return number


def _typed(cell: str, numeric: bool) -> Any:
    cell = cell.strip()
    if cell == "" or cell == "?":
        return None
    if numeric:
        number = _parse_number(cell)
        return cell if number is None else number
    return cell


class _LineTap:
    """Iterate over lines, keeping the ones consumed since the last :meth:`take` (a CSV row can
    span several lines when a quoted cell holds a newline)."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines
        self._taken: list[str] = []

    def __iter__(self) -> _LineTap:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self._taken.append(line)
        return line

    def take(self) -> bytes:
        text = "".join(self._taken).rstrip("\r\n")
        self._taken.clear()
        return text.encode()


def _read_rows(reader: Any, tap: _LineTap) -> Iterator[tuple[list[str] | csv.Error, bytes]]:
    """``(row, its lines)`` per CSV row, or ``(the error, its lines)`` for a row the reader refused
    (it reads on after one)."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield exc, tap.take()
            continue
        yield row, tap.take()


def iter_csv(path: Path) -> Iterator[Record | RejectedRecord]:
    """Yield the rows of a CSV file with a header line, typed as the module docstring says.

    Every record keeps its original line as ``raw``, so a rejected row is dead-lettered as it was.
    """
    with open_text(path) as handle:
        tap = _LineTap(iter(handle))
        reader = csv.reader(tap)
        try:
            header = next(reader)
        except StopIteration:
            return
        tap.take()
        rows = _read_rows(reader, tap)
        head = list(itertools.islice(rows, SCHEMA_SCAN_ROWS))
        numeric = []
        for j in range(len(header)):
            cells = [
                row[j].strip()
                for row, _ in head
                if isinstance(row, list) and j < len(row) and row[j].strip() not in ("", "?")
            ]
            parsed = sum(_parse_number(c) is not None for c in cells)
            numeric.append(bool(cells) and parsed >= _NUMERIC_SHARE * len(cells))
        for line_no, (row, raw) in enumerate(itertools.chain(head, rows), start=2):
            if isinstance(row, csv.Error):
                yield RejectedRecord(
                    reason=RejectReason.WRONG_TYPE,
                    detail=f"line {line_no}: {row}",
                    raw=raw,
                    offset=line_no,
                )
                continue
            if len(row) != len(header):
                yield RejectedRecord(
                    reason=RejectReason.WRONG_TYPE,
                    detail=f"line {line_no}: {len(row)} cells, header has {len(header)}",
                    raw=raw,
                    offset=line_no,
                )
                continue
            value = {
                name: _typed(cell, num)
                for name, cell, num in zip(header, row, numeric, strict=True)
            }
            yield Record(value=value, offset=line_no, raw=raw)


def iter_arff(path: Path) -> Iterator[Record | RejectedRecord]:
    """Yield the instances of a dense ARFF file (numeric/real/integer and nominal attributes)."""
    names: list[str] = []
    numeric: list[bool] = []
    with open_text(path) as handle:
        lines = iter(handle)
        for line in lines:
            text = line.strip()
            if not text or text.startswith("%"):
                continue
            lowered = text.lower()
            if lowered.startswith("@attribute"):
                rest = text[len("@attribute") :].strip()
                if rest.startswith(("'", '"')):
                    quote = rest[0]
                    end = rest.index(quote, 1)
                    name, kind = rest[1:end], rest[end + 1 :].strip()
                else:
                    name, _, kind = rest.partition(" ")
                    kind = kind.strip()
                names.append(name)
                numeric.append(kind.lower() in ("numeric", "real", "integer"))
            elif lowered.startswith("@data"):
                break
        if not names:
            raise DataError(f"{str(path)!r} has no @attribute lines: not an ARFF file")
        for line_no, line in enumerate(lines, start=1):
            text = line.strip()
            if not text or text.startswith("%"):
                continue
            if text.startswith("{"):
                raise DataError(f"{str(path)!r}: sparse ARFF is not supported")
            row = next(csv.reader([text], quotechar="'", skipinitialspace=True))
            if len(row) != len(names):
                yield RejectedRecord(
                    reason=RejectReason.WRONG_TYPE,
                    detail=f"data line {line_no}: {len(row)} values, {len(names)} attributes",
                    raw=text.encode(),
                    offset=line_no,
                )
                continue
            value = {n: _typed(c, num) for n, c, num in zip(names, row, numeric, strict=True)}
            yield Record(value=value, offset=line_no)


def iter_jsonl(path: Path) -> Iterator[Record | RejectedRecord]:
    """Yield one record per non-empty line of a JSON Lines file; bad lines are rejected."""
    opener = gzip.open if path.suffix == ".gz" else open
    if not path.exists():
        raise DataError(f"source file {str(path)!r} does not exist")
    with opener(path, "rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            decoded = decode_json_record(raw)
            if isinstance(decoded, dict):
                yield Record(value=decoded, offset=line_no, raw=raw)
            else:
                reason, detail = decoded
                yield RejectedRecord(reason=reason, detail=detail, raw=raw, offset=line_no)


def dumps_value(value: dict[str, Any]) -> str:
    """The JSON text of a record value, as producers write it."""
    return json.dumps(value, separators=(",", ":"), allow_nan=True)
