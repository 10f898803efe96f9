"""The Kafka and frames benchmarks run end to end on tiny inputs (a real broker; no timings).

They are what BENCHMARKS.md quotes for the Kafka issue's target: a bench that no longer runs, or
that counts records it should not, must fail here rather than on the day it is needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import bench_frames, bench_kafka

pytestmark = pytest.mark.integration


def test_kafka_bench_measures_every_reader_and_writes_its_table(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    medians = bench_kafka.run_benchmark(
        kafka_bootstrap, records=2_000, repeats=1, caps=(8, 64), with_trainer=True
    )
    expected = {"raw"} | {
        f"{kind}@{cap}"
        for cap in (8, 64)
        for kind in ("source", "process-source", "e2e", "process-e2e", "trainer")
    }
    assert set(medians) == expected | {"process-e2e-ahead1@64"}
    assert all(rate > 0 for rate in medians.values())
    args = argparse.Namespace(
        kafka_version="4.3.1", partitions=3, records=2_000, repeats=1, features=10
    )
    text = bench_kafka.write_results(tmp_path / "kafka.md", medians, args)
    assert "2000 records counted (of 4000 in the topic)" in text
    assert text.count("| trainer |") + text.count("| Kafka |") == 2  # one bound per cap
    assert "Read-ahead at 64 (consumer process, same run): one batch ahead" in text


def test_topic_size_keeps_readers_away_from_the_end() -> None:
    assert bench_kafka.topic_size(20_000) == 22_000
    assert bench_kafka.topic_size(400) == 2_400


def test_frames_bench_tiny(tmp_path: Path) -> None:
    out = tmp_path / "frames.md"
    argv = ["--sizes", "8", "--loops", "2", "--repeats", "1", "--out", str(out)]
    assert bench_frames.main(argv) == 0
    text = out.read_text()
    for row in (
        "one process: decode_batch",
        "reference decode (json, every check)",
        "child: pack_polled + write_frame",
        "service: read_frame + unpack_batch",
    ):
        assert f"| {row} |" in text
