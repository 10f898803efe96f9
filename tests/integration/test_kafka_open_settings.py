"""Open Kafka settings and a demo that keeps flowing, against the real broker:

- a kafka-python consumer setting passed through (``isolation_level=read_committed``) changes what
  the source reads: records of an aborted transaction are skipped, and read without it;
- ``stream-trainer run --wait-for-topic`` started before its topic exists waits (logging that it
  does), then trains the records produced once the topic is created;
- ``stream-trainer replay --loop`` replays a recording again and again at a steady rate.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from consumers import KafkaSourceConfig, open_kafka_source
from stream_trainer.records import Record
from stream_trainer.sources import open_source
from stream_trainer.sources.recording import RecordingEntry, RecordingWriter
from tests.fixtures.kafka import create_topic, end_offsets, produce_messages, read_topic

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAM_TRAINER_")}


def _produce_with_an_aborted_transaction(bootstrap: str, topic: str) -> None:
    """Ids 0-9 committed, 100-104 aborted, 10-19 committed, in that order on partition 0."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{topic}")
    try:
        producer.init_transactions()
        for ids, commit in ((range(10), True), (range(100, 105), False), (range(10, 20), True)):
            producer.begin_transaction()
            for i in ids:
                producer.send(topic, json.dumps({"id": i, "x": float(i), "y": i % 2}).encode())
            producer.flush()
            if commit:
                producer.commit_transaction()
            else:
                producer.abort_transaction()
    finally:
        producer.close(timeout=10)


def _ids_until(source: Any, last_id: int) -> list[int]:
    ids: list[int] = []
    deadline = time.monotonic() + 60
    while last_id not in ids:
        assert time.monotonic() < deadline, f"read only {ids}"
        ids += [r.value["id"] for r in source.poll_batch().records]
    return ids


@pytest.mark.parametrize(
    ("consumer", "aborted_seen"),
    [({"isolation_level": "read_committed"}, False), ({}, True)],
    ids=["read_committed", "default"],
)
def test_a_passed_through_consumer_setting_changes_what_is_read(
    kafka_bootstrap: str, consumer: dict[str, Any], aborted_seen: bool
) -> None:
    topic = create_topic(kafka_bootstrap, f"open-settings-{'rc' if consumer else 'ru'}")
    _produce_with_an_aborted_transaction(kafka_bootstrap, topic)
    config = KafkaSourceConfig.from_mapping(
        {
            "bootstrap_servers": kafka_bootstrap,
            "topics": topic,
            "group_id": f"{topic}-g",
            "max_wait_ms": 50,
            "consumer": consumer,  # the [kafka.consumer] table; the child process gets it too
        }
    )
    with open_kafka_source(config) as source:
        ids = _ids_until(source, 19)
    aborted = list(range(100, 105))
    if aborted_seen:
        assert ids == [*range(10), *aborted, *range(10, 20)]
    else:
        assert ids == list(range(20))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _trained(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            body = response.read().decode()
    except OSError:
        return 0.0
    for line in body.splitlines():
        if line.startswith("stream_trainer_records_trained_total{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_run_waits_for_its_topic_then_trains_what_arrives(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"wait-for-me-{os.getpid()}"
    port = _free_port()
    command = [
        sys.executable, "-m", "stream_trainer", "run",
        "--source", f"kafka://{kafka_bootstrap}/{topic}",
        "--target", "is_phishing",
        "--group", f"g-{topic}",
        "--checkpoint", f"file://{tmp_path / 'checkpoints'}",
        "--metrics-address", f"127.0.0.1:{port}",
        "--wait-for-topic", "120",
        "--hidden", "8",
        "--log-format", "json",
        "--no-progress",
    ]  # fmt: skip
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=_env(), stderr=stderr)
    try:
        deadline = time.monotonic() + 90
        while "waiting for Kafka topic" not in stderr_path.read_text():
            assert process.poll() is None, stderr_path.read_text()[-3000:]
            assert time.monotonic() < deadline, stderr_path.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # still waiting a while later, not crashed
        assert process.poll() is None, stderr_path.read_text()[-3000:]

        create_topic(kafka_bootstrap, topic)
        records = [r.value for r in open_source("river:Phishing") if isinstance(r, Record)][:300]
        produce_messages(
            kafka_bootstrap, topic, ((0, None, json.dumps(v).encode()) for v in records)
        )
        deadline = time.monotonic() + 90
        while _trained(port) < len(records):
            assert process.poll() is None, stderr_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"trained {_trained(port)} of {len(records)}"
            time.sleep(0.2)
        assert _trained(port) == len(records)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, stderr_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    messages = [json.loads(line)["message"] for line in stderr_path.read_text().splitlines()]
    assert any(f"Kafka topic(s) {topic} now exist" in m for m in messages), messages[-20:]


def test_replay_loop_repeats_a_recording_at_a_steady_rate(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    recording = tmp_path / "small.jsonl"
    with RecordingWriter(recording, topic="src") as writer:
        for i in range(40):
            value = json.dumps({"id": i}).encode()
            writer.write(RecordingEntry("src", 0, i, 1_000 + 10 * i, None, value))
    topic = create_topic(kafka_bootstrap, "replay-loop")
    rate = 100.0
    command = [
        sys.executable, "-m", "stream_trainer", "replay", str(recording),
        "--bootstrap", kafka_bootstrap, "--topic", topic,
        "--rate", str(rate), "--loop", "--no-progress",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), stderr=subprocess.PIPE)
    started = time.monotonic()
    try:
        deadline = started + 60
        while (sent := sum(end_offsets(kafka_bootstrap, topic).values())) < 100:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, f"only {sent} sent"
            time.sleep(0.1)
        elapsed = time.monotonic() - started
    finally:
        process.terminate()
        process.wait(timeout=30)
    # Two passes and a half of a 40-record recording; never faster than the rate (a pass that
    # restarted its schedule in the past would go out at once), the process start included.
    assert sent <= rate * elapsed + 10, (sent, elapsed)
    values = [json.loads(m.value)["id"] for m in read_topic(kafka_bootstrap, topic, 100)[:100]]
    assert values == [i % 40 for i in range(100)]
