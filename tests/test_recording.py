"""Recording file format, and the replay pacer (no broker needed)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.producer import Pacer
from stream_trainer.errors import ConfigError, DataError
from stream_trainer.sources.recording import (
    RECORDING_FORMAT,
    RecordingEntry,
    RecordingWriter,
    decode_entry,
    encode_entry,
    is_recording,
    read_recording,
    read_recording_header,
)

ENTRIES = [
    RecordingEntry("clicks", 0, 0, 1_700_000_000_000, b"user-1", b'{"x": 1.5, "y": 0}'),
    RecordingEntry("clicks", 2, 7, 1_700_000_000_003, None, b"\xff\xfe not utf-8"),
    RecordingEntry("clicks", 1, 3, None, b"\x00\x80key", None),
    RecordingEntry("clicks", 1, 4, 1_700_000_000_010, b"", b""),
    RecordingEntry("clicks", 0, 1, 1_700_000_000_011, "é€😀".encode(), b'{"s": "\\u2028 line"}\n'),
]


def _write(path: Path, entries: list[RecordingEntry]) -> None:
    with RecordingWriter(path, topic="clicks") as writer:
        for entry in entries:
            writer.write(entry)


@pytest.mark.parametrize("name", ["rec.jsonl", "rec.jsonl.gz"])
def test_round_trip_is_byte_exact(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    _write(path, ENTRIES)
    assert list(read_recording(path)) == ENTRIES
    assert is_recording(path)
    header = read_recording_header(path)
    assert header.topic == "clicks"
    assert header.version == 1


def test_gz_file_is_gzip_and_plain_file_is_text(tmp_path: Path) -> None:
    _write(tmp_path / "a.jsonl.gz", ENTRIES)
    _write(tmp_path / "a.jsonl", ENTRIES)
    assert (tmp_path / "a.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"
    with gzip.open(tmp_path / "a.jsonl.gz", "rt") as f:
        assert json.loads(f.readline())["format"] == RECORDING_FORMAT
    lines = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + len(ENTRIES)


def test_line_layout(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    _write(path, ENTRIES[:2])
    header, first, second = (json.loads(x) for x in path.read_text().splitlines())
    assert header["format"] == "stream-trainer-recording" and header["created_at"]
    assert first == {
        "topic": "clicks",
        "partition": 0,
        "offset": 0,
        "timestamp": 1_700_000_000_000,
        "key": "user-1",
        "value": '{"x": 1.5, "y": 0}',
    }
    assert second["value"] is None and second["value_b64"] == "//4gbm90IHV0Zi04"
    assert second["key"] is None and "key_b64" not in second


def test_header_check(tmp_path: Path) -> None:
    plain = tmp_path / "data.jsonl"
    plain.write_text('{"x": 1}\n{"x": 2}\n')
    assert not is_recording(plain)
    assert not is_recording(tmp_path / "missing.jsonl")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert not is_recording(binary)
    with pytest.raises(DataError, match="not a stream-trainer recording"):
        list(read_recording(plain))


def test_unknown_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.jsonl"
    path.write_text(json.dumps({"format": RECORDING_FORMAT, "version": 99}) + "\n")
    assert is_recording(path)
    with pytest.raises(DataError, match="version 99 is not supported"):
        list(read_recording(path))


def test_malformed_line_names_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    _write(path, ENTRIES[:1])
    with open(path, "a") as f:
        f.write('{"topic": "clicks", "partition": "zero", "offset": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: partition must be an integer"):
        list(read_recording(path))


def test_writer_refuses_writes_after_close(tmp_path: Path) -> None:
    writer = RecordingWriter(tmp_path / "c.jsonl", topic=None)
    writer.close()
    writer.close()
    with pytest.raises(DataError, match="closed"):
        writer.write(ENTRIES[0])


_bytes_or_none = st.none() | st.binary(max_size=64) | st.text(max_size=32).map(str.encode)
_entries = st.builds(
    RecordingEntry,
    topic=st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True),
    partition=st.integers(0, 1000),
    offset=st.integers(0, 2**63 - 1),
    timestamp_ms=st.none() | st.integers(0, 2**53),
    key=_bytes_or_none,
    value=_bytes_or_none,
)


@settings(max_examples=200, deadline=None)
@given(_entries)
def test_codec_round_trips_any_entry(entry: RecordingEntry) -> None:
    line = encode_entry(entry)
    assert "\n" not in line and "\r" not in line
    assert decode_entry(line) == entry


@settings(max_examples=20, deadline=None)
@given(st.lists(_entries, max_size=20))
def test_file_round_trips_any_entries(tmp_path_factory: pytest.TempPathFactory, entries) -> None:
    path = tmp_path_factory.mktemp("rec") / "p.jsonl.gz"
    _write(path, entries)
    assert list(read_recording(path)) == entries


class FakeClock:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_pacer_keeps_inter_arrival_times_scaled_by_speed() -> None:
    clock = FakeClock()
    pacer = Pacer(speed=2.0, clock=clock, sleep=clock.sleep)
    sent_at = []
    for ts in [1000, 1000, 3000, 2500, 7000]:
        pacer.wait(ts)
        sent_at.append(clock.now - 100.0)
    # (ts - 1000) / 1000 / 2; the out-of-order 2500 goes at once.
    assert sent_at == [0.0, 0.0, 1.0, 1.0, 3.0]


def test_pacer_fixed_rate_and_no_pacing() -> None:
    clock = FakeClock()
    pacer = Pacer(rate=4.0, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        pacer.wait(None)
    assert clock.now - 100.0 == pytest.approx(1.0)
    clock = FakeClock()
    fast = Pacer(clock=clock, sleep=clock.sleep)
    for ts in (0, 10_000, 20_000):
        fast.wait(ts)
    assert clock.sleeps == []


def test_pacer_does_not_sleep_to_catch_up() -> None:
    clock = FakeClock()
    pacer = Pacer(rate=10.0, clock=clock, sleep=clock.sleep)
    pacer.wait()
    clock.now += 5.0  # the producer stalled
    for _ in range(3):
        pacer.wait()
    assert clock.sleeps == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"speed": 0.0}, "speed must be > 0"),
        ({"rate": -1.0}, "rate must be > 0"),
        ({"speed": 1.0, "rate": 1.0}, "not both"),
    ],
)
def test_pacer_validates(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Pacer(**kwargs)
