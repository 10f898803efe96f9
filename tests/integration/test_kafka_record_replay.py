"""``stream-trainer record`` and ``replay`` against a real broker, and the broker script by hand."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from consumers.producer import Pacer, TopicProducer, replay_entries
from stream_trainer.commands import record, replay
from stream_trainer.sources.recording import RecordingEntry, read_recording
from tests.fixtures.kafka import broker_script, produce_messages

pytestmark = pytest.mark.integration


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="stream-trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    record.register(sub)
    replay.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


def _read_all(bootstrap: str, topic: str, expected: int) -> dict[int, list[tuple]]:
    """(key, value) per partition, in offset order."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    out: dict[int, list[tuple]] = {tp.partition: [] for tp in partitions}
    deadline = time.monotonic() + 20
    try:
        while sum(map(len, out.values())) < expected and time.monotonic() < deadline:
            for tp, msgs in consumer.poll(timeout_ms=300).items():
                out[tp.partition].extend((m.key, m.value) for m in msgs)
    finally:
        consumer.close()
    return out


def test_record_then_replay_round_trips_a_topic(
    kafka_bootstrap: str, kafka_topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    source = kafka_topic_factory(3, "-src")
    messages = [
        (i % 3, f"k{i}".encode() if i % 4 else None, json.dumps({"i": i}).encode())
        for i in range(40)
    ]
    messages += [(1, b"\xff\xfe", b"\x80 not utf-8"), (2, b"k-null", None)]
    produce_messages(kafka_bootstrap, source, messages)
    rec = tmp_path / "src.jsonl.gz"
    assert _cli("record", "--bootstrap", kafka_bootstrap, "--topic", source, "--out", str(rec),
                "--from-beginning", "--until-end", "--no-progress") == 0  # fmt: skip
    entries = list(read_recording(rec))
    assert len(entries) == len(messages)
    assert {(e.partition, e.key, e.value) for e in entries} == set(messages)

    target = f"{source}-replayed"
    assert _cli("replay", str(rec), "--bootstrap", kafka_bootstrap, "--topic", target,
                "--create-topic", "--max-speed", "--no-progress") == 0  # fmt: skip
    assert _read_all(kafka_bootstrap, target, len(messages)) == _read_all(
        kafka_bootstrap, source, len(messages)
    )


def test_record_max_records_and_missing_topic(
    kafka_bootstrap: str, kafka_topic: str, tmp_path: Path
) -> None:
    produce_messages(kafka_bootstrap, kafka_topic, [(0, None, b"{}")] * 5)
    rec = tmp_path / "five.jsonl"
    argv = ["--topic", kafka_topic, "--out", str(rec), "--from-beginning", "--max-records", "3"]
    assert _cli("record", "--bootstrap", kafka_bootstrap, *argv, "--no-progress") == 0
    assert [e.offset for e in read_recording(rec)] == [0, 1, 2]
    from stream_trainer.errors import SourceError

    with pytest.raises(SourceError, match="does not exist"):
        _cli("replay", str(rec), "--bootstrap", kafka_bootstrap, "--topic", kafka_topic + "-no",
             "--no-progress")  # fmt: skip


def test_replay_scales_recorded_time_with_an_injected_sleeper(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    entries = [RecordingEntry("x", i % 3, i, 1_000 + 500 * i, None, b"{}") for i in range(5)]
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    pacer = Pacer(speed=10.0, clock=lambda: now[0], sleep=sleep)
    with TopicProducer(kafka_bootstrap, kafka_topic) as producer:
        report = replay_entries(entries, producer, pacer, clock=lambda: now[0])
    assert report.sent == 5 and report.per_partition == {0: 2, 1: 2, 2: 1}
    assert sleeps == pytest.approx([0.05] * 4)


def test_replay_a_file_source_round_robin(
    kafka_bootstrap: str, kafka_topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    pytest.importorskip("stream_trainer.sources", reason="open_source is the lead's module")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"x": i, "y": i % 2}) + "\n" for i in range(6)))
    topic = kafka_topic_factory(1, "-file") + "-new"
    assert _cli("replay", str(data), "--bootstrap", kafka_bootstrap, "--topic", topic,
                "--create-topic", "--partitions", "2", "--no-progress") == 0  # fmt: skip
    got = _read_all(kafka_bootstrap, topic, 6)
    assert [json.loads(v)["x"] for _, v in got[0]] == [0, 2, 4]
    assert [json.loads(v)["x"] for _, v in got[1]] == [1, 3, 5]


def test_broker_script_start_daemon_and_stop(tmp_path: Path) -> None:
    broker = broker_script()
    script = Path(broker.__file__)
    data = tmp_path / "kafka"
    started = subprocess.run(
        [sys.executable, str(script), "start", "--daemon", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    bootstrap = started.stdout.split("bootstrap=")[1].split()[0]
    pid = int((data / "broker.pid").read_text())
    try:
        port = int(bootstrap.rsplit(":", 1)[1])
        assert broker._port_open(port)
    finally:
        stopped = subprocess.run(
            [sys.executable, str(script), "stop", "--data-dir", str(data), "--timeout", "5"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr
    assert not (data / "broker.pid").exists()
    assert not broker._alive(pid)
