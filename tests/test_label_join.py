"""Delayed labels in the service: the join (pending rows, early labels, expiry, hostile ids and
labels), its checkpointed state and its validation, and the service over a file whose labels come
as later records."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from stream_trainer.checkpoints import CheckpointInvalidError, open_store
from stream_trainer.errors import ConfigError
from stream_trainer.records import Record, RejectReason
from stream_trainer.service import TrainerService, load_service_config
from stream_trainer.service.label_join import LabelJoin, validate_label_state
from stream_trainer.service.restore import restore_checkpoint
from stream_trainer.training import IncrementalTrainer, TrainerConfig


def rec(
    value: dict[str, Any], *, topic: str = "f", offset: int = 0, ts: int | None = None
) -> Record:
    return Record(value, topic=topic, partition=0, offset=offset, timestamp_ms=ts)


def served_step(
    join: LabelJoin, trainer: IncrementalTrainer, records: list[Record]
) -> tuple[Any, list[Any]]:
    """Split, predict and hold, as the service does; returns the split batch and the ids whose
    label was waiting."""
    split = join.split(records)
    ready: list[Any] = []
    if split.features:
        report = trainer.step(split.features)
        served = [
            None if report.proba is None else report.proba[i] for i in range(len(report.accepted))
        ]
        _, ready = join.hold(report.accepted, split.ids, report.inputs, served)
    return split, ready


def trainer() -> IncrementalTrainer:
    return IncrementalTrainer(TrainerConfig(target="y", task="classification", hidden=(4,), seed=0))


# ---------------------------------------------------------------------------------- the join


def test_a_label_joins_its_row_and_is_learned_once_with_the_features_it_was_served_on() -> None:
    join, t = LabelJoin("id", "y"), trainer()
    split, _ = served_step(join, t, [rec({"id": 1, "x": 0.5}), rec({"id": "b", "x": -1.0})])
    assert split.rejected == [] and set(join.pending) == {1, "b"}
    assert t.samples_trained == 0 and t.predicted_only == 2
    row = join.pending[1].x.copy()
    split = join.split([rec({"id": 1, "y": 1}), rec({"id": 1, "y": 0})])
    joined, rejected = join.join(split.labels)
    assert joined.ids == [1]
    np.testing.assert_array_equal(joined.inputs()[0], row)
    # the second label for id 1 waits (its row is taken); it is refused once id 1 is learned
    report, problems = t.learn_delayed(joined.inputs(), [1], joined.served())
    assert problems == {} and report.trained == 1 and t.samples_trained == 1
    refused, retry = join.settle(joined, problems)
    assert [(r.reason, r.value) for r in refused] == [
        (RejectReason.DUPLICATE_ID, {"id": 1, "y": 0})
    ]
    assert retry == [] and join.early == {}
    assert join.learned == 1 and 1 in join.recent and set(join.pending) == {"b"}
    again, rejected = join.join(join.split([rec({"id": 1, "y": 1})]).labels)
    assert again.ids == [] and [r.reason for r in rejected] == [RejectReason.DUPLICATE_ID]


def test_a_label_read_before_its_features_waits_for_them() -> None:
    join, t = LabelJoin("id", "y", labels_topic="labels"), trainer()
    split = join.split([rec({"id": 7, "y": "cat"}, topic="labels")])
    joined, _ = join.join(split.labels)
    assert joined.ids == [] and list(join.early) == [7]
    _, ready = served_step(join, t, [rec({"id": 7, "x": 2.0})])
    assert ready == [7]
    joined, _ = join.join([], ready)
    assert joined.ids == [7] and [r.value["y"] for r in joined.labels] == ["cat"]
    assert join.early == {} and join.pending == {}


def test_hostile_ids_and_labels_are_rejected_with_a_reason_and_never_crash() -> None:
    join, t = LabelJoin("id", "y"), trainer()
    bad = [{"id": True, "x": 1.0}, {"id": 1.5, "x": 1.0}, {"id": "", "x": 1.0},
           {"id": "z" * 257, "x": 1.0}, {"id": 1 << 70, "x": 1.0}]  # fmt: skip
    split, _ = served_step(
        join, t, [rec(v) for v in [*bad, {"id": 3, "x": 1.0}, {"id": 3, "x": 2.0}]]
    )
    assert [r.reason for r in split.rejected] == [RejectReason.BAD_ID] * 5 + [
        RejectReason.DUPLICATE_ID
    ]
    assert list(join.pending) == [3]
    # a label with a bad target is refused by the trainer; its row waits for a good one
    split = join.split([rec({"id": 3, "y": 2.5}), rec({"id": [1], "y": 1})])
    assert [r.reason for r in split.rejected] == [RejectReason.BAD_ID]
    joined, _ = join.join(split.labels)
    assert joined.ids == [3]
    _, problems = t.learn_delayed(joined.inputs(), [2.5], joined.served())
    rejected, retry = join.settle(joined, problems)
    assert [r.reason for r in rejected] == [RejectReason.BAD_LABEL] and retry == []
    assert list(join.pending) == [3] and t.samples_trained == 0
    assert join.unmatched == Counter({"bad_id": 1, "bad_label": 1})
    joined, _ = join.join(join.split([rec({"id": 3, "y": 1})]).labels)
    assert joined.ids == [3]


def test_a_label_that_would_wait_is_checked_first_and_a_refused_one_holds_no_place() -> None:
    def check(label: Any) -> tuple[RejectReason, str] | None:
        return (RejectReason.BAD_LABEL, "not an integer") if isinstance(label, float) else None

    join = LabelJoin("id", "y", labels_topic="labels", check_label=check)
    split = join.split(
        [rec({"id": 1, "y": 0.5}, topic="labels"), rec({"id": 1}, topic="labels"),
         rec({"id": 1, "y": 1}, topic="labels")]
    )  # fmt: skip
    assert [r.reason for r in split.rejected] == [RejectReason.BAD_LABEL]  # missing
    joined, rejected = join.join(split.labels)
    assert [r.reason for r in rejected] == [RejectReason.BAD_LABEL]  # 0.5, refused by the check
    assert joined.ids == [] and list(join.early) == [1] and join.early[1].record.value["y"] == 1
    assert join.unmatched == Counter({"bad_label": 2})


def test_rows_expire_by_the_labels_time_and_the_bound_evicts_the_oldest() -> None:
    join = LabelJoin("id", "y", labels_topic="labels", max_pending=3, timeout_seconds=10)
    t = trainer()
    served_step(join, t, [rec({"id": i, "x": float(i)}, ts=1000 * i) for i in range(4)])
    assert list(join.pending) == [1, 2, 3] and join.expired == 1  # the bound
    # features far ahead do not expire rows: only the labels' progress does
    served_step(join, t, [rec({"id": 9, "x": 0.0}, ts=100_000)])
    assert join.expire() == (0, 0)
    assert list(join.pending) == [2, 3, 9] and join.expired == 2
    split = join.split([rec({"id": 50, "y": 1}, topic="labels", ts=12_500)])
    assert join.expire() == (1, 0)  # 2 s + 10 s < 12.5 s; 3 s + 10 s is not
    assert list(join.pending) == [3, 9] and join.expired == 3
    # a label waiting for features expires by the features' time (100 s here)
    join.join(split.labels)
    assert list(join.early) == [50]
    assert join.expire() == (0, 1) and join.unmatched["unknown_id"] == 1 and join.early == {}


def test_a_partition_read_ahead_does_not_move_the_watermark() -> None:
    join = LabelJoin("id", "y", labels_topic="labels", timeout_seconds=10)
    ahead = Record({"id": "a", "y": 1}, topic="labels", partition=0, timestamp_ms=100_000)
    behind = Record({"id": "b", "y": 1}, topic="labels", partition=1, timestamp_ms=5_000)
    join.split([ahead, behind])
    assert join.watermark("labels") == 5.0 and join.watermark("features") == -math.inf
    join.split([Record({"id": "c", "y": 1}, topic="labels", partition=1, timestamp_ms=200_000)])
    assert join.watermark("labels") == 100.0


# ---------------------------------------------------------------------------------- state


def _filled() -> LabelJoin:
    join, t = LabelJoin("id", "y", labels_topic="labels"), trainer()
    served_step(join, t, [rec({"id": i, "x": float(i), "y": i % 2}) for i in range(4)])  # a model
    served_step(join, t, [rec({"id": f"k{i}", "x": float(i), f"c{i}": 1.0}) for i in range(3)])
    join.join(join.split([rec({"id": "early", "y": 1}, topic="labels", offset=4)]).labels)
    return join


def test_the_state_round_trips_through_json_and_tensors() -> None:
    join = _filled()
    state = json.loads(json.dumps(join.state_json()))
    restored = LabelJoin("id", "y", labels_topic="labels")
    assert restored.load(join.state_tensors(), state) == 0
    assert list(restored.pending) == list(join.pending) == ["k0", "k1", "k2"]
    for k, row in join.pending.items():
        np.testing.assert_array_equal(restored.pending[k].x[: row.x.shape[0]], row.x)
        assert restored.pending[k].served is not None and row.served is not None
        np.testing.assert_array_equal(restored.pending[k].served, row.served)
    assert restored.early["early"].record.offset == 4
    assert restored.state_json() == state
    smaller = LabelJoin("id", "y", labels_topic="labels", max_pending=1)
    assert smaller.load(join.state_tensors(), state) == 2 and smaller.expired == 2


@pytest.mark.parametrize(
    "damage",
    [
        lambda s, t: s.update(version=2),
        lambda s, t: s["ids"].append("extra"),
        lambda s, t: s.update(ids=["k0", "k0", "k2"]),
        lambda s, t: s["times"].__setitem__(0, "soon"),
        lambda s, t: s["early"].append([True, 1, 0.0, None, None, None]),
        lambda s, t: s.update(expired=-1),
        lambda s, t: s.update(latest={"features": {}}),
        lambda s, t: s["latest"]["labels"].update({"labels:0": None}),
        lambda s, t: t.__setitem__("pending.x", torch.full((3, 2), math.nan)),
        lambda s, t: t.__setitem__("pending.served", torch.zeros(2, 2)),
        lambda s, t: t.__setitem__("pending.served_width", torch.tensor([5, 0, 0])),
        lambda s, t: t.pop("pending.served"),
    ],
)
def test_a_damaged_state_is_rejected_before_use(damage: Any) -> None:
    join = _filled()
    state, tensors = json.loads(json.dumps(join.state_json())), join.state_tensors()
    damage(state, tensors)
    with pytest.raises(CheckpointInvalidError):
        validate_label_state(tensors, state)


# ---------------------------------------------------------------------------------- the service


def _stream(n: int, seed: int, *, lost: float = 0.0) -> tuple[list[dict[str, Any]], set[int]]:
    """``n`` feature records with ids, each label a later record, 0 to 40 records late; a share
    ``lost`` of the labels never comes."""
    rng = random.Random(seed)
    lines: list[dict[str, Any]] = []
    due: list[tuple[int, dict[str, Any]]] = []
    labelled: set[int] = set()
    for i in range(n):
        x1, x2 = rng.gauss(0, 1), rng.gauss(0, 1)
        lines.append({"id": i, "x1": x1, "x2": x2})
        if rng.random() >= lost:
            labelled.add(i)
            due.append((i + rng.randint(0, 40), {"id": i, "label": int(x1 + x2 > 0)}))
            due.sort(key=lambda d: d[0])
        while due and due[0][0] <= i:
            lines.append(due.pop(0)[1])
    lines.extend(d for _, d in due)
    return lines, labelled


def _write(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(v) + "\n" for v in lines))


def _service(
    tmp_path: Path, source: Path, registry: CollectorRegistry | None = None, **flags: Any
) -> TrainerService:
    config = load_service_config(
        flags={
            "source": str(source),
            "labels_source": "source",
            "checkpoint": f"file://{tmp_path / 'ck'}",
            "metrics_address": "off",
            "progress": False,
            "batch_log": str(tmp_path / "batches.jsonl"),
            "dead_letter": str(tmp_path / "dead.jsonl"),
            **flags,
        },
        trainer_flags={"target": "label", "task": "classification", "hidden": (8,), "seed": 1},
        environ={},
    )
    return TrainerService(config, registry=registry)


def _learned(batch_log: Path) -> Counter[Any]:
    return Counter(
        k
        for line in batch_log.read_text().splitlines()
        for k in json.loads(line).get("learned", [])
    )


def test_the_service_learns_each_label_once_across_a_restart_and_scores_what_it_served(
    tmp_path: Path,
) -> None:
    lines, labelled = _stream(1500, seed=3, lost=0.1)
    source = tmp_path / "stream.jsonl"
    cut = len(lines) // 2
    _write(source, lines[:cut])
    registry = CollectorRegistry()
    first = _service(tmp_path, source, registry).run()
    pending_at_cut = first["delayed_labels"]["pending"]
    assert pending_at_cut > 0
    _write(source, lines)  # the rest arrives; the restarted service resumes at its offsets
    restarted = _service(tmp_path, source)
    assert restarted.label_join is not None and len(restarted.label_join.pending) == pending_at_cut
    report = restarted.run()

    learned = _learned(tmp_path / "batches.jsonl")
    assert set(learned) == labelled and set(learned.values()) == {1}
    assert report["samples"] == len(labelled)
    delayed = report["delayed_labels"]
    assert delayed["learned"] == len(labelled) and delayed["expired"] == 0
    assert delayed["pending"] == 1500 - len(labelled)  # never labelled: still waiting
    assert report["accuracy"] > 0.85  # the served predictions, scored when the labels came
    labels = {"run": "default", "model": "mlp", "norm": "ema_batch"}
    pending_gauge = registry.get_sample_value("stream_trainer_labels_pending_records", labels)
    assert pending_gauge == pending_at_cut
    delays = registry.get_sample_value("stream_trainer_label_delay_seconds_count", labels)
    assert delays == first["delayed_labels"]["learned"]


def test_labels_read_before_their_features_are_learned_when_the_features_come(
    tmp_path: Path,
) -> None:
    lines, labelled = _stream(300, seed=9)
    labels = [v for v in lines if "label" in v]
    features = [v for v in lines if "label" not in v]
    source = tmp_path / "stream.jsonl"
    _write(source, labels + features)  # every label first: each batch of features joins many
    registry = CollectorRegistry()
    report = _service(tmp_path, source, registry, batch_sizes="64").run()
    assert report["samples"] == len(labelled) == report["delayed_labels"]["learned"]
    assert report["delayed_labels"]["waiting_labels"] == 0
    labels_of = {"run": "default", "model": "mlp", "norm": "ema_batch"}
    trained = registry.get_sample_value("stream_trainer_records_trained_total", labels_of)
    assert trained == len(labelled)
    predicted = registry.get_sample_value("stream_trainer_records_predicted_only_total", labels_of)
    assert predicted == 300


def test_a_refused_label_followed_by_a_good_one_in_the_same_batch_learns_the_good_one(
    tmp_path: Path,
) -> None:
    rng = random.Random(4)
    features = [{"id": i, "x1": rng.gauss(0, 1), "x2": rng.gauss(0, 1)} for i in range(40)]
    labels: list[dict[str, Any]] = []
    for v in features:
        good = {"id": v["id"], "label": int(v["x1"] > 0)}
        labels += [{"id": v["id"], "label": 1.5}, good] if v["id"] % 4 == 0 else [good]
    source = tmp_path / "stream.jsonl"
    _write(source, features + labels)
    report = _service(tmp_path, source, batch_sizes="64").run()
    assert report["samples"] == 40 and report["delayed_labels"]["pending"] == 0
    assert report["delayed_labels"]["unmatched"] == {"bad_label": 10}
    assert report["dead_lettered"] == {"bad_label": 10}
    assert sorted(_learned(tmp_path / "batches.jsonl")) == list(range(40))


def test_a_label_twice_in_one_batch_is_learned_once_and_the_repeat_refused(tmp_path: Path) -> None:
    features = [{"id": i, "x1": float(i % 3), "x2": 1.0} for i in range(20)]
    labels = [{"id": i, "label": i % 2} for i in range(20) for _ in range(1 + (i < 5))]
    source = tmp_path / "stream.jsonl"
    _write(source, features + labels)
    report = _service(tmp_path, source, batch_sizes="64").run()
    assert report["samples"] == 20
    delayed = report["delayed_labels"]
    assert delayed["unmatched"] == {"duplicate_id": 5} and delayed["waiting_labels"] == 0
    assert report["dead_lettered"] == {"duplicate_id": 5}


def test_hostile_labels_on_the_source_are_dead_lettered_and_counted(tmp_path: Path) -> None:
    lines, labelled = _stream(200, seed=5)
    hostile = [
        {"id": 10_000, "label": 1},  # unknown id: waits, never matched
        {"id": 3, "label": 1},  # duplicate of a label already learned (id 3 is early)
        {"id": {"a": 1}, "label": 1},  # not a scalar
        {"id": 1.5, "label": 0},  # bad id
        {"id": 5, "x1": 0.1, "x2": 0.2},  # features with an id already learned
    ]
    source = tmp_path / "stream.jsonl"
    _write(source, lines + hostile)
    report = _service(tmp_path, source).run()
    assert report["samples"] == len(labelled)
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert Counter(d["reason"] for d in dead) == Counter({"duplicate_id": 2, "bad_id": 2})
    delayed = report["delayed_labels"]
    assert delayed["waiting_labels"] == 1
    assert delayed["unmatched"] == {"bad_id": 2, "duplicate_id": 1}


def test_a_checkpoint_with_pending_records_needs_delayed_labels_and_verifies(
    tmp_path: Path,
) -> None:
    lines, _ = _stream(100, seed=7, lost=0.5)
    source = tmp_path / "stream.jsonl"
    _write(source, lines)
    _service(tmp_path, source).run()
    with open_store(f"file://{tmp_path / 'ck'}") as store:
        checkpoint = store.load_latest()
    assert checkpoint is not None and checkpoint.state["service"]["labels"]["ids"]
    restore_checkpoint(checkpoint)  # `checkpoints verify` accepts it
    checkpoint.tensors["pending.x"] = checkpoint.tensors["pending.x"][:1]
    with pytest.raises(CheckpointInvalidError):
        restore_checkpoint(checkpoint)
    with pytest.raises(ConfigError, match="waiting for delayed labels"):
        _service(tmp_path, source, labels_source="inline")


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ({"labels_source": "somewhere"}, "labels_source is"),
        ({"labels_source": "kafka://h:1/labels"}, "needs a kafka:// source"),
        (
            {"source": "kafka://h:1/feats", "labels_source": "kafka://other:1/labels"},
            "another topic on the source's brokers",
        ),
        ({"source": "kafka://h:1/feats", "labels_source": "kafka://h:1/feats"}, "another topic"),
        ({"max_pending": 0}, "max_pending"),
        ({"label_timeout_seconds": 0}, "label_timeout_seconds"),
    ],
)
def test_delayed_label_settings_are_checked_up_front(flags: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_service_config(flags=flags, environ={})


def test_delayed_label_settings_come_from_the_environment() -> None:
    config = load_service_config(
        environ={
            "STREAM_TRAINER_LABELS_SOURCE": "source",
            "STREAM_TRAINER_ID_FIELD": "order_id",
            "STREAM_TRAINER_MAX_PENDING": "10",
            "STREAM_TRAINER_LABEL_TIMEOUT_SECONDS": "2.5",
        }
    )
    assert (config.labels_source, config.id_field, config.max_pending) == ("source", "order_id", 10)
    assert config.label_timeout_seconds == 2.5 and config.delayed_labels
