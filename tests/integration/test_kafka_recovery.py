"""Kafka faults and recovery paths, against a real broker and a real checkpoint store.

* dead letters the broker refuses are cut down and sent again, or counted when even that fails;
  the service keeps running and a restart sends nothing twice;
* a fallback to an older checkpoint trains every record exactly once, partitions the older
  version lacks included (they start at their origin, not at the newer committed offset);
* a store whose history was moved back is refused unless ``allow_rollback``;
* a consumer-lag query does not wait on a broker that is down (the high watermarks are kept);
* with static membership a member killed with SIGKILL and restarted takes its place at once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewPartitions
from prometheus_client import CollectorRegistry

from consumers import DeadLetterSink, KafkaSourceConfig
from consumers.kafka_source import KafkaRecordSource
from consumers.process.source import ProcessKafkaSource
from stream_trainer.checkpoints import open_store
from stream_trainer.errors import CheckpointError, SourceError
from stream_trainer.records import RejectedRecord, RejectReason
from stream_trainer.service import TrainerService, load_service_config
from stream_trainer.service.batch_log import read_batch_log
from tests.fixtures.kafka import create_topic, group_offsets, own_broker
from tests.fixtures.service import service_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TRAINER = {"target": "label", "task": "classification", "hidden": (8,), "seed": 5}


def _value(i: int) -> bytes:
    return json.dumps({"id": i, "x1": math.sin(i), "x2": (i % 7) / 7.0, "label": i % 3}).encode()


def _new_topic(bootstrap: str, partitions: int = 1, **configs: str) -> str:
    name = create_topic(bootstrap, f"t-recovery-{uuid.uuid4().hex[:10]}", partitions, configs)
    _wait_for_partitions(bootstrap, name, partitions)
    return name


def _wait_for_partitions(bootstrap: str, topic: str, n: int) -> None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        deadline = time.monotonic() + 30
        while len(consumer.partitions_for_topic(topic) or ()) < n:
            assert time.monotonic() < deadline, f"{topic} never showed {n} partitions"
            time.sleep(0.1)
            consumer.topics()
    finally:
        consumer.close()


class Ledger:
    """Produces records with unique ids to chosen partitions; remembers where each landed."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.next_id = 0
        self.where: dict[tuple[int, int], int] = {}  # (partition, offset) -> id
        self._bootstrap = bootstrap
        self._producer = self._open()

    def _open(self) -> KafkaProducer:
        return KafkaProducer(
            bootstrap_servers=self._bootstrap, acks="all", linger_ms=2, max_request_size=8 << 20
        )

    def reopen(self) -> None:
        """A new producer, which sees partitions added since."""
        self._producer.close(timeout=10)
        self._producer = self._open()

    def produce(self, partitions: list[int], n: int) -> None:
        futures = []
        for k in range(n):
            i = self.next_id
            self.next_id += 1
            partition = partitions[k % len(partitions)]
            futures.append((i, self._producer.send(self.topic, _value(i), partition=partition)))
        self._producer.flush(timeout=30)
        for i, future in futures:
            meta = future.get(timeout=30)
            self.where[(meta.partition, meta.offset)] = i

    def send_raw(self, value: bytes, partition: int = 0) -> int:
        meta = self._producer.send(self.topic, value, partition=partition).get(timeout=60)
        return int(meta.offset)

    def close(self) -> None:
        self._producer.close(timeout=10)


def _config(bootstrap: str, topic: str, tmp_path: Path, **flags: Any) -> Any:
    return load_service_config(
        flags={
            "source": f"kafka://{bootstrap}/{topic}",
            "group": f"{topic}-group",
            "checkpoint": f"file://{tmp_path / 'checkpoints'}",
            "checkpoint_every_records": 100_000,
            "metrics_address": "off",
            "progress": False,
            "max_wait_ms": 50,
            "stop_at_end": True,
            "batch_log": str(tmp_path / "batches.jsonl"),
            **flags,
        },
        trainer_flags=TRAINER,
        environ={},
    )


def _run(config: Any, registry: CollectorRegistry | None = None) -> tuple[TrainerService, dict]:
    service = TrainerService(config, registry=registry)
    return service, service.run()


def _dead_letters(bootstrap: str, topic: str) -> list[Any]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=3000,
        fetch_max_bytes=8 << 20,
    )
    try:
        return list(consumer)
    finally:
        consumer.close()


# ---------------------------------------------------------------------------------- dead letters


def test_a_dead_letter_too_large_to_send_is_cut_down_and_the_service_goes_on(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    # The source topic takes 6 MB messages; the dead-letter topic has the broker's default limit.
    topic = _new_topic(kafka_bootstrap, 1, **{"max.message.bytes": str(6 << 20)})
    dead = _new_topic(kafka_bootstrap, 1)
    ledger = Ledger(kafka_bootstrap, topic)
    big = json.dumps({"id": -1, "x1": "a" * (3 << 20), "label": 1}).encode()
    try:
        ledger.produce([0], 40)
        big_offset = ledger.send_raw(big)
        bad_offset = ledger.send_raw(b"not json")
        ledger.produce([0], 40)
    finally:
        ledger.close()
    registry = CollectorRegistry()
    config = _config(kafka_bootstrap, topic, tmp_path, dead_letter=dead)
    _service, report = _run(config, registry)

    assert report["final_checkpoint_ok"] is True
    assert report["samples"] == 80
    assert report["dead_lettered"] == {"not_json": 1, "too_large": 1}
    assert group_offsets(kafka_bootstrap, config.group) == {f"{topic}:0": 82}
    labels = {"run": "default", "reason": "too_large"}
    assert registry.get_sample_value("stream_trainer_dead_letters_cut_down_total", labels) == 1.0
    lost = registry.get_sample_value("stream_trainer_dead_letters_undeliverable_total", labels)
    assert lost in (None, 0.0)

    letters = _dead_letters(kafka_bootstrap, dead)
    assert len(letters) == 2
    by_offset = {int(dict(m.headers)["x-source-offset"]): m for m in letters}
    assert by_offset[bad_offset].value == b"not json"
    cut = by_offset[big_offset]
    headers = dict(cut.headers)
    assert headers["x-cut-down"] == b"1" and headers["x-reason"] == b"too_large"
    body = json.loads(cut.value)
    assert body["cut_down"] is True and body["reason"] == "too_large"
    assert body["source"] == {
        "topic": topic,
        "partition": 0,
        "offset": big_offset,
        "timestamp_ms": body["source"]["timestamp_ms"],
    }
    assert body["length"] == len(big)
    assert body["sha256"] == hashlib.sha256(big).hexdigest()
    assert base64.b64decode(body["head"]) == big[:1024]
    assert "MessageSizeTooLarge" in body["refused"]
    assert len(cut.value) < 4096

    # A restart reads nothing again and sends nothing twice.
    _service, again = _run(config)
    assert again["samples"] == 80
    assert len(_dead_letters(kafka_bootstrap, dead)) == 2


def test_a_dead_letter_refused_even_cut_down_is_counted_and_dropped(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = _new_topic(kafka_bootstrap, 1)
    # Smaller than any letter with its headers: the broker refuses the letter and its cut-down form.
    dead = _new_topic(kafka_bootstrap, 1, **{"max.message.bytes": "400"})
    ledger = Ledger(kafka_bootstrap, topic)
    try:
        ledger.produce([0], 30)
        ledger.send_raw(b"{" + b"x" * 700)
        ledger.produce([0], 30)
    finally:
        ledger.close()
    registry = CollectorRegistry()
    config = _config(kafka_bootstrap, topic, tmp_path, dead_letter=dead)
    _service, report = _run(config, registry)

    assert report["final_checkpoint_ok"] is True
    assert report["samples"] == 60
    assert report["dead_lettered"] == {"not_json": 1}
    labels = {"run": "default", "reason": "not_json"}
    assert registry.get_sample_value("stream_trainer_dead_letters_cut_down_total", labels) == 1.0
    lost = registry.get_sample_value("stream_trainer_dead_letters_undeliverable_total", labels)
    assert lost == 1.0
    assert _dead_letters(kafka_bootstrap, dead) == []
    assert group_offsets(kafka_bootstrap, config.group) == {f"{topic}:0": 61}


# ---------------------------------------------------------------------------------- fallback


def _flip_bytes_of_largest_part(store_dir: Path, version: int) -> None:
    parts = sorted(
        (p for p in (store_dir / "versions" / str(version)).iterdir() if p.name.startswith("part")),
        key=lambda p: p.stat().st_size,
    )
    part = parts[-1]
    data = bytearray(part.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    part.write_bytes(bytes(data))


def _published(store_dir: Path) -> list[int]:
    return [int(v) for v in json.loads((store_dir / "LATEST").read_text())["published"]]


def _trained_ids(batch_log: Path, ledger: Ledger) -> Counter[int]:
    return Counter(
        ledger.where[(int(key.rpartition(":")[2]), offset)]
        for segments in read_batch_log(batch_log)
        for key, first, stop in segments
        for offset in range(first, stop)
    )


def test_a_fallback_over_a_corrupt_version_trains_every_record_exactly_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = _new_topic(kafka_bootstrap, 2)
    store_dir = tmp_path / "checkpoints"
    batch_log = tmp_path / "batches.jsonl"
    ledger = Ledger(kafka_bootstrap, topic)
    try:
        # 1. Records in partition 0 only (partition 1 stays empty): several checkpoints.
        ledger.produce([0], 1500)
        # Every version kept, so that the fallback can reach the ones step 1 wrote.
        config = _config(
            kafka_bootstrap,
            topic,
            tmp_path,
            checkpoint_every_records=500,
            checkpoint=f"file://{store_dir}?keep=20",
        )
        _service, first = _run(config)
        assert first["samples"] == 1500
        with open_store(f"file://{store_dir}") as store:
            early = store.load_latest()
        assert early is not None
        # Every partition owned is in the checkpoint, the one nothing was read from at its start.
        assert early.offsets == {f"{topic}:0": 1500, f"{topic}:1": 0}

        # 2. A third partition appears; records arrive everywhere; one checkpoint holds them all.
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="tests-recovery")
        try:
            admin.create_partitions({topic: NewPartitions(total_count=3)})
        finally:
            admin.close()
        _wait_for_partitions(kafka_bootstrap, topic, 3)
        ledger.reopen()
        ledger.produce([0, 1, 2], 1500)
        _service, second = _run(config)
        assert second["samples"] == 3000
        with open_store(f"file://{store_dir}") as store:
            newest = store.load_latest()
        assert newest is not None and newest.version > early.version
        assert set(newest.offsets) == {f"{topic}:0", f"{topic}:1", f"{topic}:2"}
        committed = group_offsets(kafka_bootstrap, config.group)
        assert committed == newest.offsets
        # Before this fix, a fallback resumed partition 2 at this committed offset: these
        # records were never trained by the restored model.
        skipped_before = committed[f"{topic}:2"]
        assert skipped_before == 500

        # 3. The versions of step 2 (the newest) are corrupted (bytes flipped in a part): the
        # restart falls back to the last version of step 1, which lacks partition 2. More
        # records arrive meanwhile.
        corrupted = [v for v in _published(store_dir) if v > early.version]
        assert newest.version in corrupted
        for version in corrupted:
            _flip_bytes_of_largest_part(store_dir, version)
        ledger.produce([0, 1, 2], 600)
        service, third = _run(config)
    finally:
        ledger.close()

    assert service.restored is not None and service.restored.version == early.version
    assert sorted(service.rejected_versions) == corrupted
    total = ledger.next_id
    assert total == 3600
    assert third["final_checkpoint_ok"] is True
    assert third["samples"] == total
    with open_store(f"file://{store_dir}") as store:
        final = store.load_latest()
    assert final is not None and final.samples == total
    assert final.offsets == {f"{topic}:0": 2200, f"{topic}:1": 700, f"{topic}:2": 700}
    assert group_offsets(kafka_bootstrap, config.group) == final.offsets
    # The batch log is the ledger of what the persisted model learned: every id exactly once.
    trained = _trained_ids(batch_log, ledger)
    never = [i for i in range(total) if trained[i] == 0]
    twice = [i for i, n in trained.items() if n > 1]
    assert (len(never), len(twice)) == (0, 0), (len(never), len(twice))


# ---------------------------------------------------------------------------------- rollback


def _move_latest_back(store_dir: Path, versions: int) -> int:
    pointer = json.loads((store_dir / "LATEST").read_text())
    published = pointer["published"]
    pointer["latest"] = published[-1 - versions]
    (store_dir / "LATEST").write_text(json.dumps(pointer))
    return int(pointer["latest"])


def test_a_store_moved_back_is_refused_unless_rollback_is_allowed(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = _new_topic(kafka_bootstrap, 1)
    store_dir = tmp_path / "checkpoints"
    ledger = Ledger(kafka_bootstrap, topic)
    try:
        ledger.produce([0], 400)
    finally:
        ledger.close()
    config = _config(kafka_bootstrap, topic, tmp_path, checkpoint_every_records=100)
    _service, first = _run(config)
    assert first["samples"] == 400
    committed = group_offsets(kafka_bootstrap, config.group)
    assert committed == {f"{topic}:0": 400}
    back = _move_latest_back(store_dir, 2)

    with pytest.raises(CheckpointError, match="refusing to roll back") as refused:
        _run(config)
    assert refused.value.retriable is False
    assert f"restored checkpoint is v{back}" in str(refused.value)
    assert group_offsets(kafka_bootstrap, config.group) == committed  # nothing moved

    allowed = load_service_config(
        flags={**_flags_of(config), "allow_rollback": True}, trainer_flags=TRAINER, environ={}
    )
    service, report = _run(allowed)
    assert service.restored is not None and service.restored.version == back
    assert report["final_checkpoint_ok"] is True
    # The records the moved-back versions had learned are learned again by the older model.
    assert report["samples"] == 400
    assert report["records_trained"] == 400 - service.restored.offsets[f"{topic}:0"] > 0


def _flags_of(config: Any) -> dict[str, Any]:
    return {
        "source": config.source,
        "group": config.group,
        "checkpoint": config.checkpoint,
        "checkpoint_every_records": config.checkpoint_every_records,
        "metrics_address": "off",
        "progress": False,
        "max_wait_ms": config.max_wait_ms,
        "stop_at_end": True,
        "batch_log": config.batch_log,
    }


# ---------------------------------------------------------------------------------- lag


@pytest.fixture
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A broker of this test's own, which the test may stop."""
    with own_broker(tmp_path_factory.mktemp("kafka-private")) as broker:
        yield broker


@pytest.mark.slow
def test_a_lag_query_does_not_wait_on_a_broker_that_is_down(private_broker: Any) -> None:
    bootstrap = private_broker.bootstrap
    topic = _new_topic(bootstrap, 2)
    ledger = Ledger(bootstrap, topic)
    try:
        ledger.produce([0, 1], 20)
    finally:
        ledger.close()
    sources: list[Any] = []
    try:
        for cls in (KafkaRecordSource, ProcessKafkaSource):
            config = KafkaSourceConfig(
                bootstrap_servers=bootstrap,
                topics=topic,
                group_id=f"{topic}-{cls.__name__}",
                max_wait_ms=50,
                consumer_process=cls is ProcessKafkaSource,
                connect_retries=0,
            )
            source = cls(config)
            sources.append(source)
            read = 0
            deadline = time.monotonic() + 60
            while read < 20:
                assert time.monotonic() < deadline, "records never arrived"
                read += source.poll_batch().size
            assert source.lag() == {f"{topic}:0": 0, f"{topic}:1": 0}
        private_broker.stop(timeout_s=10.0)
        for source in sources:
            # Every partition has been fetched: the lag comes from the high watermarks the
            # consumer kept, and no request waits on the broker that is away.
            started = time.monotonic()
            assert source.lag() == {f"{topic}:0": 0, f"{topic}:1": 0}
            elapsed = time.monotonic() - started
            print(f"lag query with the broker down: {type(source).__name__} {elapsed:.3f} s")
            assert elapsed < 1.0, (type(source).__name__, elapsed)
    finally:
        for source in sources:
            source.close()


@pytest.mark.slow
def test_dead_letters_wait_out_a_broker_outage_and_are_sent_once(private_broker: Any) -> None:
    bootstrap = private_broker.bootstrap
    dead = _new_topic(bootstrap, 1)

    def letter(offset: int) -> RejectedRecord:
        return RejectedRecord(
            reason=RejectReason.NOT_JSON,
            detail="not JSON",
            raw=b"oops %d" % offset,
            topic="clicks",
            partition=0,
            offset=offset,
        )

    sink = DeadLetterSink(bootstrap, topic=dead)
    try:
        sink.send(letter(1))
        sink.flush()
        private_broker.stop(timeout_s=10.0)
        sink.send(letter(2))
        started = time.monotonic()
        with pytest.raises(SourceError) as failed:
            sink.flush(timeout_s=2.0)
        assert failed.value.retriable is True
        assert time.monotonic() - started < 10.0
        private_broker.start()
        deadline = time.monotonic() + 90
        while True:
            try:
                sink.flush(timeout_s=5.0)
                break
            except SourceError:
                assert time.monotonic() < deadline, "dead letters never delivered"
    finally:
        sink.close()
    letters = _dead_letters(bootstrap, dead)
    assert sorted(int(dict(m.headers)["x-source-offset"]) for m in letters) == [1, 2]
    assert sum(sink.undeliverable.values()) == 0


# ---------------------------------------------------------------------------------- restart


def _seconds_to_first_checkpoint_after_kill(
    bootstrap: str, tmp_path: Path, session_timeout_ms: int, instance_id: str | None
) -> float:
    """Start a trainer, let it checkpoint, SIGKILL it (its consumer process too), start it again
    with new records waiting: the seconds from the restart to its first new checkpoint."""
    name = instance_id or "dynamic"
    topic = _new_topic(bootstrap, 1)
    url = f"file://{tmp_path / f'ck-{name}'}"
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f"[kafka]\nsession_timeout_ms = {session_timeout_ms}\nheartbeat_interval_ms = 1000\n"
    )
    command = [
        sys.executable, "-m", "stream_trainer", "run", "--config", str(config),
        "--source", f"kafka://{bootstrap}/{topic}", "--group", f"{topic}-group",
        "--checkpoint", url, "--checkpoint-every-records", "50", "--metrics-address", "off",
        "--no-progress", "--max-wait-ms", "50", "--target", "label", "--task",
        "classification", "--hidden", "8",
    ]  # fmt: skip
    if instance_id is not None:
        command += ["--instance-id", instance_id]
    ledger = Ledger(bootstrap, topic)
    store = open_store(url)
    logs = tmp_path / f"{name}.log"
    try:
        ledger.produce([0], 100)
        with logs.open("wb") as out:
            first = subprocess.Popen(
                command, cwd=ROOT, env=service_env(), stdout=out, stderr=out, start_new_session=True
            )
        try:
            _wait(lambda: (store.latest_version() or 0) >= 1, 120, logs)
            os.killpg(first.pid, signal.SIGKILL)  # the service and its consumer process
            first.wait(timeout=30)
            before = store.latest_version() or 0
            ledger.produce([0], 100)
            with logs.open("ab") as out:
                started = time.monotonic()
                second = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=service_env(),
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            try:
                _wait(lambda: (store.latest_version() or 0) > before, 120, logs)
                return time.monotonic() - started
            finally:
                second.send_signal(signal.SIGTERM)
                try:
                    second.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(second.pid, signal.SIGKILL)
                    second.wait()
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
    finally:
        store.close()
        ledger.close()


def _wait(condition: Callable[[], bool], timeout_s: float, logs: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s\n{logs.read_text()[-3000:]}")
        time.sleep(0.1)


@pytest.mark.slow
def test_a_static_member_killed_and_restarted_takes_its_place_at_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    session_s = 30.0
    dynamic = _seconds_to_first_checkpoint_after_kill(
        kafka_bootstrap, tmp_path, int(session_s * 1000), None
    )
    static = _seconds_to_first_checkpoint_after_kill(
        kafka_bootstrap, tmp_path, int(session_s * 1000), f"trainer-{uuid.uuid4().hex[:6]}"
    )
    print(f"restart to first checkpoint: dynamic {dynamic:.1f} s, static {static:.1f} s")
    # A dynamic member waits for the dead member's session to expire; a static one does not.
    assert dynamic > session_s * 0.6, dynamic
    assert static < session_s * 0.5, static
    assert dynamic - static > session_s * 0.4, (dynamic, static)
