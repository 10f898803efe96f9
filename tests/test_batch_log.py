"""The batch log: segments of a step, the writer's truncation, and the service keeping the log
equal to what its checkpoint covers after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_trainer.checkpoints import open_store
from stream_trainer.records import Record
from stream_trainer.service import TrainerService, load_service_config
from stream_trainer.service.batch_log import BatchLog, read_batch_log, segments_of
from tests.service_doubles import Crash, CrashingService


def _record(partition: int, offset: int) -> Record:
    return Record(value={"x": 1.0}, topic="t", partition=partition, offset=offset)


def test_segments_are_runs_of_one_partition_in_record_order() -> None:
    records = [_record(0, 5), _record(0, 6), _record(1, 0), _record(0, 7), _record(0, 9)]
    records.append(Record(value={"x": 1.0}))  # no coordinates: not logged
    # Offset 8 of t:0 is inside [7, 10): a record rejected by the source between two trained ones.
    assert segments_of(records) == [("t:0", 5, 7), ("t:1", 0, 1), ("t:0", 7, 10)]
    assert segments_of([]) == []


def test_log_round_trips_and_truncates_to_the_lines_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "batches.jsonl"
    log = BatchLog(path)
    steps = [[("t:0", 0, 3)], [("t:1", 0, 2), ("t:0", 3, 4)], [("t:2", 0, 1)]]
    for step, segments in enumerate(steps, start=1):
        log.append(step, segments)
    log.close()
    assert log.lines == 3
    assert list(read_batch_log(path)) == steps
    assert json.loads(path.read_text().splitlines()[1]) == {
        "step": 2,
        "segments": [["t:1", 0, 2], ["t:0", 3, 4]],
    }

    # Reopened for a checkpoint that covers two steps; a crash left half a line behind.
    with path.open("a") as handle:
        handle.write('{"step": 4, "segm')
    log = BatchLog(path, keep_lines=2)
    assert log.lines == 2
    log.append(3, [("t:0", 4, 6)])
    log.close()
    assert list(read_batch_log(path)) == [*steps[:2], [("t:0", 4, 6)]]
    assert not path.with_suffix(".jsonl.tmp").exists()

    # keep_lines=None keeps everything (no checkpoint information); 0 starts an empty log.
    BatchLog(path).close()
    assert len(list(read_batch_log(path))) == 3
    BatchLog(path, keep_lines=0).close()
    assert path.read_text() == ""


def test_service_truncates_the_log_to_what_its_checkpoint_covers(tmp_path: Path) -> None:
    rows = ["x1,x2,label"] + [f"{i % 5},{(i * 7) % 11},{i % 2}" for i in range(300)]
    source = tmp_path / "data.csv"
    source.write_text("\n".join(rows) + "\n")
    log_path = tmp_path / "batches.jsonl"
    checkpoint_url = f"file://{tmp_path / 'checkpoints'}"
    config = load_service_config(
        flags={
            "source": str(source),
            "checkpoint": checkpoint_url,
            "checkpoint_every_records": 50,
            "batch_sizes": "5:20",
            "batch_log": str(log_path),
            "dead_letter": str(tmp_path / "dead.jsonl"),
            "metrics_address": "off",
            "progress": False,
        },
        trainer_flags={"target": "label", "hidden": (4,), "seed": 1},
        environ={},
    )
    with pytest.raises(Crash):
        CrashingService(config, crash_after=9).run()
    with open_store(checkpoint_url) as store:
        saved = store.load_latest()
    assert saved is not None
    covered = saved.state["service"]["batch_log_lines"]
    assert 0 < covered < 9 == len(log_path.read_text().splitlines())

    service = TrainerService(config)
    assert service.restored is not None and service.restored.version == saved.version
    report = service.run()
    steps = [json.loads(line)["step"] for line in log_path.read_text().splitlines()]
    assert steps == list(range(1, report["steps"] + 1))
    logged = sorted(o for segs in read_batch_log(log_path) for _, a, b in segs for o in range(a, b))
    assert logged == list(range(300))
    assert report["samples"] == 300
