"""The hostile-input suite: every kind of bad record in :mod:`tests.hostile_records`, interleaved
with valid records (the first batch of every partition included), through a real Kafka broker and
a real Redis.

For each run: the service keeps running to the end; trained + dead-lettered + predicted only ==
produced; the dead-letter topic holds exactly the rejected records with their reasons; every
checkpoint succeeds; memory and checkpoint size stay bounded; and the prequential accuracy on the
valid records is within half a point of a run over the valid records alone.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from typing import Any

import pytest

from consumers import dead_letter_topic
from stream_trainer.checkpoints import open_store
from stream_trainer.service import TrainerService, load_service_config
from tests.fixtures.kafka import create_topic, end_offsets, produce_messages, read_topic
from tests.hostile_records import CORPUS, TARGET, valid_value

pytestmark = pytest.mark.integration

N_VALID = 3_000
BIG = 6_000_000  # the source topic accepts the 3 MB record; the dead-letter topic keeps Kafka's


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


Message = tuple[int, bytes, "str | None"]  # (partition, value, the label of a valid record)


def _streams(partitions: int, seed: int) -> tuple[list[Message], list[Message]]:
    """``(mixed, valid_only)``: the same valid records on the same partitions in the same order,
    and in ``mixed`` every hostile record once: one at the head of each partition (the first
    batch), the rest at random places."""
    rng = random.Random(seed)
    valid: list[Message] = []
    for i in range(N_VALID):
        value = valid_value(rng)
        valid.append((i % partitions, json.dumps(value).encode(), str(value[TARGET])))
    hostile = list(CORPUS)
    rng.shuffle(hostile)
    heads, rest = hostile[:partitions], hostile[partitions:]
    slots = sorted(rng.sample(range(N_VALID), len(rest)))
    mixed: list[Message] = [(p, h.raw, None) for p, h in enumerate(heads)]
    at = dict(zip(slots, rest, strict=True))
    for i, message in enumerate(valid):
        if i in at:
            mixed.append((message[0], at[i].raw, None))
        mixed.append(message)
    return mixed, valid


def _valid_accuracy(
    bootstrap: str, topic: str, messages: list[Message], report: dict[str, Any]
) -> tuple[float, int]:
    """Accuracy of the served predictions (read back from the predictions topic) over the valid
    records that had one, and how many that was. Offsets are counted per partition from 0."""
    labels: dict[tuple[int, int], str] = {}
    next_offset: Counter[int] = Counter()
    for partition, _, label in messages:
        if label is not None:
            labels[(partition, next_offset[partition])] = label
        next_offset[partition] += 1
    hits = scored = 0
    accepted = report["records_trained"] + report["predicted_only"]  # one prediction each
    for m in read_topic(bootstrap, topic, accepted):
        body = json.loads(m.value)
        label = labels.get((body["source"]["partition"], body["source"]["offset"]))
        if label is not None and body["prediction"] is not None:
            scored += 1
            hits += body["prediction"] == label
    return hits / scored, scored


def _config(bootstrap: str, topic: str, checkpoint: str, max_batch: int) -> Any:
    flags: dict[str, Any] = {
        "source": f"kafka://{bootstrap}/{topic}",
        "group": f"{topic}-group",
        "checkpoint": checkpoint,
        "checkpoint_every_records": 200,
        "metrics_address": "off",
        "stop_at_end": True,
        "progress": False,
        "max_wait_ms": 50,
        "max_batch_records": max_batch,
        "predictions_topic": f"{topic}.predictions",
    }
    trainer = {"target": TARGET, "task": "classification", "hidden": (16,), "seed": 3}
    return load_service_config(flags=flags, trainer_flags=trainer, environ={})


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize(("partitions", "max_batch"), [(1, 1), (1, 64), (3, 64)])
def test_hostile_records_never_stop_the_service(
    kafka_bootstrap: str, redis_url: str, partitions: int, max_batch: int
) -> None:
    base = f"t-hostile-{partitions}-{max_batch}-{random.getrandbits(32):08x}"
    mixed, valid = _streams(partitions, seed=max_batch)
    topics = {"mixed": f"{base}-mixed", "valid": f"{base}-valid"}
    for name in topics.values():
        create_topic(kafka_bootstrap, name, partitions, {"max.message.bytes": str(BIG)})
    for kind, messages in (("mixed", mixed), ("valid", valid)):
        produce_messages(
            kafka_bootstrap,
            topics[kind],
            [(p, None, v) for p, v, _ in messages],
            max_request_size=BIG,
        )

    rss_before = _rss_bytes()
    reports: dict[str, dict[str, Any]] = {}
    for kind, topic in topics.items():
        url = f"{redis_url}?prefix={base}-{kind}"
        reports[kind] = TrainerService(_config(kafka_bootstrap, topic, url, max_batch)).run()
    rss_growth = _rss_bytes() - rss_before
    mixed_report, valid_report = reports["mixed"], reports["valid"]

    rejected = [h for h in CORPUS if h.outcome == "reject"]
    predicted = [h for h in CORPUS if h.outcome == "predict"]
    trained = [h for h in CORPUS if h.outcome == "train"]
    # Everything produced is accounted for, and the service read to the end.
    assert sum(end_offsets(kafka_bootstrap, topics["mixed"]).values()) == len(mixed)
    assert mixed_report["next_offsets"] == end_offsets(kafka_bootstrap, topics["mixed"])
    assert mixed_report["records_trained"] == N_VALID + len(trained)
    assert mixed_report["predicted_only"] == len(predicted)
    assert mixed_report["dead_lettered"] == dict(
        sorted(Counter(h.reason for h in rejected).items())
    )
    assert mixed_report["records_trained"] + mixed_report["predicted_only"] + mixed_report[
        "rejected_total"
    ] == len(mixed)
    # Checkpoints kept succeeding; the last one holds every partition's end offset.
    assert mixed_report["checkpoint_failures"] == 0
    assert mixed_report["final_checkpoint_ok"] is True
    with open_store(f"{redis_url}?prefix={base}-mixed") as store:
        infos = store.list_versions()
        latest = store.load_latest()
    assert latest is not None and latest.samples == N_VALID + len(trained)
    assert all(info.error is None for info in infos)
    # Bounded: the 10,000-key record and the long strings did not grow the model or the state.
    assert max(info.size_bytes for info in infos) < 400_000, [i.size_bytes for i in infos]
    assert rss_growth < 400 * 2**20, rss_growth

    # The dead-letter topic holds exactly the rejected records, each with its reason: byte for
    # byte, or, for a letter the topic could not take whole, cut down with the hash of the rest.
    letters = read_topic(kafka_bootstrap, dead_letter_topic(topics["mixed"]), len(rejected))
    assert len(letters) == len(rejected)
    got = Counter()
    for m in letters:
        headers = {k: v.decode() for k, v in m.headers}
        sha = json.loads(m.value)["sha256"] if headers.get("x-cut-down") else _sha(m.value)
        got[(headers["x-reason"], sha)] += 1
        assert headers["x-detail"]
    assert got == Counter((h.reason, _sha(h.raw)) for h in rejected)

    # Learning is intact: the valid records score as they do alone (the predictions served for
    # them, read back from the predictions topic).
    mixed_accuracy, mixed_scored = _valid_accuracy(
        kafka_bootstrap, f"{topics['mixed']}.predictions", mixed, mixed_report
    )
    valid_accuracy, valid_scored = _valid_accuracy(
        kafka_bootstrap, f"{topics['valid']}.predictions", valid, valid_report
    )
    assert mixed_scored >= N_VALID - max_batch * partitions and valid_scored >= mixed_scored - 64
    print(f"valid records: {mixed_accuracy:.4f} among hostile ones, {valid_accuracy:.4f} alone")
    # One partition: both runs see the valid records in the same order, in batches cut the same
    # way but for the hostile records: half a point. Several: which partitions' records share a
    # batch depends on timing, which moves the accuracy of a run by about that much on its own.
    tolerance = 0.005 if partitions == 1 else 0.01
    assert abs(mixed_accuracy - valid_accuracy) <= tolerance, (mixed_accuracy, valid_accuracy)
    assert valid_accuracy > 0.85
    assert valid_report["records_trained"] == N_VALID and valid_report["rejected_total"] == 0
