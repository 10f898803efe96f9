"""One contract suite over every source of batches and every dead-letter sink the service reads
and writes through (:mod:`stream_trainer.sources.protocol`): the file adapters, and the Kafka
source (in this process and with its consumer in a child process) and dead-letter topic against a
real broker (marked ``integration``).

Each source gets a backend that writes messages into its stream and opens a source on it at given
start offsets; a source without durable commits (a file) says so, and the commit checks expect
``{}`` from it instead of the committed offsets.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stream_trainer.records import Record, RejectedRecord, RejectReason
from stream_trainer.sources import Batch, BatchSizes, BatchSource, DeadLetterSink
from stream_trainer.sources.dead_letter_file import DeadLetterFile
from stream_trainer.sources.file_batches import FileBatchSource

MAX_BATCH = 7
N_VALID, BAD_AT = 30, (4, 17, 29)  # message positions that are not JSON


def messages() -> list[bytes]:
    out: list[bytes] = []
    valid = 0
    for position in range(N_VALID + len(BAD_AT)):
        if position in BAD_AT:
            out.append(b"not json {")
        else:
            out.append(json.dumps({"i": valid, "x": valid / 10, "y": valid % 2}).encode())
            valid += 1
    return out


@dataclass
class SourceBackend:
    name: str
    key: str  # the one partition's offsets key
    write: Callable[[list[bytes]], None]
    open: Callable[[dict[str, int]], BatchSource]
    durable_commits: bool


def _file_backend(tmp_path: Path) -> SourceBackend:
    path = tmp_path / "stream.jsonl"

    def write(lines: list[bytes]) -> None:
        path.write_bytes(b"".join(line + b"\n" for line in lines))

    def open_(start: dict[str, int]) -> BatchSource:
        return FileBatchSource(
            str(path),
            target="y",
            batch_sizes=BatchSizes.parse(f"1:{MAX_BATCH}"),
            seed=0,
            start_offsets=start,
        )

    return SourceBackend("file", f"{path}:0", write, open_, durable_commits=False)


def _kafka_backend(bootstrap: str, *, process: bool) -> SourceBackend:
    from consumers import KafkaSourceConfig, open_kafka_source
    from tests.fixtures.kafka import create_topic, produce_messages

    topic = create_topic(bootstrap, f"t-contract-{uuid.uuid4().hex[:10]}", 1)
    group = f"{topic}-group"

    def write(lines: list[bytes]) -> None:
        produce_messages(bootstrap, topic, [(0, None, line) for line in lines])

    def open_(start: dict[str, int]) -> BatchSource:
        config = KafkaSourceConfig(
            bootstrap_servers=bootstrap,
            topics=topic,
            group_id=group,
            target="y",
            max_batch_records=MAX_BATCH,
            max_wait_ms=100,
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            consumer_process=process,
        )
        return open_kafka_source(config, offset_provider=lambda t, p: start.get(f"{t}:{p}"))

    name = "kafka-process" if process else "kafka"
    return SourceBackend(name, f"{topic}:0", write, open_, durable_commits=True)


@pytest.fixture(
    params=[
        "file",
        pytest.param("kafka", marks=pytest.mark.integration),
        pytest.param("kafka-process", marks=pytest.mark.integration),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> SourceBackend:
    if request.param == "file":
        return _file_backend(tmp_path)
    bootstrap = request.getfixturevalue("kafka_bootstrap")
    return _kafka_backend(bootstrap, process=request.param == "kafka-process")


@pytest.fixture
def opened(backend: SourceBackend) -> Iterator[Callable[[dict[str, int]], BatchSource]]:
    """``open(start)`` for the test, closing every source it opened at the end."""
    sources: list[BatchSource] = []

    def open_(start: dict[str, int]) -> BatchSource:
        source = backend.open(start)
        sources.append(source)
        return source

    yield open_
    for source in sources:
        source.close()


def drain(
    source: BatchSource, *, batches: int | None = None, timeout_s: float = 60.0
) -> list[Batch]:
    """Poll until the source has handed out everything there was when it started (or until
    ``batches`` non-empty batches)."""
    ends = source.end_offsets()
    out: list[Batch] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = source.poll_batch()
        if batch.records or batch.rejected:
            out.append(batch)
            if batches is not None and len(out) >= batches:
                return out
        elif source.caught_up(ends):
            return out
    pytest.fail(f"the source did not hand out everything within {timeout_s} s")


def items(batches: list[Batch]) -> list[Record | RejectedRecord]:
    out: list[Record | RejectedRecord] = []
    for batch in batches:
        out.extend(sorted([*batch.records, *batch.rejected], key=lambda i: i.offset or 0))
    return out


# ---------------------------------------------------------------------------------- sources


def test_the_source_implements_the_protocol(
    backend: SourceBackend, opened: Callable[[dict[str, int]], BatchSource]
) -> None:
    backend.write(messages())
    assert isinstance(opened({}), BatchSource)


def test_every_message_comes_once_in_order_and_next_offsets_follow_the_batch(
    backend: SourceBackend, opened: Callable[[dict[str, int]], BatchSource]
) -> None:
    sent = messages()
    backend.write(sent)
    batches = drain(opened({}))
    got = items(batches)
    assert [i.offset for i in got] == list(range(len(sent)))
    assert [i.offset for i in got if isinstance(i, RejectedRecord)] == list(BAD_AT)
    assert all(i.reason is RejectReason.NOT_JSON for i in got if isinstance(i, RejectedRecord))
    values = [i.value for i in got if isinstance(i, Record)]
    assert [v["i"] for v in values] == list(range(N_VALID))
    for batch in batches:
        offsets = [i.offset for i in (*batch.records, *batch.rejected)]
        assert 1 <= len(offsets) <= MAX_BATCH
        assert batch.next_offsets[backend.key] == max(o for o in offsets if o is not None) + 1


def test_a_source_reopened_at_a_batchs_next_offsets_resumes_right_after_it(
    backend: SourceBackend, opened: Callable[[dict[str, int]], BatchSource]
) -> None:
    sent = messages()
    backend.write(sent)
    first = opened({})
    head = drain(first, batches=2)
    resume = dict(head[-1].next_offsets)
    first.close()
    rest = drain(opened(resume))
    offsets = [i.offset for i in items(head)] + [i.offset for i in items(rest)]
    assert offsets == list(range(len(sent)))
    assert items(rest)[0].offset == resume[backend.key]


def test_commits_are_kept_with_their_metadata_where_the_source_keeps_any(
    backend: SourceBackend, opened: Callable[[dict[str, int]], BatchSource]
) -> None:
    backend.write(messages())
    source = opened({})
    drain(source)
    source.commit({backend.key: 5}, {backend.key: '{"v":1}'})
    if backend.durable_commits:
        assert source.committed_offsets() == {backend.key: 5}
        assert source.committed_metadata() == {backend.key: (5, '{"v":1}')}
        assert source.end_offsets() == {backend.key: len(messages())}
        assert source.lag() == {backend.key: 0}
    else:
        assert source.committed_offsets() == {} and source.committed_metadata() == {}
        assert source.end_offsets() == {} and source.lag() == {}


def test_close_is_idempotent(
    backend: SourceBackend, opened: Callable[[dict[str, int]], BatchSource]
) -> None:
    backend.write(messages())
    source = opened({})
    source.poll_batch()
    started = time.monotonic()
    source.close()
    source.close()
    assert time.monotonic() - started < 30


# ---------------------------------------------------------------------------------- dead letters


@dataclass
class SinkBackend:
    open: Callable[[], DeadLetterSink]
    read: Callable[[int], list[tuple[bytes, str]]]  # (original bytes, reason) of each letter


@pytest.fixture(params=["file", pytest.param("kafka", marks=pytest.mark.integration)])
def sink_backend(request: pytest.FixtureRequest, tmp_path: Path) -> SinkBackend:
    if request.param == "file":
        path = tmp_path / "dead.jsonl"

        def read_file(n: int) -> list[tuple[bytes, str]]:
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            return [(base64.b64decode(d["raw_b64"]), d["reason"]) for d in lines]

        return SinkBackend(lambda: DeadLetterFile(path), read_file)
    from consumers import DeadLetterSink as KafkaDeadLetters
    from tests.fixtures.kafka import create_topic, read_topic

    bootstrap = request.getfixturevalue("kafka_bootstrap")
    topic = create_topic(bootstrap, f"t-contract-dlq-{uuid.uuid4().hex[:10]}", 1)

    def read_kafka(n: int) -> list[tuple[bytes, str]]:
        letters = read_topic(bootstrap, topic, n)
        return [(m.value, dict(m.headers)["x-reason"].decode()) for m in letters]

    return SinkBackend(lambda: KafkaDeadLetters(bootstrap, topic=topic), read_kafka)


def _rejected() -> list[RejectedRecord]:
    return [
        RejectedRecord(RejectReason.NOT_JSON, "bad", raw=b"not json {", topic="t", partition=0,
                       offset=3),
        RejectedRecord(RejectReason.BAD_LABEL, "bad label", raw=b'{"y": 1.5}', topic="t",
                       partition=0, offset=9),
        RejectedRecord(RejectReason.DUPLICATE_ID, "dup", raw=b'{"id": 1}', topic="t",
                       partition=0, offset=11),
    ]  # fmt: skip


def test_a_sink_keeps_every_letter_with_its_bytes_and_reason(sink_backend: SinkBackend) -> None:
    sink = sink_backend.open()
    assert isinstance(sink, DeadLetterSink)
    letters = _rejected()
    try:
        assert sink.send_many(letters) == len(letters)
        sink.flush()
        assert dict(sink.counts) == {"not_json": 1, "bad_label": 1, "duplicate_id": 1}
    finally:
        sink.close()
        sink.close()
    assert sink_backend.read(len(letters)) == [(r.raw, r.reason.value) for r in letters]
