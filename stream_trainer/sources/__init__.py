"""Where records come from: files, recordings, bundled datasets, and how they are cut into batches.

:func:`open_source` turns a source spec into an iterator of records (and rejected records):

- ``path.csv`` / ``path.csv.gz``: CSV with a header line;
- ``path.arff``: dense ARFF;
- ``path.jsonl`` / ``.json`` / ``.ndjson`` (optionally ``.gz``): one JSON object per line, or a
  stream-trainer recording (recognised by its header line) made by ``stream-trainer record``;
- ``river:NAME`` and ``synth:NAME?seed=S&n=N``: datasets bundled with river.

Kafka is not a file source: ``kafka://`` specs are handled by the service (``consumers``).

The service reads batches through one protocol,
:class:`~stream_trainer.sources.protocol.BatchSource`, and sets rejected records aside through
:class:`~stream_trainer.sources.protocol.DeadLetterSink`;
the file adapters are :mod:`stream_trainer.sources.file_batches` and
:mod:`stream_trainer.sources.dead_letter_file`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from stream_trainer.errors import DataError
from stream_trainer.records import Record, RejectedRecord, decode_json_record
from stream_trainer.sources.batching import BatchSizes, iter_batches
from stream_trainer.sources.bundled import BUNDLED_TARGETS, iter_bundled
from stream_trainer.sources.files import iter_arff, iter_csv, iter_jsonl
from stream_trainer.sources.protocol import Batch, BatchSource, DeadLetterSink

__all__ = [
    "BUNDLED_TARGETS",
    "Batch",
    "BatchSizes",
    "BatchSource",
    "DeadLetterSink",
    "default_target",
    "iter_batches",
    "open_source",
]


def _suffixes(path: Path) -> list[str]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes


def _iter_recording(path: Path) -> Iterator[Record | RejectedRecord]:
    from stream_trainer.sources.recording import read_recording

    for entry in read_recording(path):
        raw = entry.value if entry.value is not None else b""
        decoded = decode_json_record(raw)
        if isinstance(decoded, dict):
            yield Record(
                value=decoded,
                raw=raw,
                key=entry.key,
                topic=entry.topic,
                partition=entry.partition,
                offset=entry.offset,
                timestamp_ms=entry.timestamp_ms,
            )
        else:
            reason, detail = decoded
            yield RejectedRecord(
                reason=reason,
                detail=detail,
                raw=raw,
                key=entry.key,
                topic=entry.topic,
                partition=entry.partition,
                offset=entry.offset,
                timestamp_ms=entry.timestamp_ms,
            )


def default_target(spec: str) -> str | None:
    """The label field of a bundled dataset (``river:Phishing`` -> ``is_phishing``), else None."""
    if spec.startswith("river:"):
        return BUNDLED_TARGETS.get(spec[len("river:") :].partition("?")[0], "target")
    if spec.startswith("synth:"):
        return "class"
    return None


def open_source(spec: str, *, target: str | None = None) -> Iterator[Record | RejectedRecord]:
    """Open a source spec (see the module docstring) as an iterator of records."""
    if spec.startswith(("river:", "synth:")):
        return iter_bundled(spec, target=target)
    if spec.startswith("kafka://"):
        raise DataError(
            "kafka:// sources are consumed by `stream-trainer run`, not opened as files"
        )
    path = Path(spec)
    if not path.exists():
        raise DataError(f"source {spec!r} is neither an existing file nor river:/synth: dataset")
    suffixes = _suffixes(path)
    kind = suffixes[-1] if suffixes else ""
    if kind == ".csv":
        return iter_csv(path)
    if kind == ".arff":
        return iter_arff(path)
    if kind in (".jsonl", ".json", ".ndjson"):
        from stream_trainer.sources.recording import is_recording

        return _iter_recording(path) if is_recording(path) else iter_jsonl(path)
    raise DataError(
        f"cannot tell the format of {spec!r}: use .csv, .arff or .jsonl (optionally .gz)"
    )
