"""SIGTERM: ``stream-trainer run`` (a real process, on a real broker and Redis) exits 0 within its
shutdown bound, and its last checkpoint holds the offsets of every record it trained.

The process is started with ``python -m stream_trainer run --source kafka://... --checkpoint
redis://...``; while it trains (seen on its ``/metrics``), ``/healthz`` and ``/readyz`` answer 200;
then it gets SIGTERM. Afterwards the topic is read back from the broker (ground truth: which offset
holds a valid record and which a malformed one) and compared with the last checkpoint and with the
group's committed offsets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from stream_trainer.checkpoints import open_store
from stream_trainer.records import Record
from stream_trainer.sources import open_source
from tests.fixtures.kafka import produce_messages

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHUTDOWN_TIMEOUT_S = 15.0
MALFORMED = (b"{not json", b"[1, 2]", b'{"is_phishing": true, "url_length": NaN}', b"\xff")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _read_topic(bootstrap: str, topic: str) -> dict[int, list[bytes | None]]:
    """Every message value of ``topic``, per partition, in offset order."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        values: dict[int, list[bytes | None]] = {tp.partition: [] for tp in partitions}
        deadline = time.monotonic() + 30
        while any(len(values[tp.partition]) < ends[tp] for tp in partitions):
            assert time.monotonic() < deadline, "could not read the topic back"
            for tp, messages in consumer.poll(timeout_ms=500).items():
                for m in messages:
                    assert m.offset == len(values[tp.partition])
                    values[tp.partition].append(m.value)
        return values
    finally:
        consumer.close()


def _committed(bootstrap: str, group: str, topic: str, partitions: list[int]) -> dict[str, int]:
    """The group's committed next offsets (partitions without one left out)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        committed = {p: consumer.committed(TopicPartition(topic, p)) for p in partitions}
    finally:
        consumer.close(autocommit=False)
    return {f"{topic}:{p}": offset for p, offset in committed.items() if offset is not None}


def test_sigterm_exits_0_within_the_bound_with_every_trained_offset_checkpointed(
    kafka_bootstrap, kafka_topic_factory, redis_url, tmp_path
):
    topic = kafka_topic_factory(3)
    group = f"g-{topic}"
    valid = [
        json.dumps(r.value).encode() for r in open_source("river:Phishing") if isinstance(r, Record)
    ]
    # A malformed record every 100 valid ones, the whole stream round-robin over 3 partitions.
    stream: list[bytes] = []
    for i, value in enumerate(valid):
        if i % 100 == 50:
            stream.append(MALFORMED[(i // 100) % len(MALFORMED)])
        stream.append(value)
    produce_messages(kafka_bootstrap, topic, [(i % 3, None, v) for i, v in enumerate(stream)])

    port = _free_port()
    checkpoint_url = f"{redis_url}?prefix=sigterm"
    command = [
        sys.executable, "-m", "stream_trainer", "run",
        "--source", f"kafka://{kafka_bootstrap}/{topic}",
        "--target", "is_phishing",
        "--group", group,
        "--checkpoint", checkpoint_url,
        "--checkpoint-every-records", "150",
        "--metrics-address", f"127.0.0.1:{port}",
        "--max-batch-records", "16",
        "--hidden", "16,16",
        "--shutdown-timeout-seconds", str(SHUTDOWN_TIMEOUT_S),
        "--log-format", "json",
        "--no-progress",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_TRAINER_")}
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        # Wait until it has trained some records, checking liveness and readiness on the way.
        deadline = time.monotonic() + 90
        trained = None
        health: dict[str, int] = {}
        while time.monotonic() < deadline:
            assert process.poll() is None, stderr_path.read_text()[-3000:]
            try:
                _, body = _get(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                time.sleep(0.1)
                continue
            trained = _metric(body, "stream_trainer_records_trained_total")
            if trained and trained >= 100:
                health = {
                    p: _get(f"http://127.0.0.1:{port}{p}")[0] for p in ("/healthz", "/readyz")
                }
                break
            time.sleep(0.05)
        assert trained, "the service trained nothing within 90 s"
        assert health == {"/healthz": 200, "/readyz": 200}, health

        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            stdout, _ = process.communicate(timeout=SHUTDOWN_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log_text = stderr_path.read_text()
    assert process.returncode == 0, log_text[-3000:]
    assert took < SHUTDOWN_TIMEOUT_S, f"shutdown took {took:.1f} s"
    assert "samples=" in stdout.decode()
    messages = [json.loads(line)["message"] for line in log_text.splitlines() if line.strip()]
    assert any("stop requested" in m for m in messages)

    store = open_store(checkpoint_url)
    try:
        checkpoint = store.load_latest()
    finally:
        store.close()
    assert checkpoint is not None
    values = _read_topic(kafka_bootstrap, topic)
    keys = {p: f"{topic}:{p}" for p in values}
    # Only partitions it read from have an offset (a partition not read yet trained nothing).
    assert set(checkpoint.offsets) <= set(keys.values()) and checkpoint.offsets
    trained_before = sum(
        1
        for p, partition_values in values.items()
        for value in partition_values[: checkpoint.offsets.get(keys[p], 0)]
        if value not in MALFORMED
    )
    assert checkpoint.samples == trained_before > 0
    assert checkpoint.step >= 1
    assert _committed(kafka_bootstrap, group, topic, sorted(values)) == checkpoint.offsets
