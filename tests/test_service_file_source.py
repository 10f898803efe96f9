"""The service on file sources (no Kafka): resuming from a checkpoint's offsets, replaying a
recording with a batch log bit for bit, dead letters of a CSV, and the embedded default run."""

from __future__ import annotations

import base64
import json
import math
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from stream_trainer.checkpoints import Checkpoint, open_store
from stream_trainer.cli import main as cli_main
from stream_trainer.errors import SourceError
from stream_trainer.service import TrainerService, load_service_config
from stream_trainer.sources.recording import RecordingEntry, RecordingWriter
from tests.service_doubles import Crash, CrashingService, StoppingService

TOPIC = "clicks"


def _config(tmp_path: Path, source: Path | str, **flags: Any) -> Any:
    settings: dict[str, Any] = {
        "source": str(source),
        "checkpoint": f"file://{tmp_path / 'checkpoints'}",
        "checkpoint_every_records": 60,
        "batch_sizes": "1:32",
        "dead_letter": str(tmp_path / "dead-letters.jsonl"),
        "metrics_address": "off",
        "progress": False,
        **flags,
    }
    trainer = {"target": "label", "task": "classification", "hidden": (8,), "seed": 5}
    return load_service_config(flags=settings, trainer_flags=trainer, environ={})


def _load(url: str) -> Checkpoint:
    with open_store(url) as store:
        checkpoint = store.load_latest()
    assert checkpoint is not None
    return checkpoint


@pytest.fixture
def csv_source(tmp_path: Path) -> Path:
    lines = ["x1,x2,colour,label"]
    colours = ("red", "green", "blue")
    lines += [f"{i % 9},{math.cos(i):.6f},{colours[i % 3]},{(i // 3) % 2}" for i in range(400)]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    """A three-partition recording with interleaved partitions and a few undecodable values."""
    path = tmp_path / "clicks.jsonl"
    offsets = [0, 0, 0]
    with RecordingWriter(path, topic=TOPIC) as writer:
        for i in range(500):
            partition = (i * 7) % 3
            if i % 97 == 50:
                value = b"\xff not json"
            else:
                value = json.dumps({"id": i, "a": math.sin(i), "b": i % 4, "label": i % 3}).encode()
            writer.write(RecordingEntry(TOPIC, partition, offsets[partition], i, None, value))
            offsets[partition] += 1
    return path


def test_resumes_from_the_checkpoint_offsets_without_training_again(
    tmp_path: Path, csv_source: Path
) -> None:
    config = _config(tmp_path, csv_source)
    stopping = StoppingService(config, stop_after=7)
    first = stopping.run()
    assert first["final_checkpoint_ok"] is True
    # The stop finished in time, so its watchdog (os._exit(3) when overdue) is cancelled.
    assert stopping._watchdog is not None
    stopping._watchdog.join(timeout=5)
    assert not stopping._watchdog.is_alive()
    assert 0 < first["samples"] < 400
    assert first["next_offsets"] == {f"{csv_source}:0": first["samples"]}

    service = TrainerService(config)
    assert service.restored is not None
    assert service.restored.offsets == first["next_offsets"]
    second = service.run()
    assert second["records_trained"] == 400 - first["samples"]
    assert second["samples"] == 400
    assert second["next_offsets"] == {f"{csv_source}:0": 400}
    # The first batch had no model to predict it: unscored, a count the checkpoint carries over.
    assert second["unscored"] == first["unscored"] > 0

    # Nothing left: a third run trains nothing and keeps the model as it was.
    third = TrainerService(config).run()
    assert (third["records_trained"], third["samples"]) == (0, 400)
    assert third["checkpoint_version"] == second["checkpoint_version"]


def test_replaying_the_batch_log_gives_bit_identical_weights(
    tmp_path: Path, recording: Path
) -> None:
    log = tmp_path / "batches.jsonl"
    config = _config(tmp_path, recording, batch_log=str(log), batch_sizes="1:48")
    for crash_after in (6, 9, 4):
        with pytest.raises(Crash):
            CrashingService(config, crash_after=crash_after).run()
    crashed = TrainerService(config).run()
    assert crashed["samples"] == 495
    assert crashed["rejected"] == {"not_utf8": 5}
    assert crashed["next_offsets"] == {f"{TOPIC}:0": 167, f"{TOPIC}:1": 167, f"{TOPIC}:2": 166}

    replay_url = f"file://{tmp_path / 'replay'}"
    replayed = TrainerService(
        _config(tmp_path, recording, replay_batches=str(log), checkpoint=replay_url)
    ).run()
    assert (replayed["samples"], replayed["steps"]) == (crashed["samples"], crashed["steps"])
    a, b = _load(f"file://{tmp_path / 'checkpoints'}"), _load(replay_url)
    assert (a.samples, a.step) == (b.samples, b.step)
    assert sorted(a.tensors) == sorted(b.tensors)
    assert [name for name, t in a.tensors.items() if not torch.equal(t, b.tensors[name])] == []


def test_crash_inside_a_checkpoint_write_restores_the_previous_version(
    tmp_path: Path, csv_source: Path
) -> None:
    config = _config(tmp_path, csv_source)
    first = StoppingService(config, stop_after=5).run()
    url = f"file://{tmp_path / 'checkpoints'}"
    good = _load(url)
    # A writer died after writing every part of version N, before moving the pointer: N holds a
    # model that claims to have trained everything, which no loader may ever see.
    with open_store(url) as store:
        epoch = store.acquire_epoch("crashed-writer")
        poisoned = Checkpoint(
            tensors={k: torch.full_like(t, 7) for k, t in good.tensors.items()},
            state=good.state,
            offsets={k: 400 for k in good.offsets},
            samples=400,
            step=good.step + 1,
            config_fingerprint=good.config_fingerprint,
            writer_id="crashed-writer",
            epoch=epoch,
        )
        orphan, _ = store._stage(poisoned)  # steps 2-3 of a save; the pointer never moves
        assert store.latest_version() == good.version < orphan

    service = TrainerService(config)
    assert service.restored is not None and service.restored.version == good.version
    report = service.run()
    assert report["samples"] == 400
    assert report["records_trained"] == 400 - first["samples"]
    final = _load(url)
    assert final.version > orphan
    assert all(torch.isfinite(t).all() for t in final.tensors.values() if t.is_floating_point())


def _dead_letters(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bad_csv_rows_are_dead_lettered_with_reason_and_bytes(tmp_path: Path) -> None:
    good = [f"{i % 4},{i % 7 / 7},{i % 2}" for i in range(60)]
    bad = {
        "x1,x2": "wrong_type",  # too few cells
        "1,2,3,4": "wrong_type",  # too many cells
    }
    lines = ["x1,x2,label", *good[:30], *bad, *good[30:], "nan,0.5,1", "1,inf,0", "abc,0.5,1"]
    source = tmp_path / "rows.csv"
    source.write_text("\n".join(lines) + "\n")
    report = TrainerService(_config(tmp_path, source)).run()
    assert report["samples"] == 60
    assert report["rejected"] == {"non_finite": 2, "wrong_type": 3}

    letters = _dead_letters(tmp_path / "dead-letters.jsonl")
    by_offset = {d["offset"]: d for d in letters}
    assert sorted(by_offset) == [30, 31, 62, 63, 64]
    for offset, (line, reason) in zip((30, 31), bad.items(), strict=True):
        letter = by_offset[offset]
        assert (letter["reason"], letter["topic"], letter["partition"]) == (reason, str(source), 0)
        assert base64.b64decode(letter["raw_b64"]) == line.encode()
        assert letter["detail"]
    assert tuple(by_offset[o]["reason"] for o in (62, 63, 64)) == ("non_finite",) * 2 + (
        "wrong_type",
    )


def test_rows_the_trainer_rejects_keep_their_original_csv_bytes(tmp_path: Path) -> None:
    source = tmp_path / "rows.csv"
    source.write_text("x1,x2,label\n" + "1,0.5,1\n" * 20 + "nan,0.5,1\n")
    TrainerService(_config(tmp_path, source)).run()
    (letter,) = _dead_letters(tmp_path / "dead-letters.jsonl")
    assert base64.b64decode(letter["raw_b64"]) == b"nan,0.5,1"


@pytest.fixture
def restore_signal_handlers() -> Iterator[None]:
    """``stream-trainer run`` installs SIGTERM/SIGINT handlers; put pytest's back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_embedded_default_run_trains_river_phishing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_signal_handlers: None,
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [n for n in __import__("os").environ if n.startswith("STREAM_TRAINER_")]:
        monkeypatch.delenv(name)
    argv = [
        "run",
        "--checkpoint",
        f"file://{tmp_path / 'checkpoints'}",
        "--metrics-address",
        "127.0.0.1:0",
        "--no-progress",
        "--hidden",
        "16",
        "--report-json",
        str(tmp_path / "report.json"),
    ]
    assert cli_main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["source"] == "river:Phishing"
    assert report["samples"] == report["records_trained"] == 1250
    assert report["next_offsets"] == {"river:Phishing:0": 1250}
    assert 0.5 < report["accuracy"] <= 1.0
    assert "run default: samples=1250" in capsys.readouterr().out
    assert _load(f"file://{tmp_path / 'checkpoints'}").samples == 1250

    # Run again: it resumes at the end of the dataset and trains nothing more.
    assert cli_main(argv) == 0
    again = json.loads((tmp_path / "report.json").read_text())
    assert (again["samples"], again["records_trained"]) == (1250, 0)


def test_a_failed_offset_commit_is_retried_without_new_records(
    tmp_path: Path, csv_source: Path
) -> None:
    """A commit refused (say, during a rebalance) after a successful save is sent again at the next
    checkpoint trigger even when nothing new was trained (here the end of the run, right after the
    last interval checkpoint), and no save is spent on it."""
    config = _config(tmp_path, csv_source, batch_sizes="8", checkpoint_every_records=200)
    ends = {f"{csv_source}:0": 400}
    attempts: list[dict[str, int]] = []

    class _RefusesOneCommit(TrainerService):
        def _open_source(self) -> None:
            super()._open_source()
            committed = self.source.commit

            def commit(offsets: dict[str, int], metadata: object = None) -> None:
                attempts.append(dict(offsets))
                if offsets == ends and attempts.count(ends) == 1:
                    raise SourceError("a consumer group rebalance is in progress", retriable=True)
                committed(offsets)

            self.source.commit = commit

    service = _RefusesOneCommit(config)
    report = service.run()
    assert report["final_checkpoint_ok"] is True
    assert attempts == [{f"{csv_source}:0": 200}, ends, ends]
    assert service.source.committed == ends
    assert report["checkpoint_version"] == 2  # the retry saved nothing
