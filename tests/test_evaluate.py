"""`stream-trainer evaluate` end to end through `stream_trainer.cli.main`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_trainer.cli import main
from stream_trainer.sources import BatchSizes

pytestmark = pytest.mark.usefixtures("restore_thread_pools")  # evaluate pins the thread pools


def _csv(tmp_path: Path) -> Path:
    lines = ["x1,x2,colour,target"]
    for i in range(300):
        x1, x2 = (i * 37 % 101) / 50 - 1, (i * 53 % 97) / 48 - 1
        lines.append(f"{x1:.3f},{x2:.3f},{'rgb'[i % 3]},{int(x1 + x2 > 0)}")
    lines += ["junk,0.1,r,1", "nan,0.2,g,0", "inf,0.3,b,1", "0.1,0.2,r,", "0.5,0.5,g,maybe?"]
    path = tmp_path / "stream.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evaluate_writes_report_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path, plot_path = tmp_path / "out" / "report.json", tmp_path / "out" / "run.png"
    code = main([
        "evaluate", "--source", str(_csv(tmp_path)), "--target", "target",
        "--norm", "layer", "--batch-sizes", "1:16", "--hidden", "16", "--seed", "1",
        "--no-progress", "--report-json", str(report_path), "--plot", str(plot_path),
    ])  # fmt: skip
    assert code == 0
    report = json.loads(report_path.read_text())
    for key in (
        "samples",
        "accuracy",
        "rolling_accuracy",
        "log_loss",
        "kappa",
        "samples_per_second",
        "rejected",
        "norm",
        "batch_size",
        "model",
        "predicted_only",
        "unscored",
    ):
        assert key in report, key
    assert report["model"] == "mlp" and report["norm"] == "layer" and report["batch_size"] == "1:16"
    # junk -> wrong_type, nan/inf -> non_finite; an empty target is predicted only; "maybe?" is
    # a new class label string (the target column is categorical), so it is learned.
    assert report["rejected"] == {"non_finite": 2, "wrong_type": 1}
    assert report["predicted_only"] == 1
    assert report["samples"] == 301
    # The first batch came before the model: unscored (river's protocol), the rest scored.
    first_size = next(BatchSizes.parse("1:16").sizes(1))
    assert report["unscored"] == first_size
    assert report["accuracy"] > 0.7
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "accuracy=" in out and "rejected=3" in out


def test_evaluate_river_baseline_on_a_bundled_dataset(tmp_path: Path) -> None:
    report_path = tmp_path / "r.json"
    code = main([
        "evaluate", "--source", "river:Phishing", "--model", "river:LogisticRegression",
        "--batch-size", "4", "--limit", "200", "--no-progress", "--report-json", str(report_path),
    ])  # fmt: skip
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["model"] == "river:LogisticRegression" and report["samples"] == 200
    assert report["unscored"] == 4  # the first batch, before river's model existed
    assert report["batch_size"] == "4" and report["accuracy"] > 0.6


def test_evaluate_regression_report(tmp_path: Path) -> None:
    path = tmp_path / "reg.jsonl"
    path.write_text("".join(f'{{"x": {i % 7}, "y": {1.5 * (i % 7) + 0.25}}}\n' for i in range(80)))
    report_path = tmp_path / "reg.json"
    assert main(["evaluate", "--source", str(path), "--target", "y", "--no-progress",
                 "--report-json", str(report_path)]) == 0  # fmt: skip
    report = json.loads(report_path.read_text())
    assert report["task"] == "regression" and {"mae", "rmse", "r2"} <= set(report)
    assert report["unscored"] == 1  # batch size 1: only the very first record had no model


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--norm", "bogus"], "unknown norm 'bogus'; valid: batch, ema_batch, batch_renorm"),
        (["--model", "xgboost"], "unknown model 'xgboost'; valid: mlp, river:LogisticRegression"),
        (["--model", "river:Nope"], "unknown river model 'Nope'; valid: LogisticRegression"),
        (["--limit", "0"], "--limit must be >= 1"),
    ],
)
def test_bad_names_list_the_valid_ones(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["evaluate", "--source", "river:Phishing", "--no-progress", *flags])
    assert code == 2
    assert message in capsys.readouterr().err


def test_stream_history_stays_bounded_and_spans_the_stream() -> None:
    from stream_trainer.evaluation import StreamHistory

    history = StreamHistory(max_points=100)
    for i in range(100_000):
        history.add(i, 1 + i % 7, {"rolling_accuracy": i / 100_000})
    assert len(history.seen) <= 100
    assert len(history.seen) == len(history.batch_size) == len(history.rolling)
    assert history.seen[0] == 0 and history.seen[-1] > 90_000
    assert history.seen == sorted(history.seen)
