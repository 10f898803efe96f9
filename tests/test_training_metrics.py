"""Our vectorized prequential metrics equal river.metrics fed the same predictions one by one."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from river import datasets, evaluate, tree, utils
from river import metrics as rm

from stream_trainer.training.metrics import ClassificationMetrics, RegressionMetrics


def _batches(n: int, rng: np.random.Generator) -> list[slice]:
    """Consecutive slices of random sizes 1..40 covering range(n)."""
    out, start = [], 0
    while start < n:
        size = int(rng.integers(1, 41))
        out.append(slice(start, min(n, start + size)))
        start += size
    return out


def _stream(n_classes: int, n: int, seed: int, *, late_class_at: int | None = None):
    """Labels, and per-sample probabilities over the classes known *before* the sample's batch.

    With ``late_class_at``, the last class first appears at that index and predictions before it
    only cover ``n_classes - 1`` columns (as the trainer's output layer would)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    if late_class_at is not None:
        y[:late_class_at] = rng.integers(0, n_classes - 1, late_class_at)
        y[late_class_at] = n_classes - 1
    logits = rng.normal(size=(n, n_classes)) + 1.5 * np.eye(n_classes)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


def _river_classification(window: int):
    return {
        "accuracy": rm.Accuracy(),
        "rolling_accuracy": utils.Rolling(rm.Accuracy, window_size=window),
        "kappa": rm.CohenKappa(),
    }


@pytest.mark.parametrize("window", [1, 7, 100, 5000])
def test_binary_metrics_equal_river(window: int) -> None:
    y, proba = _stream(2, 1500, seed=window)
    ours = ClassificationMetrics(window)
    theirs = _river_classification(window)
    log_loss = rm.LogLoss()
    rng = np.random.default_rng(0)
    for sl in _batches(len(y), rng):
        ours.update(y[sl], proba[sl])
        for yt, p in zip(y[sl], proba[sl], strict=True):
            y_pred = bool(p.argmax() == 1)
            for m in theirs.values():
                m.update(bool(yt == 1), y_pred)
            log_loss.update(bool(yt == 1), float(p[1]))
        report = ours.report()
        for name, m in theirs.items():
            assert report[name] == pytest.approx(m.get(), abs=1e-12), name
        assert report["log_loss"] == pytest.approx(log_loss.get(), rel=1e-12)


def test_multiclass_metrics_equal_river_with_a_late_class() -> None:
    k, late = 4, 700
    y, proba = _stream(k, 1600, seed=3, late_class_at=late)
    ours = ClassificationMetrics(250)
    theirs = _river_classification(250)
    cross_entropy = rm.CrossEntropy()
    seen: set[int] = set()
    rng = np.random.default_rng(1)
    for sl in _batches(len(y), rng):
        known = k if seen >= set(range(k)) else k - 1  # columns the model had before the batch
        p = proba[sl, :known] / proba[sl, :known].sum(axis=1, keepdims=True)
        ours.update(y[sl], p)
        for yt, row in zip(y[sl], p, strict=True):
            y_pred = int(row.argmax())
            for m in theirs.values():
                m.update(int(yt), y_pred)
            cross_entropy.update(int(yt), {c: float(row[c]) for c in range(known)})
        seen.update(int(v) for v in y[sl])
        report = ours.report()
        for name, m in theirs.items():
            assert report[name] == pytest.approx(m.get(), abs=1e-12), name
        assert report["log_loss"] == pytest.approx(cross_entropy.get(), rel=1e-9)
    assert ours.confusion.shape == (k, k)


def test_no_prediction_is_unscored_and_in_no_metric() -> None:
    ours = ClassificationMetrics(10)
    ours.update(np.array([0, 0, 1]), None)  # the first batch: no model yet
    assert (ours.n, ours.unscored) == (0, 3)
    assert ours.report() == {
        "accuracy": 0.0,
        "rolling_accuracy": 0.0,
        "log_loss": 0.0,
        "kappa": 0.0,
    }
    assert ours.confusion.sum() == 0
    ours.update(np.array([1, 0]), np.array([[0.2, 0.8], [0.3, 0.7]]))
    ours.update(np.array([1]), np.empty((1, 0)))  # no column: no prediction either
    report = ours.report()
    assert (ours.n, ours.unscored) == (2, 4)
    assert report["accuracy"] == 0.5 and report["rolling_accuracy"] == 0.5
    assert report["log_loss"] == pytest.approx(-(np.log(0.8) + np.log(0.3)) / 2)
    assert ours.confusion.sum() == 2
    assert ClassificationMetrics.from_state(json.loads(json.dumps(ours.state()))).unscored == 4
    legacy = ours.state()
    del legacy["unscored"]  # a checkpoint written before the count was kept
    assert ClassificationMetrics.from_state(legacy).unscored == 0

    regression = RegressionMetrics()
    regression.update(np.array([1.0, 2.0]), None)
    regression.update(np.array([3.0]), np.array([2.5]))
    assert (regression.n, regression.unscored) == (1, 2)
    assert regression.report()["mae"] == 0.5


def test_abstentions_follow_rivers_progressive_validation() -> None:
    """river's ``progressive_val_score`` scores a sample only when the model predicts something;
    our metrics, fed the same predictions (``None`` where the model abstains), agree."""
    stream = list(itertools.islice(datasets.Phishing(), 300))
    theirs = evaluate.progressive_val_score(stream, tree.HoeffdingTreeClassifier(), rm.Accuracy())
    model, ours = tree.HoeffdingTreeClassifier(), ClassificationMetrics(1000)
    for x, y in stream:
        proba = model.predict_proba_one(x)
        row = np.array([[proba.get(False, 0.0), proba.get(True, 0.0)]]) if proba else None
        ours.update(np.array([int(y)]), row)
        model.learn_one(x, y)
    assert ours.unscored == 1  # the tree abstains before its first sample
    assert ours.report()["accuracy"] == pytest.approx(theirs.get(), abs=1e-12)


def test_regression_metrics_equal_river() -> None:
    rng = np.random.default_rng(5)
    y = rng.normal(3.0, 2.0, 900)
    pred = y + rng.normal(0.0, 0.7, 900)
    ours = RegressionMetrics()
    theirs = {"mae": rm.MAE(), "rmse": rm.RMSE(), "r2": rm.R2()}
    for sl in _batches(len(y), rng):
        ours.update(y[sl], pred[sl])
        for yt, yp in zip(y[sl], pred[sl], strict=True):
            for m in theirs.values():
                m.update(float(yt), float(yp))
        report = ours.report()
        for name, m in theirs.items():
            assert report[name] == pytest.approx(m.get(), rel=1e-9, abs=1e-12), name


def test_state_is_json_and_round_trips_exactly() -> None:
    y, proba = _stream(3, 400, seed=9)
    a = ClassificationMetrics(50)
    a.update(y[:230], proba[:230])
    b = ClassificationMetrics.from_state(json.loads(json.dumps(a.state())))
    for m in (a, b):
        m.update(y[230:], proba[230:])
    assert a.report() == b.report()
    assert a.state() == b.state()

    r = RegressionMetrics()
    r.update(np.array([1.0, 2.0]), np.array([1.5, 2.5]))
    r2 = RegressionMetrics.from_state(json.loads(json.dumps(r.state())))
    for m in (r, r2):
        m.update(np.array([4.0]), np.array([3.0]))
    assert r.report() == r2.report()
