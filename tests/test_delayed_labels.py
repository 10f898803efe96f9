"""Delayed labels: our replay gives river's progressive_val_score(delay=N) predictions."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from river import datasets, evaluate, metrics

from stream_trainer.cli import main
from stream_trainer.delayed_labels import evaluate_with_label_delay
from stream_trainer.errors import ConfigError
from stream_trainer.records import Record
from stream_trainer.river import MLPClassifier
from stream_trainer.sources import open_source
from stream_trainer.training import IncrementalTrainer, TrainerConfig
from stream_trainer.training.river_baselines import RiverLearner


class _RiverLogisticRegression(MLPClassifier):
    """river's LogisticRegression under our protocol (RiverLearner), behind river's API."""

    def _new_trainer(self, config: TrainerConfig) -> IncrementalTrainer:
        return RiverLearner("LogisticRegression", config)


def _phishing(n: int) -> list[tuple[dict[str, Any], bool]]:
    # names in sorted order: the river adapter sorts them, the trainer takes them as they come
    return [(dict(sorted(x.items())), y) for x, y in itertools.islice(datasets.Phishing(), n)]


def _river_predictions(model: MLPClassifier, data: list[Any], delay: int) -> list[Any]:
    steps = evaluate.iter_progressive_val_score(
        data, model, metrics.LogLoss(), delay=delay, yield_predictions=True
    )
    return [step["Prediction"] for step in steps]


@pytest.mark.parametrize("delay", [0, 1, 25, 400])
@pytest.mark.parametrize("learner", ["mlp", "river:LogisticRegression"])
def test_served_predictions_are_river_progressive_val_score_with_delay(
    delay: int, learner: str
) -> None:
    data = _phishing(300)
    config = TrainerConfig(target="y", task="classification", hidden=(16,), seed=0)
    if learner == "mlp":
        trainer, model = IncrementalTrainer(config), MLPClassifier(hidden=(16,), seed=0)
    else:
        trainer = RiverLearner("LogisticRegression", config)
        model = _RiverLogisticRegression(hidden=(16,), seed=0)
    records = [Record({**x, "y": y}) for x, y in data]
    ours: list[Any] = []
    result = evaluate_with_label_delay(
        records, trainer, delay=delay, progress=False, predictions=ours
    )
    theirs = _river_predictions(model, data, delay)
    assert len(ours) == len(theirs) == 300
    # nothing learned before the first reveal: no prediction on either side
    first = min(max(delay, 1), len(data))
    assert all(p is None for p in ours[:first]) and all(p == {} for p in theirs[:first])
    assert [{c == "true": v for c, v in p.items()} for p in ours[first:] if p] == theirs[first:]
    assert result.report["label_delay"] == delay and result.report["samples"] == 300
    assert result.report["unscored"] == first


def test_scores_the_prediction_served_at_arrival() -> None:
    data = _phishing(400)
    config = TrainerConfig(target="y", task="classification", hidden=(16,), seed=0)
    records = [Record({**x, "y": y}) for x, y in data]
    served: list[Any] = []
    result = evaluate_with_label_delay(
        records, IncrementalTrainer(config), delay=50, progress=False, predictions=served
    )
    hits = [
        max(p, key=p.__getitem__) == ("true" if y else "false")
        for p, (_, y) in zip(served, data, strict=True)
        if p
    ]
    assert result.report["accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert result.report["unscored"] == 50 and len(hits) == 350


def test_bad_and_unlabelled_records_are_counted_not_scored() -> None:
    data = _phishing(60)
    records = [Record({**x, "y": y}) for x, y in data]
    records[10].value["long_url"] = float("nan")
    records[20].value["y"] = 0.5
    del records[30].value["y"]
    config = TrainerConfig(target="y", task="classification", hidden=(8,), seed=0)
    served: list[Any] = []
    result = evaluate_with_label_delay(
        records, IncrementalTrainer(config), delay=5, progress=False, predictions=served
    )
    assert served[10] is None  # its features fail the checks: no prediction
    assert result.report["rejected"] == {"bad_label": 1, "non_finite": 1}
    assert result.report["predicted_only"] == 1 and result.report["samples"] == 57


def test_a_negative_delay_is_refused() -> None:
    with pytest.raises(ConfigError, match="label delay must be >= 0"):
        evaluate_with_label_delay([], IncrementalTrainer(TrainerConfig(target="y")), delay=-1)


def test_evaluate_label_delay_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report_path = tmp_path / "report.json"
    code = main([
        "evaluate", "--source", "river:Phishing", "--limit", "300", "--label-delay", "20",
        "--hidden", "16", "--no-progress", "--report-json", str(report_path),
    ])  # fmt: skip
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["label_delay"] == 20 and report["samples"] == 300
    assert report["unscored"] == 20 and 0.7 < report["accuracy"] <= 1.0
    assert "accuracy=" in capsys.readouterr().out
    # the same run through the function: the command adds nothing of its own
    config = TrainerConfig(target="is_phishing", hidden=(16,))
    source = open_source("river:Phishing", target="is_phishing")
    result = evaluate_with_label_delay(
        source, IncrementalTrainer(config), delay=20, limit=300, progress=False
    )
    assert result.report["accuracy"] == report["accuracy"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--label-delay", "5", "--batch-sizes", "1:16"], "one at a time; got batch size 1:16"),
        (["--label-delay", "-1"], "label delay must be >= 0 records, got -1"),
    ],
)
def test_evaluate_label_delay_refuses(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["evaluate", "--source", "river:Phishing", "--no-progress", *flags])
    assert code == 2
    assert message in capsys.readouterr().err
