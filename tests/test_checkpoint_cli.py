"""``stream-trainer checkpoints list|show|verify`` through :func:`stream_trainer.cli.main`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stream_trainer.checkpoints import HMAC_KEY_ENV, Checkpoint, open_store
from stream_trainer.cli import main
from stream_trainer.records import Record
from stream_trainer.training import IncrementalTrainer, TrainerConfig


def service_checkpoint(seed: int) -> Checkpoint:
    """A checkpoint as the service writes it: a trained trainer's state and tensors."""
    trainer = IncrementalTrainer(TrainerConfig(target="y", hidden=(4,), seed=0))
    trainer.step([Record({"x": float(i), "c": "ab"[i % 2], "y": i % 2}) for i in range(8)])
    with torch.no_grad():
        trainer.model.head.weight.fill_(0.123456)  # type: ignore[union-attr]
    service = {"version": 1, "run_name": "cli", "batch_log_lines": 0, "dead_lettered": {}}
    return Checkpoint(
        tensors=trainer.state_tensors(),
        state={"trainer": trainer.state_json(), "service": service},
        offsets={"clicks:0": 10 * seed},
        samples=100 * seed,
        step=seed,
        config_fingerprint=trainer.config.fingerprint(),
        writer_id="w1",
        epoch=0,
    )


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv(HMAC_KEY_ENV, raising=False)
    url = f"file://{tmp_path / 'ck'}?chunk_size=100"
    with open_store(url) as store:
        for seed in (1, 2):
            store.save(service_checkpoint(seed))
    return url


def test_list_json(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["checkpoints", "list", "--checkpoint", url, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["samples"], r["checksum"], r["latest"]) for r in rows] == [
        (1, 100, "ok", False),
        (2, 200, "ok", True),
    ]
    assert rows[1]["offsets"] == {"clicks:0": 20} and rows[1]["writer_id"] == "w1"


def test_list_table_and_show(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["checkpoints", "list", "--checkpoint", url]) == 0
    table = capsys.readouterr().out
    assert "2*" in table and "w1/0" in table and "clicks:0=20" in table
    assert main(["checkpoints", "show", "--checkpoint", url, "--version", "1"]) == 0
    shown = capsys.readouterr().out
    assert "model.head.weight  float32  (2, 4)" in shown and "samples: 100" in shown
    # the filled weight, as any printing of it would start (a timestamp may hold "0.123")
    assert "0.1234" not in shown, "tensor values must never be printed"


def test_verify_exit_codes(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["checkpoints", "verify", "--checkpoint", url]) == 0
    assert "version 2: ok" in capsys.readouterr().out
    part = tmp_path / "ck" / "versions" / "2" / "part-00000"
    part.write_bytes(part.read_bytes()[:-1])
    assert main(["checkpoints", "verify", "--checkpoint", url]) == 1
    assert "version 2: FAILED" in capsys.readouterr().out
    assert main(["checkpoints", "verify", "--checkpoint", url, "--version", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["checkpoints", "list", "--checkpoint", url, "--json"]) == 0
    assert [r["checksum"] for r in json.loads(capsys.readouterr().out)] == ["ok", "FAILED"]


def test_verify_empty_store_and_bad_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["checkpoints", "verify", "--checkpoint", str(tmp_path / "none")]) == 1
    assert main(["checkpoints", "list", "--checkpoint", "ftp://x"]) == 2
    assert "accepted forms" in capsys.readouterr().err
