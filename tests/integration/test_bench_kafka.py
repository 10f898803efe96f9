"""The Kafka and frames benchmarks run end to end on tiny inputs (a real broker; no timings).

They are what BENCHMARKS.md quotes for the Kafka issue's target: a bench that no longer runs, or
that counts records it should not, must fail here rather than on the day it is needed.
"""

from __future__ import annotations

import argparse
import os
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
    kinds = ("source", "process-source", "e2e", "process-e2e", "trainer", "ratio-one")
    expected = {"raw"} | {f"{kind}@{cap}" for cap in (8, 64) for kind in kinds}
    expected |= {f"ratio-process@{cap}{end}" for cap in (8, 64) for end in ("", "-min", "-max")}
    expected |= {f"ratio-one@{cap}{end}" for cap in (8, 64) for end in ("-min", "-max")}
    expected |= {"process-e2e-ahead1@64"} | {f"ratio-ahead1@64{e}" for e in ("", "-min", "-max")}
    expected |= {f"cpu-{who}@{cap}" for cap in (8, 64) for who in ("service", "child")}
    assert set(medians) == expected  # no broker pid given: no broker CPU
    assert all(rate > 0 for rate in medians.values())
    for cap in (8, 64):  # one run: the median of its two bracketing trainer figures is their mean
        bound = min(medians["raw"], medians[f"trainer@{cap}"])
        assert medians[f"ratio-process@{cap}"] == pytest.approx(
            medians[f"process-e2e@{cap}"] / bound
        )
        assert medians[f"ratio-one@{cap}"] == pytest.approx(medians[f"e2e@{cap}"] / bound)
    args = argparse.Namespace(
        kafka_version="4.3.1", partitions=3, records=2_000, repeats=1, features=10
    )
    text = bench_kafka.write_results(tmp_path / "kafka.md", medians, args)
    assert "2000 records counted (of 4000 in the topic)" in text
    assert text.count("| trainer |") + text.count("| Kafka |") == 2  # one bound per cap
    assert "Read-ahead at 64 (consumer process, same runs): 1 batch(es) ahead" in text
    assert "; 4 (the default)" in text
    assert "| max_batch_records | service process | consumer process | broker |" in text
    assert "| n/a |" in text


def test_cpu_seconds_reads_proc() -> None:
    spent = bench_kafka.cpu_seconds(os.getpid())
    assert spent is not None and spent > 0
    assert bench_kafka.cpu_seconds(None) is None
    assert bench_kafka.cpu_seconds(2**31 - 1) is None  # no such process


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
    size = next(line for line in text.splitlines() if line.startswith("| frame bytes"))
    assert 8 * 250 < int(size.split("|")[2].replace(",", "")) < 8 * 400  # ~290 B a record + rows
