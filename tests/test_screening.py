"""The screening contract (IncrementalTrainer.screen): every limit, every reason, and the cases
that used to crash the step or the next checkpoint."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from consumers.deserializer import RecordDecoder
from stream_trainer.errors import ConfigError
from stream_trainer.records import (
    DEFAULT_MAX_ABS_VALUE,
    MAX_JSON_DEPTH,
    Record,
    RejectedRecord,
    RejectReason,
    decode_json_record,
    json_depth_exceeds,
)
from stream_trainer.sources import open_source
from stream_trainer.telemetry import ServiceMetrics
from stream_trainer.training import IncrementalTrainer, TrainerConfig
from stream_trainer.training.config import SCREENING_SETTINGS

ROOT = Path(__file__).resolve().parents[1]


def _trainer(**kw: Any) -> IncrementalTrainer:
    return IncrementalTrainer(TrainerConfig(target="y", hidden=(8,), seed=0, **kw))


def _reasons(report: Any) -> list[str]:
    return [r.reason.value for r in report.rejected]


def _json_stable(trainer: IncrementalTrainer) -> None:
    """What a checkpoint needs of the state: strict JSON (no NaN/inf) that reads back equal."""
    state = trainer.state_json()
    text = json.dumps(state, allow_nan=False)
    assert json.loads(text) == state


def _counters_aside(state: dict[str, Any]) -> dict[str, Any]:
    """The state without the counters a rejected batch moves (rejections by reason, steps)."""
    return {k: v for k, v in state.items() if k not in ("rejected", "steps")}


# ------------------------------------------------------------------ magnitude


@pytest.mark.parametrize(
    "value", [2**600, -(2**600), 1e200, -1e101, 10**101, DEFAULT_MAX_ABS_VALUE * 1.0000001]
)
def test_a_number_beyond_max_abs_value_is_out_of_range(value: int | float) -> None:
    trainer = _trainer()
    trainer.step([Record({"x": float(i), "y": i % 2}) for i in range(4)])
    report = trainer.step([Record({"x": value, "y": 1}), Record({"x": 1.0, "y": 0})])
    assert _reasons(report) == ["out_of_range"]
    assert report.trained == 1
    assert "beyond +-1e+100" in report.rejected[0].detail
    _json_stable(trainer)


def test_huge_values_used_to_overflow_the_variance_and_now_never_reach_it() -> None:
    """Two values of 1e154 give a squared deviation past float64: the running m2 would be inf
    and every later checkpoint would fail as 'not JSON'. Rejected, the state stays finite."""
    trainer = _trainer()
    report = trainer.step([Record({"x": 1e154, "y": 0}), Record({"x": -1e154, "y": 1})])
    assert _reasons(report) == ["out_of_range", "out_of_range"]
    report = trainer.step([Record({"x": 1e99, "y": 0}), Record({"x": -1e99, "y": 1})] * 3)
    assert report.trained == 6
    _json_stable(trainer)


def test_nanosecond_timestamps_are_ordinary_numbers() -> None:
    trainer = _trainer()
    base = 1_733_600_000_000_000_000  # ~1.7e18 ns since the epoch
    records = [Record({"ts": base + i * 10**9, "x": float(i % 3), "y": i % 2}) for i in range(16)]
    report = trainer.step(records)
    assert report.rejected == [] and report.trained == 16
    _json_stable(trainer)


def test_regression_target_beyond_the_limit_is_out_of_range() -> None:
    trainer = _trainer(task="regression")
    report = trainer.step(
        [Record({"x": 1.0, "y": 2.5}), Record({"x": 2.0, "y": 1e200}), Record({"x": 0, "y": -3.5})]
    )
    assert _reasons(report) == ["out_of_range"]
    assert "regression target is 1e+200" in report.rejected[0].detail
    assert report.trained == 2
    _json_stable(trainer)


def test_max_abs_value_is_a_setting() -> None:
    trainer = _trainer(max_abs_value=1000.0)
    report = trainer.step([Record({"x": 1000, "y": 0}), Record({"x": -1000.5, "y": 1})])
    assert _reasons(report) == ["out_of_range"]


# ------------------------------------------------------------------ kinds over the batch


@pytest.mark.parametrize(
    "values",
    [
        [1.0, "a"],  # used to raise: could not convert string to float
        ["a", 1.0],  # used to store the int 1 as a category key: not JSON-stable
        ["a", 2, "b"],
        [3, "a", 4.5],
    ],
)
def test_a_new_feature_of_two_kinds_in_one_batch_is_decided_by_majority(values: list[Any]) -> None:
    trainer = _trainer()
    records = [Record({"f": v, "x": float(i), "y": i % 2}) for i, v in enumerate(values)]
    report = trainer.step(records)
    n_str = sum(isinstance(v, str) for v in values)
    kind = "cat" if n_str > len(values) - n_str else "num"
    assert trainer.encoder.kinds["f"] == kind
    assert _reasons(report) == ["wrong_type"] * min(n_str, len(values) - n_str)
    assert report.trained == len(values) - len(report.rejected)
    assert "in this batch" in report.rejected[0].detail
    _json_stable(trainer)
    restored = IncrementalTrainer.from_state(trainer.state_tensors(), trainer.state_json())
    probe = [Record({"f": 1.0 if kind == "num" else "a", "x": 0.5})]
    assert restored.predict_many(probe) == trainer.predict_many(probe)


def test_one_stray_word_in_a_numeric_column_does_not_turn_it_categorical() -> None:
    trainer = _trainer()
    values: list[Any] = [1.0, 2.0, "oops", 4.0]
    report = trainer.step([Record({"a": v, "y": i % 2}) for i, v in enumerate(values)])
    assert trainer.encoder.kinds == {"a": "num"}
    assert _reasons(report) == ["wrong_type"] and report.rejected[0].value == {"a": "oops", "y": 0}
    report = trainer.step([Record({"a": "later", "y": 1}), Record({"a": 5.0, "y": 1})])
    assert _reasons(report) == ["wrong_type"]  # the kind stays, decided


def test_a_tie_is_numeric() -> None:
    trainer = _trainer()
    trainer.step([Record({"a": "x", "y": 0}), Record({"a": 1, "y": 1})])
    assert trainer.encoder.kinds == {"a": "num"}


def test_a_field_name_that_is_not_a_string_is_rejected() -> None:
    """A record built in Python may have an int key; JSON would turn it into "1" and the state
    would not read back equal."""
    trainer = _trainer()
    report = trainer.step([Record({1: 2.0, "y": 0}), Record({"x": 2.0, "y": 1})])  # type: ignore[dict-item]
    assert _reasons(report) == ["wrong_type"] and "field name 1" in report.rejected[0].detail
    _json_stable(trainer)


def test_lone_surrogates_and_odd_unicode_survive_the_checkpoint() -> None:
    trainer = _trainer()
    odd = ["\ud800", "e\u0301", "\u00e9", "\x00", "\U0001f600", "\ufeff"]
    records = [Record({f"k{s}": s, "x": float(i), "y": s}) for i, s in enumerate(odd)]
    report = trainer.step(records)
    assert report.rejected == [] and report.trained == len(odd)
    _json_stable(trainer)
    restored = IncrementalTrainer.from_state(trainer.state_tensors(), trainer.state_json())
    assert restored.classes == trainer.classes


# ------------------------------------------------------------------ sizes and growth


def test_strings_names_and_class_labels_longer_than_the_limit_are_too_large() -> None:
    trainer = _trainer(max_string_length=10)
    report = trainer.step(
        [
            Record({"x": "a" * 11, "y": 0}),
            Record({"n" * 11: 1.0, "y": 0}),
            Record({"x": "short", "y": "c" * 11}),
            Record({"x": "a" * 10, "y": "c" * 10}),
        ]
    )
    assert _reasons(report) == ["too_large", "too_large", "too_large"]
    assert report.trained == 1


def test_a_record_with_too_many_new_features_is_rejected_whole() -> None:
    trainer = _trainer(max_new_features_per_record=5)
    wide = {f"f{i}": float(i) for i in range(6)}
    report = trainer.step([Record({**wide, "y": 0}), Record({"f0": 1.0, "f1": 2.0, "y": 1})])
    assert _reasons(report) == ["too_many_new_features"]
    assert trainer.encoder.n_columns == 2


def test_thirty_records_of_ten_thousand_new_keys_stop_at_max_features() -> None:
    trainer = _trainer(max_new_features_per_record=10_000, max_features=25_000)
    trained = rejected = 0
    for r in range(30):
        value: dict[str, Any] = {f"r{r}k{i}": float(i % 7) for i in range(10_000)}
        report = trainer.step([Record({**value, "y": r % 2})])
        trained += report.trained
        rejected += len(report.rejected)
    assert trainer.model is not None
    assert trainer.encoder.n_columns == trainer.model.in_features == 20_000
    assert (trained, rejected) == (2, 28)
    assert dict(trainer.rejected) == {"too_many_features": 28}
    # The defaults reject each of them on its own: 10,000 new features in one record.
    default = _trainer()
    report = default.step([Record({**{f"k{i}": 1.0 for i in range(10_000)}, "y": 0})])
    assert _reasons(report) == ["too_many_new_features"] and default.encoder.n_columns == 0


def test_max_features_counts_categories_and_drops_new_categories_once_full() -> None:
    trainer = _trainer(max_features=3)
    report = trainer.step(
        [
            Record({"c": "a", "x": 1.0, "y": 0}),  # 2 columns
            Record({"c": "b", "x": 2.0, "y": 1}),  # 3 columns
            Record({"c": "d", "x": 2.0, "y": 1}),  # a new category, no room: no column
            Record({"z": 1.0, "x": 2.0, "y": 1}),  # a new feature, no room: rejected
        ]
    )
    assert _reasons(report) == ["too_many_features"]
    assert trainer.encoder.n_columns == 3
    assert trainer.encoder.categories == {"c": {"a": 0, "b": 2}}
    _json_stable(trainer)


def test_three_thousand_labels_stop_at_max_classes() -> None:
    trainer = _trainer()
    report = trainer.step([Record({"x": float(i % 5), "y": f"label{i}"}) for i in range(3000)])
    assert len(trainer.classes) == 1000
    assert trainer.model is not None and trainer.model.out_features == 1000
    assert report.trained == 1000 and _reasons(report) == ["too_many_classes"] * 2000
    report = trainer.step([Record({"x": 1.0, "y": "label5"}), Record({"x": 1.0, "y": "new"})])
    assert report.trained == 1 and _reasons(report) == ["too_many_classes"]


def test_the_task_is_inferred_from_an_accepted_record_only() -> None:
    """A rejected first record does not decide the task (rejected records change nothing)."""
    trainer = _trainer()
    trainer.step([Record({"x": "a" * 2000, "y": 0.5})])
    assert trainer.task is None
    trainer.step([Record({"x": 1.0, "y": 1}), Record({"x": 2.0, "y": 0.5})])
    assert trainer.task == "classification" and trainer.classes == ["1"]


def test_a_batch_of_only_rejected_records_changes_nothing_but_the_counters() -> None:
    trainer = _trainer(max_classes=2, max_new_features_per_record=3)
    trainer.step([Record({"x": float(i), "c": "a", "y": i % 2}) for i in range(8)])
    before = trainer.state_json()
    tensors = {k: v.clone() for k, v in trainer.state_tensors().items()}
    bad = [
        Record({"x": 2**600, "y": 0}),
        Record({"x": "oops", "y": 0}),
        Record({"c": 1.5, "y": 0}),
        Record({"x": 1.0, "y": 2}),
        Record({"a": 1.0, "b": 2.0, "d": 3.0, "e": 4.0, "y": 0}),
        Record({"x": [1], "y": 0}),
        Record({"y": 1}),
        Record({"x": 1.0, "y": [1]}),
    ]
    report = trainer.step(bad)
    assert sorted(_reasons(report)) == sorted(
        [
            "out_of_range",
            "wrong_type",
            "wrong_type",
            "too_many_classes",
            "too_many_new_features",
            "wrong_type",
            "no_features",
            "bad_label",
        ]
    )
    after = trainer.state_json()
    assert _counters_aside(after) == _counters_aside(before)
    for name, tensor in trainer.state_tensors().items():
        assert tensor.equal(tensors[name]), name


@pytest.mark.parametrize("name", SCREENING_SETTINGS)
def test_each_limit_is_validated_up_front_quoting_the_value(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be .*got -1"):
        TrainerConfig(target="y", **{name: -1})
    with pytest.raises(ValueError, match="got 1e\\+200"):
        TrainerConfig(target="y", max_abs_value=1e200)


def test_limits_are_not_in_the_fingerprint_and_a_restored_trainer_adopts_the_configured_ones() -> (
    None
):
    config = TrainerConfig(target="y", hidden=(8,))
    wider = TrainerConfig(target="y", hidden=(8,), max_features=50, max_classes=3)
    assert config.fingerprint() == wider.fingerprint()
    trainer = IncrementalTrainer(config)
    trainer.step([Record({"x": 1.0, "y": 0})])
    restored = IncrementalTrainer.from_state(trainer.state_tensors(), trainer.state_json())
    restored.adopt_limits(wider)
    assert restored.config.max_features == restored.encoder.max_features == 50
    assert restored.config.max_classes == 3
    report = restored.step([Record({"x": 1.0, "y": c}) for c in ("a", "b", "c")])
    assert _reasons(report) == ["too_many_classes"]


# ------------------------------------------------------------------ decoding


def test_a_value_nested_200000_deep_is_rejected_cheaply_without_recursion_error() -> None:
    for raw in (b"[" * 200_000 + b"]" * 200_000, b'{"x": ' + b"[" * 200_000, b"{" * 200_000):
        start = time.perf_counter()
        assert decode_json_record(raw) == (
            RejectReason.TOO_DEEP,
            f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
        )
        item = RecordDecoder(target="y").decode(raw, topic="t", partition=0, offset=1)
        assert isinstance(item, RejectedRecord) and item.reason == RejectReason.TOO_DEEP
        assert item.value is None  # nothing nested travels on (frames, dead letters)
        assert time.perf_counter() - start < 0.5


def test_depth_counts_brackets_outside_strings_only() -> None:
    at_limit = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert not json_depth_exceeds(at_limit, MAX_JSON_DEPTH)
    assert json_depth_exceeds(b"[" + at_limit + b"]", MAX_JSON_DEPTH)
    in_string = json.dumps({"x": "[{" * 1000 + '\\"[', "y": 1}).encode()
    assert not json_depth_exceeds(in_string, MAX_JSON_DEPTH)
    assert decode_json_record(in_string) == json.loads(in_string)
    shallow_many = b'{"x": [' + b",".join([b"[]"] * 1000) + b"]}"
    assert not json_depth_exceeds(shallow_many, 3) and json_depth_exceeds(shallow_many, 2)
    item = RecordDecoder(target="y").decode(shallow_many)
    assert isinstance(item, RejectedRecord) and item.reason == RejectReason.WRONG_TYPE


# ------------------------------------------------------------------ metrics


def test_each_new_reason_is_a_label_of_the_dead_letter_counter() -> None:
    registry = CollectorRegistry()
    metrics = ServiceMetrics(
        registry, run="r", model="mlp", norm="ema_batch", task="classification"
    )
    labels = {"run": "r", "model": "mlp", "norm": "ema_batch"}
    for i, reason in enumerate(
        [
            "out_of_range",
            "too_deep",
            "too_many_new_features",
            "too_many_features",
            "too_many_classes",
        ]
    ):
        metrics.dead_lettered(reason, i + 1)
        value = registry.get_sample_value(
            "stream_trainer_records_dead_lettered_total", {**labels, "reason": reason}
        )
        assert value == i + 1
    metrics.set_records_since_last_label(7)
    assert registry.get_sample_value("stream_trainer_records_since_last_label", labels) == 7


def test_records_since_last_label_follows_arrival_order() -> None:
    trainer = _trainer()
    trainer.step([Record({"x": 1.0}), Record({"x": 2.0})])
    assert trainer.records_since_label == 2
    trainer.step([Record({"x": 1.0}), Record({"x": 1.0, "y": 1}), Record({"x": 3.0})])
    assert trainer.records_since_label == 1
    trainer.step([Record({"x": 1.0, "y": 0})])
    assert trainer.records_since_label == 0


# ------------------------------------------------------------------ files and the command


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "stream_trainer", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _numeric_csv(path: Path, rows: int, bad: dict[int, str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "y"])
        for i in range(rows):
            writer.writerow([bad.get(i, f"{i * 0.5}"), i % 3, i % 2])


def test_evaluate_on_a_csv_with_oops_in_a_numeric_column_rejects_that_row(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    _numeric_csv(path, 7, {2: "oops"})  # the third data row, in the first batch of 4
    done = _cli(
        "evaluate", "--source", str(path), "--target", "y", "--batch-sizes", "4",
        "--no-progress", "--hidden", "8", "--report-json", str(tmp_path / "r.json"),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rejected"] == {"wrong_type": 1}
    assert report["samples"] == 6 and report["records_read"] == 7


def test_evaluate_with_a_wrong_target_fails_naming_the_fields(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    _numeric_csv(path, 7, {})
    done = _cli("evaluate", "--source", str(path), "--target", "label", "--no-progress",
                cwd=tmp_path)  # fmt: skip
    assert done.returncode != 0
    assert "no record has the target field 'label'" in done.stderr
    assert "fields seen: 'a', 'b', 'y'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_csv_row_the_csv_module_refuses_is_rejected_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_text("a,y\n1,0\n" + "x" * (csv.field_size_limit() + 1) + ",1\n2,1\n")
    items = list(open_source(str(path)))
    assert [type(i).__name__ for i in items] == ["Record", "RejectedRecord", "Record"]
    rejected = items[1]
    assert isinstance(rejected, RejectedRecord) and rejected.reason == RejectReason.WRONG_TYPE
    assert "field larger than field limit" in rejected.detail


def test_a_python_record_that_json_cannot_write_is_rejected_not_raised() -> None:
    cyclic: dict[str, Any] = {"x": 1.0, "y": 0}
    cyclic["self"] = cyclic
    trainer = _trainer()
    report = trainer.step([Record(cyclic), Record({"x": 1.0, "y": 1})])
    assert _reasons(report) == ["wrong_type"] and report.trained == 1
    assert report.rejected[0].raw is not None and b"'x': 1.0" in report.rejected[0].raw


def test_deep_values_cross_the_consumer_process_pipe_without_recursion() -> None:
    """The consumer process decodes, then sends the decoded values of the records that are not
    plain (and of the rejected ones) in a JSON frame header: nothing deeper than the depth limit
    may reach it, or the service's read of the frame would recurse."""
    import io

    from consumers.deserializer import _Message
    from consumers.process.frames import pack_polled, read_frame, unpack_batch, write_frame

    nest = MAX_JSON_DEPTH - 1  # the label, inside the top-level object, at the limit exactly
    messages = [
        _Message(
            b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b', "y": 1}', None, "t", 0, 0, 1, []
        ),
        _Message(b'{"x": ' + b"[" * 990 + b"]" * 990 + b"}", None, "t", 0, 1, 1, []),
        _Message(b'{"x": 1.5, "y": ' + b"[" * nest + b"]" * nest + b"}", None, "t", 0, 2, 1, []),
        _Message(b'{"x": 2.5, "y": 1}', None, "t", 0, 3, 1, []),
    ]
    fields, blob = pack_polled(RecordDecoder("y"), [("t", 0, messages)], {"t:0": 4})
    stream = io.BytesIO()
    write_frame(stream, {"type": "batch", **fields}, blob)
    stream.seek(0)
    batch = unpack_batch(*read_frame(stream))
    assert [(r.offset, r.reason.value, r.value) for r in batch.rejected] == [
        (0, "too_deep", None),
        (1, "too_deep", None),
    ]
    assert [r.offset for r in batch.records] == [2, 3]
    report = _trainer().step(batch.records)
    assert _reasons(report) == ["bad_label"] and report.trained == 1


def test_evaluate_on_a_source_of_only_unreadable_lines_says_so(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"not json\n[1, 2]\n")
    done = _cli("evaluate", "--source", str(path), "--target", "y", "--no-progress", cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "no record of the source could be read: rejected" in done.stderr
    assert "'not_json': 1, 'not_object': 1" in done.stderr


def test_the_service_keeps_checkpointing_through_hostile_records(tmp_path: Path) -> None:
    """Through ``run`` (file source, local checkpoints): the records that used to stop the
    service are dead-lettered with their reasons, every checkpoint succeeds, and a restart
    restores the last one and screens with the configured limits."""
    from stream_trainer.service import TrainerService, load_service_config

    good = [json.dumps({"x": i % 5 / 5, "c": "abc"[i % 3], "label": i % 2}) for i in range(120)]
    hostile = {
        json.dumps({"x": 2**600, "label": 1}): "out_of_range",
        json.dumps({"x": 1e200, "label": 0}): "out_of_range",
        json.dumps({"x": 0.5, "label": 1, "new": "s"}): None,  # decides "new": categorical
        json.dumps({"x": 0.5, "label": 1, "new": 3}): "wrong_type",
        json.dumps({"x": "oops", "label": 1}): "wrong_type",
        json.dumps({**{f"k{i}": 1.0 for i in range(1500)}, "label": 0}): "too_many_new_features",
        json.dumps({"x": 0.5, "label": "third"}): "too_many_classes",
        json.dumps({"x": "z" * 5000, "label": 0}): "too_large",
        '{"x": ' + "[" * 5000 + "]" * 5000 + ', "label": 1}': "too_deep",
        json.dumps({"label": 1}): "no_features",
    }
    lines = good[:3] + list(hostile) + good[3:]  # the first batches meet them
    source = tmp_path / "hostile.jsonl"
    source.write_text("\n".join(lines) + "\n")
    settings = {
        "source": str(source),
        "checkpoint": f"file://{tmp_path / 'checkpoints'}",
        "checkpoint_every_records": 20,
        "batch_sizes": "1:8",
        "dead_letter": str(tmp_path / "dead.jsonl"),
        "metrics_address": "off",
        "progress": False,
    }
    trainer = {"target": "label", "hidden": (8,), "seed": 0, "max_classes": 2}
    config = load_service_config(flags=settings, trainer_flags=trainer, environ={})
    report = TrainerService(config).run()
    assert report["final_checkpoint_ok"] is True
    expected: dict[str, int] = {}
    for reason in hostile.values():
        if reason is not None:
            expected[reason] = expected.get(reason, 0) + 1
    assert report["rejected"] == dict(sorted(expected.items()))
    assert report["samples"] == len(good) + 1
    letters = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert sorted(d["reason"] for d in letters) == sorted(r for r in hostile.values() if r)

    with_more_classes = load_service_config(
        flags=settings, trainer_flags={**trainer, "max_classes": 5}, environ={}
    )
    service = TrainerService(with_more_classes)
    assert service.restored is not None and service.trainer.samples_trained == len(good) + 1
    assert service.trainer.config.max_classes == 5


def test_evaluate_takes_the_limits_as_flags_and_refuses_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_text("a,y\n" + "".join(f"{i},{'pqr'[i % 3]}\n" for i in range(30)))
    report_path = tmp_path / "r.json"
    done = _cli("evaluate", "--source", str(path), "--target", "y", "--no-progress",
                "--hidden", "8", "--max-classes", "2", "--report-json", str(report_path),
                cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["classes"] == ["p", "q"] and report["rejected"] == {"too_many_classes": 10}
    done = _cli("evaluate", "--source", str(path), "--target", "y", "--max-features", "0",
                cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and "max_features must be >= 1, got 0" in done.stderr
