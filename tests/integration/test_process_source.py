"""ProcessKafkaSource (the consumer in a child process) against a real broker.

The reference is :class:`KafkaRecordSource`: the same topic read by both gives the same records and
rejections, and the offset, commit and rebalance contract holds across the process boundary.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from consumers.kafka_source import (
    KafkaRecordSource,
    KafkaSourceConfig,
    SourceBatch,
    partition_key,
)
from consumers.process.source import PIPE_BYTES, ProcessKafkaSource, open_kafka_source
from stream_trainer.errors import SourceError
from tests.fixtures.kafka import load_broker, produce_messages
from tests.integration.test_kafka_source import (
    MALFORMED,
    _config,
    _drain,
    _second_member,
    _valid,
)

pytestmark = pytest.mark.integration


def _contents(batches: list[SourceBatch]) -> tuple[list[object], list[object]]:
    """Records and rejections in a comparable form, in (partition, offset) order; values with
    their field order."""
    records = sorted(
        (r.partition, r.offset, r.topic, r.key, r.timestamp_ms, r.raw, list(r.value.items()))
        for b in batches
        for r in b.records
    )
    rejected = sorted(
        (x.partition, x.offset, x.topic, x.key, x.timestamp_ms, x.raw, x.reason, x.detail,
         json.dumps(x.value), x.headers)
        for b in batches
        for x in b.rejected
    )  # fmt: skip
    return records, rejected  # type: ignore[return-value]


def test_reads_what_the_in_process_source_reads(kafka_bootstrap: str, kafka_topic: str) -> None:
    n = 60
    messages = [
        (i % 3, f"key-{i}".encode() if i % 4 else None, MALFORMED[i][0] if i in MALFORMED
         else _valid(i))
        for i in range(n)
    ]  # fmt: skip
    # Values that take the slow path of the decoder but are accepted (whitespace around them),
    # ints and bools among floats, and a field subset.
    messages += [
        (0, b"ws", b' {"x": 1.25, "c": "k", "y": 1} '),
        (1, b"ints", b'{"x": 3, "b": true, "n": null, "c": "\\u00e9", "y": 0}'),
        (2, b"dup", b'{"x": 1.0, "x": 2.5, "y": 1}'),
    ]
    produce_messages(kafka_bootstrap, kafka_topic, messages)
    total = len(messages)
    for features in (None, ("x", "c")):
        reference = KafkaRecordSource(
            _config(kafka_bootstrap, kafka_topic, group_id=f"ref-{features}", features=features)
        )
        with reference:
            expected = _drain(reference, total)
        config = _config(
            kafka_bootstrap, kafka_topic, group_id=f"child-{features}", features=features
        )
        with ProcessKafkaSource(config) as source:
            got = _drain(source, total)  # type: ignore[arg-type]
            assert source._proc.poll() is None  # the child is alive while the source is open
            # its frames' pipe holds several batches read ahead (PIPE_BYTES where allowed)
            pipe = source._proc.stdout.fileno()  # type: ignore[union-attr]
            allowed = int(Path("/proc/sys/fs/pipe-max-size").read_text())
            assert fcntl.fcntl(pipe, fcntl.F_GETPIPE_SZ) == min(PIPE_BYTES, allowed)
            # ... and light: it never loads torch, which it has no use for.
            assert "libtorch" not in Path(f"/proc/{source.pid}/maps").read_text()
        assert _contents(got) == _contents(expected)
        assert len([r for b in got for r in b.rejected]) == len(MALFORMED)
        last: dict[str, int] = {}
        for b in got:
            last.update(b.next_offsets)
        assert last == {partition_key(kafka_topic, p): n // 3 + 1 for p in range(3)}
        assert source._proc.returncode == 0  # closed cleanly


def test_open_kafka_source_follows_the_config_and_errors_keep_their_kind(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    """(Offsets, hooks, commits, lag and caught_up are checked on both sources in
    test_kafka_source.py.)"""
    config = _config(kafka_bootstrap, kafka_topic, consumer_process=False)
    with open_kafka_source(config) as in_process:
        assert isinstance(in_process, KafkaRecordSource)
    produce_messages(kafka_bootstrap, kafka_topic, [(0, None, _valid(i)) for i in range(3)])
    source = open_kafka_source(_config(kafka_bootstrap, kafka_topic))
    assert isinstance(source, ProcessKafkaSource)
    key = partition_key(kafka_topic, 0)
    with source:
        _drain(source, 3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="must be an integer >= 0"):
            source.commit({key: -1})
        source.commit({key: 3})
        with pytest.raises(SourceError, match="refusing to commit") as info:
            source.commit({key: 2})
        assert info.value.retriable is False
        assert source.committed_offsets() == {key: 3}
    with pytest.raises(SourceError, match="closed"):
        source.poll_batch()
    source.close()  # idempotent


def test_caught_up_waits_for_the_batch_read_ahead(
    kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    """The child reads ahead: a source whose last batches are still in the pipe (not handed
    out, so not trained) is not caught up, even though the child has read everything."""
    topic = kafka_topic_factory(1)
    produce_messages(kafka_bootstrap, topic, [(0, None, _valid(i)) for i in range(20)])
    config = _config(kafka_bootstrap, topic, max_batch_records=10)
    with ProcessKafkaSource(config) as source:
        ends = source.end_offsets()
        sizes = []
        deadline = time.monotonic() + 20
        while not source.caught_up(ends):
            assert time.monotonic() < deadline, f"never caught up, batches {sizes}"
            sizes.append(source.poll_batch().size)
        assert sum(sizes) == 20


def _until_the_second_member_has_partitions(
    source: ProcessKafkaSource,
    other: KafkaConsumer,
    revoked: list[list[TopicPartition]],
    step: Callable[[], object],
) -> None:
    """Poll both members (``step`` for the source) until the rebalance is over."""
    deadline = time.monotonic() + 30
    while not other.assignment() or not revoked or source.rebalancing:
        assert time.monotonic() < deadline, "the second member never got partitions"
        other.poll(timeout_ms=50)
        step()


def test_a_rebalance_reaches_the_hooks_and_reading_goes_on(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    produce_messages(kafka_bootstrap, kafka_topic, [(i % 3, None, _valid(i)) for i in range(30)])
    config = _config(kafka_bootstrap, kafka_topic)
    revoked: list[list[TopicPartition]] = []
    asked: list[int] = []

    def offset_provider(topic: str, partition: int) -> int | None:
        asked.append(partition)
        return None

    source = ProcessKafkaSource(config, offset_provider=offset_provider, on_revoke=revoked.append)
    with source:
        _drain(source, 30)  # type: ignore[arg-type]
        other = _second_member(kafka_bootstrap, kafka_topic, config.group_id)
        try:
            _until_the_second_member_has_partitions(source, other, revoked, source.poll_batch)
            owned = {tp.partition for tp in source.assignment()}
            assert owned and len(owned) < 3
        finally:
            other.close(autocommit=False)
        assert revoked[0]  # the partitions owned before the second member came
        assert len(asked) > 3  # asked again on the new assignment
        produce_messages(kafka_bootstrap, kafka_topic, [(p, None, _valid(p)) for p in owned])
        later = _drain(source, len(owned))  # type: ignore[arg-type]
        assert {r.partition for b in later for r in b.records} == owned


def _filled_for_read_ahead(bootstrap: str, topic: str, per_partition: int) -> KafkaSourceConfig:
    """``per_partition`` valid records in each of the topic's 3 partitions; the config of a
    source reading them in batches of 3, four batches ahead."""
    messages = [(i % 3, None, _valid(i)) for i in range(3 * per_partition)]
    produce_messages(bootstrap, topic, messages)
    return _config(bootstrap, topic, max_batch_records=3, read_ahead_batches=4)


@pytest.mark.parametrize("command_each_step", [False, True], ids=["polls-only", "lag-each-step"])
def test_read_ahead_hands_every_record_out_once_across_rebalances(
    kafka_bootstrap: str, kafka_topic: str, command_each_step: bool
) -> None:
    """The child reads several batches ahead. When a second member joins and then leaves, this
    member is sought on each new assignment to the offsets it has handed out (as the service does,
    from its trained offsets), so every record comes out exactly once.

    With ``lag-each-step`` the source is asked for its lag after every batch, as the service's
    metrics do: a command's reply comes after the batch frames the child sent before it, so the
    revocation is often answered while batches read ahead wait to be handed out. Those must be
    dropped (their partitions' next owner, this member too, reads them again from the offsets
    handed out), not handed out after the revocation."""
    per_partition = 300
    config = _filled_for_read_ahead(kafka_bootstrap, kafka_topic, per_partition)
    handed: dict[str, int] = {}  # next offsets of what was handed out: the service's "trained"
    revoked: list[list[TopicPartition]] = []
    seen: list[tuple[int, int]] = []

    def offset_provider(topic: str, partition: int) -> int | None:
        return handed.get(partition_key(topic, partition))

    def take(source: ProcessKafkaSource) -> None:
        batch = source.poll_batch()
        seen.extend((r.partition, r.offset) for r in batch.records)  # type: ignore[misc]
        handed.update(batch.next_offsets)

    source = ProcessKafkaSource(config, offset_provider=offset_provider, on_revoke=revoked.append)
    with source:
        for _ in range(3):
            take(source)
        time.sleep(0.5)  # the child reads ahead
        source.lag()  # reads the batch frames before its reply
        assert sum(b.size for b in source._read_ahead()) == 4 * 3  # read_ahead_batches, full
        other = _second_member(kafka_bootstrap, kafka_topic, config.group_id)

        def step() -> None:
            take(source)
            time.sleep(0.02)  # a training step: records are left when the rebalance comes
            if command_each_step:
                source.lag()

        try:
            _until_the_second_member_has_partitions(source, other, revoked, step)
        finally:
            other.close(autocommit=False)  # leaving rebalances again: all partitions come back
        deadline = time.monotonic() + 30
        while len(set(seen)) < 3 * per_partition:
            assert time.monotonic() < deadline, f"{len(set(seen))} of {3 * per_partition} seen"
            take(source)
            if command_each_step:
                source.lag()
        assert len(revoked) >= 2
    assert len(seen) == len(set(seen)), "records handed out twice"
    assert sorted(seen) == [(p, o) for p in range(3) for o in range(per_partition)]


def test_read_ahead_dropped_at_a_revocation_is_read_again_without_trained_offsets(
    kafka_bootstrap: str,
    kafka_topic: str,
    kafka_topic_factory: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A member joins the group for another topic: the rebalance revokes this member's
    partitions and gives all of them back. The batches read ahead when the revocation is answered
    are dropped; with no offset provider (nothing trained to seek to) and kafka-python keeping the
    position of a partition that comes back, the child is sought to the first message dropped, so
    nothing is lost and nothing is handed out twice."""
    per_partition = 100
    config = _filled_for_read_ahead(kafka_bootstrap, kafka_topic, per_partition)
    revoked: list[list[TopicPartition]] = []
    seen: list[tuple[int, int]] = []

    def take(source: ProcessKafkaSource) -> None:
        seen.extend((r.partition, r.offset) for r in source.poll_batch().records)  # type: ignore[misc]
        source.lag()  # a command: batch frames and events are read while batches wait

    caplog.set_level("INFO", logger="consumers.process.source")
    with ProcessKafkaSource(config, on_revoke=revoked.append) as source:
        for _ in range(3):
            take(source)
        time.sleep(0.5)  # the child reads ahead
        other = _second_member(kafka_bootstrap, kafka_topic_factory(1), config.group_id)
        try:
            deadline = time.monotonic() + 30
            while not revoked or source.rebalancing:  # the second member's join rebalances
                assert time.monotonic() < deadline, "no rebalance"
                other.poll(timeout_ms=50)
                take(source)
            assert sorted(source.assignment()) == [TopicPartition(kafka_topic, p) for p in range(3)]
        finally:
            other.close(autocommit=False)
        deadline = time.monotonic() + 30
        while len(set(seen)) < 3 * per_partition:
            assert time.monotonic() < deadline, f"{len(set(seen))} of {3 * per_partition} seen"
            take(source)
    assert "dropped the messages read ahead of revoked partitions" in caplog.text
    assert len(seen) == len(set(seen)), "records handed out twice"
    assert sorted(seen) == [(p, o) for p in range(3) for o in range(per_partition)]


def test_the_child_outlives_signals_meant_for_the_service(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    """Ctrl-C and systemd signal the whole process group: the child must stay to commit the
    service's last checkpoint, and leave on close."""
    produce_messages(kafka_bootstrap, kafka_topic, [(0, None, _valid(i)) for i in range(5)])
    with ProcessKafkaSource(_config(kafka_bootstrap, kafka_topic)) as source:
        batches = _drain(source, 5)  # type: ignore[arg-type]
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(source.pid, sig)
        time.sleep(0.3)
        assert source._proc.poll() is None
        offsets = {k: v for b in batches for k, v in b.next_offsets.items()}
        p0 = partition_key(kafka_topic, 0)
        # the empty partitions may come at their start position
        assert offsets[p0] == 5 and all(v == 0 for k, v in offsets.items() if k != p0)
        source.commit(offsets)
        assert source.committed_offsets() == offsets
    assert source._proc.returncode == 0


_ORPHAN = """
import os, sys
from consumers.kafka_source import KafkaSourceConfig
from consumers.process.source import ProcessKafkaSource
source = ProcessKafkaSource(KafkaSourceConfig(sys.argv[1], sys.argv[2], group_id="orphan"))
source.poll_batch()
print(source.pid, flush=True)
os._exit(0)  # no close: the child only sees its stdin end
"""


def test_the_child_leaves_when_the_service_dies(kafka_bootstrap: str, kafka_topic: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _ORPHAN, kafka_bootstrap, kafka_topic],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    child = int(done.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        assert time.monotonic() < deadline, "the consumer process outlived its service"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "gone"


def test_a_command_that_fails_in_the_child_is_an_error_and_the_child_goes_on(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    produce_messages(kafka_bootstrap, kafka_topic, [(0, None, _valid(i)) for i in range(2)])
    with ProcessKafkaSource(_config(kafka_bootstrap, kafka_topic)) as source:
        with pytest.raises(SourceError, match="commit failed in the consumer process: KeyError"):
            source._command("commit")  # no offsets: a bug on this side, reported, not fatal
        assert sum(b.size for b in _drain(source, 2)) == 2  # type: ignore[arg-type]
    assert source._proc.returncode == 0


def test_a_dead_child_is_a_clear_error(kafka_bootstrap: str, kafka_topic: str) -> None:
    with ProcessKafkaSource(_config(kafka_bootstrap, kafka_topic)) as source:
        source.poll_batch()
        source._proc.kill()
        with pytest.raises(SourceError, match=r"consumer process exited \(code -9\)") as info:
            for _ in range(3):
                source.poll_batch()
        assert info.value.retriable is False


def test_an_unreachable_broker_stays_a_retriable_error() -> None:
    """(A missing topic is checked on both sources in test_kafka_source.py.)"""
    port = load_broker().free_port()
    unreachable = _config(f"127.0.0.1:{port}", "t", connect_timeout_ms=300, connect_retries=1)
    with pytest.raises(SourceError, match=r"not reachable after 2 attempt\(s\)") as info:
        ProcessKafkaSource(unreachable)
    assert info.value.retriable is True
