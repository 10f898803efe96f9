"""The service against a real Kafka broker and a real Redis: what it trains, dead-letters, saves
and commits, and how it starts (resume, refusal to start a new model mid-topic, ``fresh_start``).

Each test runs :class:`~stream_trainer.service.TrainerService` in-process until it has caught up
with the end offsets seen at start (``stop_at_end``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consumers import dead_letter_topic
from stream_trainer.checkpoints import open_store
from stream_trainer.errors import ConfigError
from stream_trainer.records import DEFAULT_MAX_RECORD_BYTES
from stream_trainer.service import TrainerService, load_service_config
from tests.fixtures.kafka import end_offsets, group_offsets, produce_messages, read_topic

pytestmark = pytest.mark.integration

PARTITIONS = 3


# ---------------------------------------------------------------------------------- helpers


@dataclass
class Produced:
    """What a test produced, so that it can predict what the service must do with it."""

    valid_labelled: int = 0
    predicted_only: int = 0
    malformed: list[tuple[str, bytes]] = field(default_factory=list)  # (reason, value bytes)

    @property
    def total(self) -> int:
        return self.valid_labelled + self.predicted_only + len(self.malformed)


def _valid(i: int) -> bytes:
    return json.dumps({"id": i, "x1": (i % 7) / 7.0, "x2": math.sin(i), "label": i % 2}).encode()


def _malformed(i: int) -> list[tuple[str, bytes]]:
    """One record of every kind of malformation, each with the reason it must be set aside for."""
    oversized = json.dumps({"id": i, "x1": 1.0, "label": 0, "pad": "x" * DEFAULT_MAX_RECORD_BYTES})
    return [
        ("not_utf8", b'{"id": ' + str(i).encode() + b', "x1": "\xff\xfe", "label": 1}'),
        ("not_json", b'{"id": %d, "x1": 1.0, "label": ' % i),
        ("not_object", json.dumps([i, 1.0, 0]).encode()),
        ("wrong_type", json.dumps({"id": i, "x1": [1, 2], "x2": 0.5, "label": 1}).encode()),
        ("wrong_type", json.dumps({"id": i, "x1": {"a": 1}, "x2": 0.5, "label": 0}).encode()),
        ("non_finite", b'{"id": %d, "x1": NaN, "x2": 0.5, "label": 1}' % i),
        ("non_finite", b'{"id": %d, "x1": 0.5, "x2": -Infinity, "label": 0}' % i),
        ("bad_label", json.dumps({"id": i, "x1": 0.5, "x2": 0.5, "label": [1]}).encode()),
        ("bad_label", json.dumps({"id": i, "x1": 0.5, "x2": 0.5, "label": 0.5}).encode()),
        ("too_large", oversized.encode()),
    ]


def produce_mix(bootstrap: str, topic: str, n_valid: int, *, start_id: int = 0) -> Produced:
    """``n_valid`` labelled records, every tenth one unlabelled, and a full set of malformed ones
    spread over the partitions (round robin)."""
    produced = Produced()
    values: list[bytes] = []
    for i in range(start_id, start_id + n_valid):
        if i % 10 == 9:
            values.append(json.dumps({"id": i, "x1": 0.25, "x2": 0.75}).encode())
            produced.predicted_only += 1
        else:
            values.append(_valid(i))
            produced.valid_labelled += 1
        if i % 40 == 20:
            for reason, raw in _malformed(i):
                values.append(raw)
                produced.malformed.append((reason, raw))
    produce_messages(
        bootstrap,
        topic,
        ((n % PARTITIONS, f"k{n}".encode(), v) for n, v in enumerate(values, start_id)),
    )
    return produced


def service_config(bootstrap: str, topic: str, checkpoint: str, group: str, **flags: Any) -> Any:
    settings: dict[str, Any] = {
        "source": f"kafka://{bootstrap}/{topic}",
        "group": group,
        "checkpoint": checkpoint,
        "checkpoint_every_records": 50,
        "metrics_address": "off",
        "stop_at_end": True,
        "progress": False,
        "max_wait_ms": 50,
        "max_batch_records": 32,
        **flags,
    }
    trainer = {"target": "label", "task": "classification", "hidden": (8,), "seed": 7}
    return load_service_config(flags=settings, trainer_flags=trainer, environ={})


@pytest.fixture
def redis_prefix_url(
    redis_url: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """``url(prefix)``: the session Redis, with a checkpoint prefix private to this test."""

    def url(prefix: str = "main") -> str:
        return f"{redis_url}?prefix={request.node.name}-{prefix}"

    yield url


# ---------------------------------------------------------------------------------- tests


def test_trains_the_valid_records_and_dead_letters_the_rest(
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., str],
    redis_prefix_url: Callable[..., str],
) -> None:
    topic = kafka_topic_factory(PARTITIONS)
    produced = produce_mix(kafka_bootstrap, topic, 400)
    group = f"{topic}-group"
    checkpoint_url = redis_prefix_url()

    report = TrainerService(service_config(kafka_bootstrap, topic, checkpoint_url, group)).run()

    ends = end_offsets(kafka_bootstrap, topic)
    assert sum(ends.values()) == produced.total
    want_reasons = dict(sorted(Counter(reason for reason, _ in produced.malformed).items()))
    # The report: what was trained, predicted only, set aside, and where each partition stands.
    assert report["final_checkpoint_ok"] is True
    assert report["records_trained"] == report["samples"] == produced.valid_labelled
    assert report["predicted_only"] == produced.predicted_only
    assert report["dead_lettered"] == want_reasons
    assert report["rejected_total"] == len(produced.malformed)
    assert report["next_offsets"] == ends

    # The checkpoint holds the end offsets and the trained samples; Kafka's group agrees.
    with open_store(checkpoint_url) as store:
        checkpoint = store.load_latest()
    assert checkpoint is not None
    assert checkpoint.samples == produced.valid_labelled
    assert checkpoint.offsets == ends
    assert checkpoint.version == report["checkpoint_version"]
    assert group_offsets(kafka_bootstrap, group) == checkpoint.offsets

    # The dead-letter topic holds exactly the malformed records, byte for byte, with the reason.
    letters = read_topic(kafka_bootstrap, dead_letter_topic(topic), len(produced.malformed))
    got = sorted((dict(m.headers)["x-reason"].decode(), m.value) for m in letters)
    assert got == sorted(produced.malformed)
    for m in letters:
        headers = dict(m.headers)
        assert headers["x-source-topic"].decode() == topic
        assert headers["x-detail"]
        partition, offset = int(headers["x-source-partition"]), int(headers["x-source-offset"])
        assert 0 <= offset < ends[f"{topic}:{partition}"]


def test_a_second_run_resumes_from_the_checkpoint(
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., str],
    redis_prefix_url: Callable[..., str],
) -> None:
    topic = kafka_topic_factory(PARTITIONS)
    group = f"{topic}-group"
    checkpoint_url = redis_prefix_url()
    first = produce_mix(kafka_bootstrap, topic, 200)
    report1 = TrainerService(service_config(kafka_bootstrap, topic, checkpoint_url, group)).run()
    assert report1["samples"] == first.valid_labelled

    second = produce_mix(kafka_bootstrap, topic, 150, start_id=1000)
    service = TrainerService(service_config(kafka_bootstrap, topic, checkpoint_url, group))
    assert service.restored is not None
    assert service.restored.version == report1["checkpoint_version"]
    report2 = service.run()

    ends = end_offsets(kafka_bootstrap, topic)
    lifetime = first.valid_labelled + second.valid_labelled
    # Samples and counts over the model's whole life; records_trained is this run's share.
    assert report2["samples"] == lifetime
    assert report2["records_trained"] == second.valid_labelled
    assert report2["predicted_only"] == first.predicted_only + second.predicted_only
    both = Counter(r for r, _ in first.malformed) + Counter(r for r, _ in second.malformed)
    assert report2["dead_lettered"] == dict(sorted(both.items()))
    assert report2["next_offsets"] == ends
    assert report2["checkpoint_version"] > report1["checkpoint_version"]
    with open_store(checkpoint_url) as store:
        checkpoint = store.load_latest()
    assert checkpoint is not None
    assert (checkpoint.samples, checkpoint.offsets) == (lifetime, ends)
    assert group_offsets(kafka_bootstrap, group) == ends


def test_refuses_a_new_model_when_the_group_has_committed_offsets(
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., str],
    redis_prefix_url: Callable[..., str],
    tmp_path: Path,
) -> None:
    topic = kafka_topic_factory(PARTITIONS)
    group = f"{topic}-group"
    first = produce_mix(kafka_bootstrap, topic, 120)
    TrainerService(service_config(kafka_bootstrap, topic, redis_prefix_url("old"), group)).run()
    committed = group_offsets(kafka_bootstrap, group)
    assert committed == end_offsets(kafka_bootstrap, topic)
    assert first.valid_labelled > 0

    # The checkpoints are gone (another prefix: an empty store), the group's offsets are not.
    empty = redis_prefix_url("empty")
    batch_log = tmp_path / "batches.jsonl"
    batch_log.write_text('{"step": 1, "segments": []}\n')
    config = service_config(kafka_bootstrap, topic, empty, group, batch_log=str(batch_log))
    service = TrainerService(config)
    assert service.restored is None
    with pytest.raises(ConfigError, match=r"(?s)no checkpoint.*committed offsets.*--fresh-start"):
        service.run()
    # Refusing leaves everything as it was: no checkpoint, no commit, the batch log untouched.
    with open_store(empty) as store:
        assert store.latest_version() is None
    assert group_offsets(kafka_bootstrap, group) == committed
    assert batch_log.read_text() == '{"step": 1, "segments": []}\n'

    # fresh_start: a new model starts at the group's committed offsets (only the new records).
    later = produce_mix(kafka_bootstrap, topic, 60, start_id=5000)
    report = TrainerService(
        service_config(kafka_bootstrap, topic, empty, group, fresh_start=True)
    ).run()
    assert report["samples"] == report["records_trained"] == later.valid_labelled
    assert report["next_offsets"] == end_offsets(kafka_bootstrap, topic)
    assert group_offsets(kafka_bootstrap, group) == report["next_offsets"]


def test_predictions_out_carry_key_prediction_and_model_version(
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., str],
    redis_prefix_url: Callable[..., str],
) -> None:
    topic = kafka_topic_factory(PARTITIONS)
    produced = produce_mix(kafka_bootstrap, topic, 120)
    predictions_topic = f"{topic}.predictions"
    config = service_config(
        kafka_bootstrap,
        topic,
        redis_prefix_url(),
        f"{topic}-group",
        predictions_topic=predictions_topic,
    )
    report = TrainerService(config).run()
    assert report["samples"] == produced.valid_labelled

    # One prediction per accepted record (labelled or not), keyed like its source record.
    accepted = produced.valid_labelled + produced.predicted_only
    messages = read_topic(kafka_bootstrap, predictions_topic, accepted)
    assert len(messages) == accepted
    bodies = [json.loads(m.value) for m in messages]
    sources = {(b["source"]["partition"], b["source"]["offset"]) for b in bodies}
    assert len(sources) == accepted  # no record predicted twice
    keys = {m.key for m in messages}
    assert all(k is not None and k.startswith(b"k") for k in keys)
    steps = [b["model_version"]["step"] for b in bodies]
    assert min(steps) >= 1 and max(steps) == report["steps"]
    # Before the first learning step there is no model: no prediction, no probabilities.
    first = [b for b in bodies if b["model_version"]["step"] == 1]
    assert all(b["prediction"] is None for b in first)
    later = [b for b in bodies if b["model_version"]["step"] > 1]
    assert later and all(b["prediction"] in ("0", "1") for b in later)
    assert all(abs(sum(b["proba"].values()) - 1.0) < 1e-9 for b in later)
    # Versions name the checkpoint that was current when the prediction was made.
    versions = [b["model_version"]["checkpoint"] for b in later]
    assert any(v is not None for v in versions)
