"""``stream-trainer export``: the TorchScript of a checkpoint predicts what the trainer restored
from the same checkpoint predicts, for classification and regression, with and without the
linear expert; the checkpoint is read through the service's checks (a tampered version is
refused, the newest valid one is exported)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from stream_trainer.checkpoints import open_store
from stream_trainer.cli import main as cli_main
from stream_trainer.records import Record
from stream_trainer.service.restore import restore_checkpoint
from stream_trainer.training.served_model import input_rows

QUERIES: list[dict[str, Any]] = [
    {"x1": 1.0, "x2": 0.5, "colour": "red", "flag": True},
    {"x1": 8, "x2": -0.2, "colour": "blue", "flag": False},
    {"x1": 6, "x2": 0.1},  # missing features
    {"x1": 2, "x2": 0.3, "colour": "violet", "unseen": 5},  # unseen category and feature
    {"x1": 1e6, "x2": -1e6, "colour": "green"},  # beyond the clip
]


def _csv(path: Path, rows: int, *, regression: bool) -> Path:
    lines = ["x1,x2,colour,flag,label"]
    colours = ("red", "green", "blue")
    for i in range(rows):
        x1, x2 = i % 9, math.cos(i)
        label = f"{x1 * 0.5 + 3 * x2:.4f}" if regression else str(int(x1 > 4) + (i % 7 == 0))
        lines.append(f"{x1},{x2:.6f},{colours[i % 3]},{i % 2},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(tmp_path: Path, task: str, *extra: str) -> str:
    source = _csv(tmp_path / "data.csv", 700, regression=task == "regression")
    url = f"file://{tmp_path / 'checkpoints'}"
    argv = ["run", "--source", str(source), "--target", "label", "--task", task,
            "--checkpoint", url, "--checkpoint-every-records", "300", "--hidden", "16,8",
            "--metrics-address", "off", "--no-progress", "--batch-sizes", "1:64",
            "--dead-letter", str(tmp_path / "dead.jsonl"), *extra]  # fmt: skip
    assert cli_main(argv) == 0
    return url


def _restored(url: str, version: int | None = None) -> Any:
    with open_store(url) as store:
        checkpoint = store.load(version or store.latest_version())
    return restore_checkpoint(checkpoint)


@pytest.mark.parametrize(
    ("task", "extra"),
    [
        ("classification", []),
        ("classification", ["--norm", "batch_renorm", "--no-linear-expert"]),
        ("regression", []),
        ("regression", ["--norm", "layer", "--no-linear-expert"]),
    ],
)
def test_the_export_predicts_what_the_trainer_predicts(
    tmp_path: Path, task: str, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = _train(tmp_path, task, *extra)
    capsys.readouterr()
    out = tmp_path / "model" / "served.pt"
    assert cli_main(["export", "--checkpoint", url, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    trainer = _restored(url)
    metadata = json.loads(Path(f"{out}.json").read_text())
    assert summary["checkpoint_version"] == metadata["checkpoint_version"]
    assert metadata["task"] == task == trainer.task
    assert metadata["samples_seen"] == trainer.samples_trained == 700
    columns = metadata["input_columns"]
    assert columns[:3] == [
        {"name": "x1", "kind": "numeric"},
        {"name": "x2", "kind": "numeric"},
        {"name": "colour", "kind": "category", "value": "red"},
    ]
    assert {c["name"] for c in columns} == {"x1", "x2", "colour", "flag"}
    extra_files = {"metadata.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=extra_files)
    assert json.loads(extra_files["metadata.json"]) == metadata
    records = [Record(dict(q)) for q in QUERIES]
    for rows in (QUERIES, QUERIES[:1]):  # the traced batch size is not baked in
        got = scripted(input_rows(metadata["input_columns"], rows).to(torch.float32))
        if task == "regression":
            want = torch.tensor(trainer.predict_many(records[: len(rows)]), dtype=torch.float64)
            assert got.shape == (len(rows),)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            probabilities = trainer.predict_proba_many(records[: len(rows)])
            want = torch.tensor([[p[c] for c in metadata["classes"]] for p in probabilities])
            assert metadata["classes"] == trainer.classes
            torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6)
            predicted = [metadata["classes"][i] for i in got.argmax(1).tolist()]
            assert predicted == trainer.predict_many(records[: len(rows)])
    if "--no-linear-expert" not in extra:
        assert set(metadata["expert_weights"]) == {"mlp0", "mlp1", "mlp2", "linear"}


def test_a_tampered_version_is_refused_and_the_newest_valid_one_exported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _train(tmp_path, "classification")
    with open_store(url) as store:
        versions = [info.version for info in store.list_versions()]
    newest = max(versions)
    payload = tmp_path / "checkpoints" / "versions" / str(newest) / "part-00000"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))
    out = tmp_path / "served.pt"
    code = cli_main(["export", "--checkpoint", url, "--version", str(newest), "--out", str(out)])
    assert code == 2
    assert "SHA-256 of the payload does not match" in capsys.readouterr().err
    assert not out.exists()
    assert cli_main(["export", "--checkpoint", url, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint_version"] < newest
    # The archive stands alone: a Python without stream-trainer on its path loads and runs it.
    script = (
        "import json, sys, torch\n"
        f"model = torch.jit.load({str(out)!r})\n"
        f"columns = json.load(open({str(out) + '.json'!r}))['input_columns']\n"
        "print(tuple(model(torch.zeros(3, len(columns))).shape), 'stream_trainer' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "(3, 3) False"  # three classes: 0, 1, 2


def test_nothing_to_export_before_any_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"file://{tmp_path / 'empty'}"
    assert cli_main(["export", "--checkpoint", url, "--out", str(tmp_path / "m.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
