"""KafkaRecordSource and DeadLetterSink against a real broker (plus their broker-free units)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import RetriableError

from consumers.dead_letter import DeadLetterSink, dead_letter_topic
from consumers.deserializer import RecordDecoder
from consumers.kafka_source import (
    KafkaRecordSource,
    KafkaSourceConfig,
    SourceBatch,
    _ClosingKafkaConsumer,
    fast_crc32c,
    parse_partition_key,
    partition_key,
)
from consumers.process.source import ProcessKafkaSource
from consumers.retry import ConstantBackoff, ExponentialBackoff, NoBackoff, Retry
from consumers.security import KafkaSecurity
from stream_trainer.errors import ConfigError, SourceError
from stream_trainer.records import Record, RejectedRecord, RejectReason
from tests.fixtures.kafka import load_broker, produce_messages

# -- broker-free units --------------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_quotes_values() -> None:
    with pytest.raises(ConfigError, match=r"unknown Kafka source setting\(s\) \['max_batch'\]"):
        KafkaSourceConfig.from_mapping({"bootstrap_servers": "h:1", "topic": "t", "max_batch": 8})
    with pytest.raises(ConfigError, match=r"heartbeat_interval_ms \(5000\).*\(4000\)"):
        KafkaSourceConfig("h:1", "t", heartbeat_interval_ms=5000, session_timeout_ms=4000)
    with pytest.raises(ConfigError, match="max_batch_records must be an integer >= 1, got 0"):
        KafkaSourceConfig("h:1", "t", max_batch_records=0)
    with pytest.raises(ConfigError, match="topic names use"):
        KafkaSourceConfig("h:1", "bad topic")
    with pytest.raises(ConfigError, match="needs sasl_mechanism"):
        KafkaSecurity(security_protocol="SASL_SSL")


def test_config_keeps_secrets_out_of_repr_and_describe() -> None:
    config = KafkaSourceConfig.from_mapping(
        {
            "bootstrap_servers": "a:1, b:2",
            "topic": "t",
            "features": ["x", "y", "x"],
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "PLAIN",
            "sasl_plain_username": "svc",
            "sasl_plain_password": "hunter2",
        }
    )
    assert config.bootstrap_servers == ("a:1", "b:2")
    assert config.topics == ("t",)
    assert config.features == ("x", "y")
    assert "hunter2" not in repr(config)
    assert "hunter2" not in str(config.describe())
    kwargs = config.consumer_configs()
    assert kwargs["sasl_plain_password"] == "hunter2"
    assert kwargs["enable_auto_commit"] is False
    assert kwargs["max_poll_records"] == config.max_batch_records


def test_config_round_trips_through_its_json_mapping_secrets_included() -> None:
    """The consumer process gets its settings this way (as JSON over its stdin)."""
    config = KafkaSourceConfig(
        ("a:1", "b:2"),
        ("t1", "t2"),
        features=("x",),
        check_crcs=False,
        consumer_process=False,
        security=KafkaSecurity(
            security_protocol="SASL_SSL",
            sasl_mechanism="PLAIN",
            sasl_plain_username="svc",
            sasl_plain_password="hunter2",
        ),
    )
    mapping = json.loads(json.dumps(config.to_mapping()))
    assert mapping["security"]["sasl_plain_password"] == "hunter2"
    assert KafkaSourceConfig.from_mapping(mapping) == config
    with pytest.raises(ConfigError, match="consumer_process must be true or false, got 'yes'"):
        KafkaSourceConfig("h:1", "t", consumer_process="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="read_ahead_batches must be an integer >= 1, got 0"):
        KafkaSourceConfig.from_mapping({"bootstrap_servers": "h:1", "topic": "t",
                                        "read_ahead_batches": 0})  # fmt: skip
    assert KafkaSourceConfig("h:1", "t").read_ahead_batches == 4


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"x": NaN}', RejectReason.NON_FINITE),
        (b'{"x": Infinity}', RejectReason.NON_FINITE),
        (b'{"x": -Infinity}', RejectReason.NON_FINITE),
        (b"\xff\xfe", RejectReason.NOT_UTF8),
        (b"{not json", RejectReason.NOT_JSON),
        (None, RejectReason.NOT_JSON),
        (b"[1, 2]", RejectReason.NOT_OBJECT),
        (b'{"x": [1]}', RejectReason.WRONG_TYPE),
        (b'{"y": 1}', RejectReason.NO_FEATURES),
        (b'{"x": "' + b"a" * 200 + b'"}', RejectReason.TOO_LARGE),
    ],
)
def test_decoder_rejects(raw: bytes | None, reason: RejectReason) -> None:
    item = RecordDecoder(target="y", max_record_bytes=100).decode(raw, offset=3)
    assert isinstance(item, RejectedRecord)
    assert item.reason == reason and item.raw == raw and item.offset == 3


def test_decoder_feature_subset_ignores_other_fields() -> None:
    item = RecordDecoder(target="y", features=["a"]).decode(b'{"a": 1, "b": [1], "y": true}')
    assert isinstance(item, Record) and item.value == {"a": 1, "y": True}


def test_partition_keys() -> None:
    assert parse_partition_key(partition_key("a.b-c", 12)) == ("a.b-c", 12)
    with pytest.raises(ValueError, match="topic:partition"):
        parse_partition_key("nopartition")


def test_retry_backs_off_and_gives_up() -> None:
    sleeps: list[float] = []
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise ConnectionError("refused")

    retry = Retry(ExponentialBackoff(1.0, 3.0, jitter=False), retries=3, sleep=sleeps.append)
    with pytest.raises(ConnectionError):
        retry.call_with_retry(down)
    assert len(calls) == 4 and sleeps == [1.0, 2.0, 3.0]
    assert Retry(ConstantBackoff(0.5), 0).retries == 0


# -- against the broker ---------------------------------------------------------------------------


def _config(bootstrap: str, topic: str, **kw: object) -> KafkaSourceConfig:
    defaults: dict[str, object] = {
        "group_id": f"g-{topic}",
        "target": "y",
        "max_wait_ms": 200,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 500,
        "connect_timeout_ms": 5000,
    }
    defaults.update(kw)
    return KafkaSourceConfig(bootstrap, topic, **defaults)  # type: ignore[arg-type]


def _drain(source: KafkaRecordSource, expected: int, timeout_s: float = 20.0) -> list[SourceBatch]:
    batches: list[SourceBatch] = []
    deadline = time.monotonic() + timeout_s
    while sum(b.size for b in batches) < expected:
        assert time.monotonic() < deadline, f"got {sum(b.size for b in batches)}/{expected}"
        batch = source.poll_batch()
        if batch.size:
            batches.append(batch)
    return batches


def _second_member(bootstrap: str, topic: str, group_id: str | None) -> KafkaConsumer:
    """Another member of the group: its joining (on its first polls) rebalances the group."""
    return KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )


def _valid(i: int) -> bytes:
    return json.dumps({"x": i * 0.5, "c": f"k{i % 3}", "y": i % 2}).encode()


MALFORMED = {
    3: (b"\xc3\x28 not utf-8", RejectReason.NOT_UTF8),
    5: (b'{"x": NaN, "y": 1}', RejectReason.NON_FINITE),
    8: (b"{truncated", RejectReason.NOT_JSON),
    11: (b'"a string"', RejectReason.NOT_OBJECT),
    13: (b'{"x": {"nested": 1}, "y": 0}', RejectReason.WRONG_TYPE),
    17: (b'{"x": Infinity, "y": 0}', RejectReason.NON_FINITE),
}


@pytest.mark.integration
def test_valid_and_malformed_records_split_and_dead_lettered(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    n = 24
    messages = [
        (i % 3, f"key-{i}".encode(), MALFORMED[i][0] if i in MALFORMED else _valid(i))
        for i in range(n)
    ]
    produce_messages(kafka_bootstrap, kafka_topic, messages)
    source = KafkaRecordSource(_config(kafka_bootstrap, kafka_topic, max_batch_records=50))
    sink = DeadLetterSink(kafka_bootstrap)
    try:
        batches = _drain(source, n)
        records = [r for b in batches for r in b.records]
        rejected = [r for b in batches for r in b.rejected]
        by_key = {r.key: r for r in records}
        assert set(by_key) == {f"key-{i}".encode() for i in range(n) if i not in MALFORMED}
        for i in range(n):
            if i not in MALFORMED:
                rec = by_key[f"key-{i}".encode()]
                assert rec.value == json.loads(_valid(i))
                assert rec.raw == _valid(i)
                assert (rec.topic, rec.partition, rec.offset) == (kafka_topic, i % 3, i // 3)
                assert rec.timestamp_ms and rec.timestamp_ms > 1_600_000_000_000
        got = {r.key: (r.raw, r.reason) for r in rejected}
        assert got == {f"key-{i}".encode(): MALFORMED[i] for i in MALFORMED}
        next_offsets: dict[str, int] = {}
        for b in batches:
            next_offsets.update(b.next_offsets)
        assert next_offsets == {partition_key(kafka_topic, p): n // 3 for p in range(3)}

        sink.send_many(rejected)
        sink.flush()
        source.commit(next_offsets)
        assert dict(sink.counts) == {"not_utf8": 1, "non_finite": 2, "not_json": 1,
                                     "not_object": 1, "wrong_type": 1}  # fmt: skip

        # The partition keeps flowing after the malformed records.
        produce_messages(kafka_bootstrap, kafka_topic, [(1, b"later", _valid(99))])
        (later,) = _drain(source, 1)
        assert [r.key for r in later.records] == [b"later"]
        assert later.next_offsets == {partition_key(kafka_topic, 1): n // 3 + 1}
    finally:
        sink.close()
        source.close()
        source.close()

    dlq = KafkaConsumer(
        dead_letter_topic(kafka_topic),
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
    )
    letters = []
    try:
        deadline = time.monotonic() + 20
        while len(letters) < len(MALFORMED) and time.monotonic() < deadline:
            for msgs in dlq.poll(timeout_ms=500).values():
                letters.extend(msgs)
    finally:
        dlq.close()
    assert len(letters) == len(MALFORMED)
    for m in letters:
        i = int(m.key.decode().removeprefix("key-"))
        headers = dict(m.headers)
        assert m.value == MALFORMED[i][0]
        assert headers["x-reason"] == MALFORMED[i][1].value.encode()
        assert headers["x-detail"]
        assert headers["x-source-topic"] == kafka_topic.encode()
        assert headers["x-source-partition"] == str(i % 3).encode()
        assert headers["x-source-offset"] == str(i // 3).encode()
        assert int(headers["x-source-timestamp"]) > 1_600_000_000_000


@pytest.mark.integration
def test_batches_vary_and_never_exceed_the_cap(kafka_bootstrap: str, kafka_topic: str) -> None:
    produce_messages(kafka_bootstrap, kafka_topic, [(i % 3, None, _valid(i)) for i in range(300)])
    with KafkaRecordSource(_config(kafka_bootstrap, kafka_topic, max_batch_records=64)) as source:
        sizes = [b.size for b in _drain(source, 300)]
        produce_messages(kafka_bootstrap, kafka_topic, [(0, None, _valid(1))])
        sizes += [b.size for b in _drain(source, 1)]
    assert sum(sizes) == 301
    assert max(sizes) <= 64
    assert 64 in sizes and sizes[-1] == 1


BOTH_SOURCES = pytest.mark.parametrize(
    "source_cls", [KafkaRecordSource, ProcessKafkaSource], ids=["one-process", "consumer-process"]
)


@pytest.mark.integration
@BOTH_SOURCES
def test_assignment_seeks_to_provided_offsets_and_revoke_hook_runs(
    kafka_bootstrap: str, kafka_topic: str, source_cls: type[KafkaRecordSource]
) -> None:
    produce_messages(kafka_bootstrap, kafka_topic, [(i % 3, None, _valid(i)) for i in range(30)])
    provided = {0: 7, 1: None, 2: 10}
    asked: list[tuple[str, int]] = []
    revoked: list[list[TopicPartition]] = []

    def offset_provider(topic: str, partition: int) -> int | None:
        asked.append((topic, partition))
        return provided[partition]

    source = source_cls(
        _config(kafka_bootstrap, kafka_topic),
        offset_provider=offset_provider,
        on_revoke=revoked.append,
    )
    with source:
        batches = _drain(source, 3 + 10 + 0)
        assert source.assignment() == [TopicPartition(kafka_topic, p) for p in range(3)]
        first = {}
        for rec in (r for b in batches for r in b.records):
            first.setdefault(rec.partition, rec.offset)
        assert first == {0: 7, 1: 0}
        assert source.lag() == {partition_key(kafka_topic, p): 0 for p in range(3)}
    # One rebalance only: the first JoinGroup already knew every partition of the new topic
    # (joining before the metadata arrived used to cost a second rebalance right after the first).
    assert asked == [(kafka_topic, p) for p in range(3)]
    assert revoked == [[TopicPartition(kafka_topic, p) for p in range(3)]]  # on close only


@pytest.mark.integration
@BOTH_SOURCES
def test_commit_resume_lag_and_caught_up(
    kafka_bootstrap: str, kafka_topic: str, source_cls: type[KafkaRecordSource]
) -> None:
    produce_messages(kafka_bootstrap, kafka_topic, [(0, None, _valid(i)) for i in range(30)])
    config = _config(kafka_bootstrap, kafka_topic, max_batch_records=10)
    with source_cls(config) as source:
        ends = source.end_offsets()
        assert ends == {partition_key(kafka_topic, p): (30 if p == 0 else 0) for p in range(3)}
        batch = _drain(source, 1)[0]
        assert batch.size == 10
        assert sum(source.lag().values()) == 20
        assert not source.caught_up(ends)
        # the empty partitions may come with it at their start position
        p0 = partition_key(kafka_topic, 0)
        assert batch.next_offsets[p0] == 10
        assert all(v == 0 for k, v in batch.next_offsets.items() if k != p0)
        source.commit(batch.next_offsets)
        assert source.committed_offsets() == batch.next_offsets
        with pytest.raises(SourceError, match="refusing to commit") as info:
            source.commit({partition_key(kafka_topic, 0): 5})
        assert info.value.retriable is False
    with source_cls(config) as again:
        rest = _drain(again, 20)
        offsets = [r.offset for b in rest for r in b.records]
        assert offsets == list(range(10, 30))
        assert again.caught_up(ends)
        assert again.lag() == {partition_key(kafka_topic, p): 0 for p in range(3)}


@pytest.mark.integration
@BOTH_SOURCES
def test_missing_topic_is_a_clear_error_or_created(
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., str],
    source_cls: type[KafkaRecordSource],
) -> None:
    name = kafka_topic_factory(1) + "-absent"
    with pytest.raises(SourceError, match=r"do not exist.*create_topic=True") as info:
        source_cls(_config(kafka_bootstrap, name))
    assert info.value.retriable is False
    config = _config(kafka_bootstrap, name, create_topic=True, create_topic_partitions=2)
    with source_cls(config) as source:
        assert len(source.end_offsets()) == 2


@pytest.mark.integration
def test_unreachable_broker_fails_clearly_within_bounded_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = load_broker().free_port()
    sleeps: list[float] = []
    config = KafkaSourceConfig(f"127.0.0.1:{port}", "t", connect_timeout_ms=400)
    threads = threading.active_count()
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="consumers.kafka_source"),
        pytest.raises(SourceError, match=r"not reachable after 3 attempt\(s\)") as info,
    ):
        KafkaRecordSource(
            config,
            retry=Retry(
                NoBackoff(),
                retries=2,
                retry_on=(RetriableError, OSError),
                sleep=sleeps.append,
            ),
        )
    assert info.value.retriable is True
    assert time.monotonic() - started < 10
    assert sleeps == [0.0, 0.0]
    assert "not reachable (attempt 1/3)" in caplog.text
    assert threading.active_count() == threads  # no IO thread left behind per failed attempt


@pytest.mark.integration
def test_no_commit_goes_out_while_the_group_rebalances(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    """From a revocation to the next assignment, commit raises a retriable SourceError without
    sending anything (kafka-python 3.0.12 can wedge a leader that commits while it waits for its
    SyncGroup answer); once the rebalance is over, commits go through again."""
    produce_messages(kafka_bootstrap, kafka_topic, [(i % 3, None, _valid(i)) for i in range(30)])
    config = _config(kafka_bootstrap, kafka_topic)
    seen: list[tuple[bool, bool, str]] = []
    holder: list[KafkaRecordSource] = []

    def on_revoke(partitions: list[TopicPartition]) -> None:  # kafka-python's IO thread
        source = holder[0]
        try:
            source.commit({partition_key(kafka_topic, 0): 1})
        except SourceError as exc:
            seen.append((source.rebalancing, exc.retriable, str(exc)))

    source = KafkaRecordSource(config, on_revoke=on_revoke)
    holder.append(source)
    with source:
        batches = _drain(source, 30)
        assert not source.rebalancing
        # A second member joins: both must poll for the rebalance to complete.
        other = _second_member(kafka_bootstrap, kafka_topic, config.group_id)
        try:
            deadline = time.monotonic() + 30
            while not other.assignment() or source.rebalancing or not seen:
                assert time.monotonic() < deadline, "the second member never got partitions"
                other.poll(timeout_ms=50)
                source.poll_batch()
        finally:
            other.close(autocommit=False)
        assert seen and seen[0][:2] == (True, True)
        assert "rebalance is in progress" in seen[0][2]
        owned = {tp.partition for tp in source.assignment()}
        assert owned and len(owned) < 3
        last = {k: v for b in batches for k, v in b.next_offsets.items()}
        mine = {k: v for k, v in last.items() if parse_partition_key(k)[1] in owned}
        source.commit(mine)  # the rebalance is over: the commit is sent
        assert {k: v for k, v in source.committed_offsets().items() if k in mine} == mine


def _count_positions(source: KafkaRecordSource) -> list[TopicPartition]:
    """Record every ``position()`` lookup the source makes from now on."""
    calls: list[TopicPartition] = []
    consumer = source._consumer
    original = consumer.position

    def position(tp: TopicPartition, **kw: object) -> int | None:
        calls.append(tp)
        return original(tp, **kw)  # type: ignore[arg-type]

    consumer.position = position  # type: ignore[method-assign]
    return calls


def test_check_crcs_is_validated_and_resolved() -> None:
    with pytest.raises(ConfigError, match="check_crcs must be true, false or null"):
        KafkaSourceConfig("h:1", "t", check_crcs="yes")  # type: ignore[arg-type]
    assert KafkaSourceConfig("h:1", "t", check_crcs=True).consumer_configs()["check_crcs"] is True
    assert KafkaSourceConfig("h:1", "t", check_crcs=False).consumer_configs()["check_crcs"] is False
    auto = KafkaSourceConfig.from_mapping({"bootstrap_servers": "h:1", "topic": "t"})
    assert auto.consumer_configs()["check_crcs"] is fast_crc32c()


@pytest.mark.integration
def test_caught_up_tracks_offsets_locally_after_a_seek(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    """A partition sought to its end, and one read to its end, are caught up without any
    ``position()`` lookup; an empty partition is ignored; a partition being read is not caught
    up, also without a lookup."""
    produce_messages(
        kafka_bootstrap, kafka_topic, [(p, None, _valid(i)) for p in (0, 1) for i in range(10)]
    )
    provided = {0: 10, 1: 4, 2: None}
    source = KafkaRecordSource(
        _config(kafka_bootstrap, kafka_topic, max_batch_records=2),
        offset_provider=lambda topic, p: provided[p],
    )
    with source:
        ends = source.end_offsets()
        assert ends == {partition_key(kafka_topic, p): (10 if p < 2 else 0) for p in range(3)}
        assert not source.caught_up(ends)  # nothing assigned yet
        first = _drain(source, 1)  # joins the group: the batch that carries the join
        assert first[0].records[0].offset == 4
        assert not source.caught_up(ends)
        calls = _count_positions(source)
        more = _drain(source, 1)
        assert not source.caught_up(ends)
        assert calls == []
        rest = more + _drain(source, 6 - first[0].size - more[0].size)
        assert [r.offset for b in first + rest for r in b.records] == list(range(4, 10))
        assert source.caught_up(ends)
        assert calls == []
        assert source.lag() == {partition_key(kafka_topic, p): 0 for p in range(3)}


@pytest.mark.integration
def test_caught_up_asks_the_consumer_once_for_a_partition_started_at_its_committed_offset(
    kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    topic = kafka_topic_factory(1)
    produce_messages(kafka_bootstrap, topic, [(0, None, _valid(i)) for i in range(5)])
    config = _config(kafka_bootstrap, topic)
    with KafkaRecordSource(config) as source:
        source.commit(_drain(source, 5)[-1].next_offsets)
    with KafkaRecordSource(config) as again:
        ends = again.end_offsets()
        calls = _count_positions(again)
        deadline = time.monotonic() + 20
        while not again.assignment():
            assert time.monotonic() < deadline, "never assigned"
            assert again.poll_batch().size == 0
        assert again.caught_up(ends)
        assert again.caught_up(ends)
        assert calls == [TopicPartition(topic, 0)]  # learned once, then known


def _positions_caught_up(source: KafkaRecordSource, ends: dict[str, int]) -> bool:
    """The reference answer: every non-empty partition is owned here, positioned at its end."""
    assigned = {partition_key(*tp): tp for tp in source.assignment()}
    for key, end in ends.items():
        tp = assigned.get(key)
        if end > 0 and (tp is None or source._consumer.position(tp) < end):
            return False
    return True


@pytest.mark.integration
def test_caught_up_stays_correct_across_a_rebalance(kafka_bootstrap: str, kafka_topic: str) -> None:
    """Offsets known before a rebalance are forgotten: partitions that another member took are not
    caught up, and after each batch the answer is the one the consumer's positions give."""
    produce_messages(kafka_bootstrap, kafka_topic, [(i % 3, None, _valid(i)) for i in range(30)])
    config = _config(kafka_bootstrap, kafka_topic)
    source = KafkaRecordSource(config)
    checked = 0

    def poll_and_check() -> SourceBatch:
        nonlocal checked
        batch = source.poll_batch()
        if not source.rebalancing:
            assert source.caught_up(ends) == _positions_caught_up(source, ends)
            checked += 1
        return batch

    with source:
        ends = source.end_offsets()
        _drain(source, 30)
        assert source.caught_up(ends)
        other = _second_member(kafka_bootstrap, kafka_topic, config.group_id)
        try:
            deadline = time.monotonic() + 30
            while not other.assignment() or source.rebalancing or not source.assignment():
                assert time.monotonic() < deadline, "the second member never got partitions"
                other.poll(timeout_ms=50, max_records=1)
                poll_and_check()
            owned = {tp.partition for tp in source.assignment()}
            assert owned and len(owned) < 3
            assert not source.caught_up(ends)  # the other member's partitions are not read here
        finally:
            other.close(autocommit=False)
        # Alone again: every partition comes back, at its position or its committed offset.
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, "the partitions never came back"
            poll_and_check()
            if len(source.assignment()) == 3 and source.caught_up(ends):
                break
        assert checked > 2


class _RejoinInTheMiddleOfABatch(_ClosingKafkaConsumer):
    """The real consumer. Once armed (``before_second_poll``), its next poll that only takes what
    is buffered (a batch's second poll, ``timeout_ms=0``) first runs that function: a second
    member joins and this one waits until it is told to rejoin, so the revocation comes between
    two polls of one batch."""

    before_second_poll: Callable[[KafkaConsumer], None] | None = None

    def poll(self, timeout_ms: int = 0, max_records: int | None = None, **kw: object) -> dict:  # type: ignore[override,type-arg]
        hook = self.before_second_poll
        if timeout_ms == 0 and hook is not None:
            self.before_second_poll = None
            hook(self)
        return super().poll(timeout_ms=timeout_ms, max_records=max_records, **kw)  # type: ignore[arg-type]


def test_messages_read_before_a_revocation_in_the_middle_of_a_batch_are_not_handed_out(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    """A batch takes several polls; a revocation that comes between them (its hook has run) must
    not be followed by that batch handing out the messages the earlier polls read from the revoked
    partitions: their next owner reads them too. They are read again from where the rebalance
    leaves each partition (sought to the handed-out offset, or back to the first message dropped
    when it keeps its position), so over the whole run every message comes out exactly once."""
    per_partition = 200
    produce_messages(
        kafka_bootstrap, kafka_topic, [(i % 3, None, _valid(i)) for i in range(3 * per_partition)]
    )
    config = _config(kafka_bootstrap, kafka_topic, max_batch_records=1000)  # > the topic: 2 polls
    handed: dict[str, int] = {}
    revoked: list[list[TopicPartition]] = []
    seen: list[tuple[int, int]] = []
    stop = threading.Event()
    joined = threading.Event()

    def other_member() -> None:
        other = _second_member(kafka_bootstrap, kafka_topic, config.group_id)
        try:
            joined.set()
            while not stop.is_set():
                other.poll(timeout_ms=50, max_records=1)  # joins; reads nothing (offsets: latest)
        finally:
            other.close(autocommit=False)

    def join_and_wait(consumer: KafkaConsumer) -> None:
        threading.Thread(target=other_member, daemon=True).start()
        deadline = time.monotonic() + 20
        while not consumer._coordinator.need_rejoin():  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "this member was never told to rejoin"
            time.sleep(0.01)

    source = KafkaRecordSource(
        config,
        offset_provider=lambda topic, partition: handed.get(partition_key(topic, partition)),
        on_revoke=revoked.append,
        consumer_factory=_RejoinInTheMiddleOfABatch,
    )

    def take() -> SourceBatch:
        batch = source.poll_batch()
        seen.extend((r.partition, r.offset) for r in batch.records)  # type: ignore[misc]
        handed.update(batch.next_offsets)
        return batch

    try:
        with source:
            consumer = source._consumer
            assert isinstance(consumer, _RejoinInTheMiddleOfABatch)
            consumer.before_second_poll = join_and_wait
            deadline = time.monotonic() + 30
            batch = take()
            while consumer.before_second_poll is not None:  # until a batch takes a second poll
                assert time.monotonic() < deadline, "no batch took a second poll"
                batch = take()
            assert revoked, "no revocation in the middle of the batch"
            gone = {partition_key(tp.topic, tp.partition) for tp in revoked[0]}
            late = [r for r in batch.records if partition_key(kafka_topic, r.partition) in gone]
            assert not late, f"{len(late)} messages of revoked partitions handed out after it"
            deadline = time.monotonic() + 60
            while len(set(seen)) < 3 * per_partition or len(source.assignment()) < 3:
                assert time.monotonic() < deadline, f"{len(set(seen))} of {3 * per_partition}"
                take()
                if joined.is_set() and not source.rebalancing and len(revoked) >= 1:
                    stop.set()  # the second member leaves: every partition comes back here
    finally:
        stop.set()
    assert len(seen) == len(set(seen)), "messages handed out twice"
    assert sorted(seen) == [(p, o) for p in range(3) for o in range(per_partition)]
