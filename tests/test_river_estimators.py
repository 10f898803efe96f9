"""stream_trainer.river: river's own estimator checks, pickling, pipelines, rejected records."""

from __future__ import annotations

import dataclasses
import doctest
import inspect
import itertools
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from river import base, checks, datasets, dummy, evaluate, metrics, preprocessing, stats

import stream_trainer.river
from stream_trainer.errors import CheckpointError
from stream_trainer.records import Record
from stream_trainer.river import TARGET_FIELD, MLPClassifier, MLPRegressor
from stream_trainer.training import IncrementalTrainer, TrainerConfig
from stream_trainer.training.config import DEFAULT_MEMBER_MOMENTA, DEFAULT_NORM_OPTIONS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "river.md"


def _estimator_checks() -> list[Any]:
    cases = []
    for cls in (MLPClassifier, MLPRegressor):
        for i, params in enumerate(cls._unit_test_params()):
            model = cls(**params)
            for check in checks.yield_checks(model):
                dataset = getattr(check, "keywords", {}).get("dataset")
                name = f"{cls.__name__}-{i}-{check.__name__}"
                if dataset is not None:
                    name += f"-{type(dataset).__name__}"
                marks = []
                if check.__name__ in model._unit_test_skips():
                    marks.append(
                        pytest.mark.skip(reason="opted out in _unit_test_skips (see its comment)")
                    )
                cases.append(pytest.param(model, check, id=name, marks=marks))
    return cases


@pytest.mark.parametrize(("model", "check"), _estimator_checks())
def test_river_check(model: base.Estimator, check: Callable[[base.Estimator], None]) -> None:
    """Each of river.checks.check_estimator's checks, as check_estimator runs it (on a clone)."""
    check(model.clone())


def test_only_the_batch_equivalence_check_is_opted_out() -> None:
    for cls in (MLPClassifier, MLPRegressor):
        names = {c.__name__ for c in checks.yield_checks(cls())}
        assert cls()._unit_test_skips() == {"check_learn_many_matches_learn_one"} <= names


def test_constructor_defaults_are_the_trainer_defaults() -> None:
    config = TrainerConfig()
    for cls in (MLPClassifier, MLPRegressor):
        params = inspect.signature(cls).parameters
        for name, param in params.items():
            expected = getattr(config, name)
            if name == "norm_options":
                assert param.default is None and expected == DEFAULT_NORM_OPTIONS
            elif name == "member_momenta":
                assert param.default is None and expected == DEFAULT_MEMBER_MOMENTA
            else:
                assert param.default == expected, name
        # every trainer setting but the target, the task and the trainer's own metric window
        left_out = {f.name for f in dataclasses.fields(TrainerConfig)} - set(params)
        assert left_out == {"target", "task", "rolling_window"}
        assert cls()._trainer.config == TrainerConfig(target=TARGET_FIELD, task=cls._task)


def test_settings_are_validated_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown norm 'nope'"):
        MLPClassifier(norm="nope")
    with pytest.raises(ValueError, match="lr must be > 0"):
        MLPRegressor(lr=0.0)


def _phishing(n: int) -> list[tuple[dict[str, Any], Any]]:
    return list(itertools.islice(datasets.Phishing(), n))


def _trump(n: int) -> list[tuple[dict[str, Any], Any]]:
    return list(itertools.islice(datasets.TrumpApproval(), n))


def test_learn_one_is_a_trainer_step_on_one_record() -> None:
    rows = _phishing(200)
    model = MLPClassifier(hidden=(16,), seed=3)
    trainer = IncrementalTrainer(
        TrainerConfig(target="y", task="classification", hidden=(16,), seed=3)
    )
    for x, y in rows[:150]:
        model.learn_one(x, y)
        trainer.step([Record({**dict(sorted(x.items())), "y": y})])  # the adapter sorts names
    for x, _ in rows[150:]:
        ours = model.predict_proba_one(x)
        theirs = trainer.predict_proba_many([Record(dict(sorted(x.items())))])[0]
        assert theirs is not None
        assert ours == {c == "true": p for c, p in theirs.items()}


def test_learn_many_is_one_step_per_frame_and_matches_learn_one_row_by_row() -> None:
    rows = _phishing(240)
    X = pd.DataFrame([x for x, _ in rows])
    y = pd.Series([y for _, y in rows])
    by_frame, by_one_row_frames, by_row = (MLPClassifier(seed=5) for _ in range(3))
    for start in range(0, 200, 40):
        by_frame.learn_many(X.iloc[start : start + 40], y.iloc[start : start + 40])
    for i in range(200):
        by_one_row_frames.learn_many(X.iloc[i : i + 1], y.iloc[i : i + 1])
        by_row.learn_one(*rows[i])
    assert by_frame.trainer.steps == 5 and by_frame.trainer.samples_trained == 200
    test = X.iloc[200:]
    one_row = by_one_row_frames.predict_proba_many(test)
    row = [by_row.predict_proba_one(x) for x, _ in rows[200:]]
    pd.testing.assert_frame_equal(
        one_row, pd.DataFrame(row, index=test.index, columns=one_row.columns)
    )
    # a frame of 40 is not 40 steps of one row: one optimizer step on the batch's mean loss
    assert not np.allclose(by_frame.predict_proba_many(test).to_numpy(), one_row.to_numpy())
    predicted = by_frame.predict_many(test)
    assert predicted.index.equals(test.index) and set(predicted) <= {True, False}


@pytest.mark.parametrize(
    ("cls", "rows", "infer"),
    [
        (MLPClassifier, _phishing, "predict_proba_one"),
        (MLPRegressor, _trump, "predict_one"),
    ],
)
def test_pickle_round_trip_predicts_and_learns_the_same(
    cls: type[MLPClassifier | MLPRegressor], rows: Callable[[int], list[Any]], infer: str
) -> None:
    data = rows(400)
    model = cls(seed=2)
    for x, y in data[:200]:
        model.learn_one(x, y)
    blob = pickle.dumps(model)
    # only safetensors + JSON
    assert b"torch.nn" not in blob and b"stream_trainer.engine" not in blob
    restored = pickle.loads(blob)
    assert repr(restored) == repr(model)
    for x, y in data[200:]:
        assert getattr(restored, infer)(x) == getattr(model, infer)(x)
        model.learn_one(x, y)
        restored.learn_one(x, y)
    assert restored.trainer.state_json() == model.trainer.state_json()


def test_an_unknown_pickle_format_is_refused() -> None:
    state = MLPRegressor().__getstate__()
    _, tensors, document = state["_trainer_state"]
    state["_trainer_state"] = (99, tensors, document)
    with pytest.raises(CheckpointError, match="pickled estimator format 99 is not 1"):
        MLPRegressor.__new__(MLPRegressor).__setstate__(state)


def test_a_tampered_pickled_state_is_refused_before_use() -> None:
    """The trainer state inside a pickled estimator is validated as a checkpoint's is: a NaN
    weight, or tensor bytes that are not safetensors, stop the unpickling with a reason."""
    import safetensors.torch

    model = MLPClassifier(hidden=(8,), seed=0)
    for x, y in _phishing(20):
        model.learn_one(x, y)
    state = model.__getstate__()
    version, tensors, document = state["_trainer_state"]
    loaded = safetensors.torch.load(tensors)
    loaded["model.head.weight"][0, 0] = float("nan")
    bad = {**state, "_trainer_state": (version, safetensors.torch.save(loaded), document)}
    with pytest.raises(CheckpointError, match="NaN"):
        MLPClassifier.__new__(MLPClassifier).__setstate__(bad)
    garbage = {**state, "_trainer_state": (version, b"not safetensors", document)}
    with pytest.raises(CheckpointError, match="tensors unreadable"):
        MLPClassifier.__new__(MLPClassifier).__setstate__(garbage)
    # the string document of an estimator pickled before the bytes form still reads
    old = {**state, "_trainer_state": (version, tensors, document.decode())}
    restored = MLPClassifier.__new__(MLPClassifier)
    restored.__setstate__(old)
    assert restored.trainer.state_json() == model.trainer.state_json()


def test_clone_is_a_fresh_model_with_the_same_settings() -> None:
    model = MLPClassifier(hidden=(8,), norm="layer", seed=4)
    for x, y in _phishing(50):
        model.learn_one(x, y)
    clone = model.clone()
    assert clone._get_params() == model._get_params()
    assert clone.trainer.samples_trained == 0 and clone.predict_proba_one(_phishing(1)[0][0]) == {}


def test_pipeline_in_progressive_val_score_beats_the_majority_class() -> None:
    dataset = _phishing(600)
    ours = evaluate.progressive_val_score(
        dataset, preprocessing.StandardScaler() | MLPClassifier(seed=0), metrics.Accuracy()
    )
    majority = evaluate.progressive_val_score(
        dataset, dummy.NoChangeClassifier(), metrics.Accuracy()
    )
    assert ours.get() > 0.85 > majority.get()


def test_regressor_in_progressive_val_score_beats_the_running_mean() -> None:
    dataset = _trump(600)
    ours = evaluate.progressive_val_score(
        dataset, preprocessing.StandardScaler() | MLPRegressor(seed=0), metrics.MAE()
    )
    mean = evaluate.progressive_val_score(
        dataset, dummy.StatisticRegressor(stats.Mean()), metrics.MAE()
    )
    assert ours.get() < 0.5 * mean.get()


def test_rejected_records_learn_nothing_and_never_raise() -> None:
    model = MLPClassifier(hidden=(8,), seed=0)
    good = _phishing(100)
    for x, y in good:
        model.learn_one(x, y)
    before = pickle.dumps(model)
    x0 = dict(good[0][0])
    bad: list[tuple[dict[Any, Any], Any]] = [
        ({**x0, "empty_server_form_handler": math.nan}, True),
        ({**x0, "popup_window": math.inf}, False),
        ({**x0, "https": [1, 2]}, True),
        ({**x0, "age_of_domain": "old"}, True),  # a category where numbers were seen
        ({}, True),
        (x0, 1.5),  # not a class label
        (x0, [True]),
    ]
    for x, y in bad:
        model.learn_one(x, y)
    assert model.rejected == {"non_finite": 2, "wrong_type": 2, "no_features": 1, "bad_label": 2}
    # nothing but the rejection counters changed
    restored = pickle.loads(before)
    assert restored.trainer.samples_trained == model.trainer.samples_trained == 100
    for x, _ in good[:20]:
        assert model.predict_proba_one(x) == restored.predict_proba_one(x)
    for x, _ in bad[:5]:
        assert model.predict_proba_one(x) == {} and model.predict_one(x) is None
    assert model.learn_one(x0, None) is None and model.trainer.samples_trained == 100


def test_regressor_predicts_the_target_mean_for_a_rejected_record() -> None:
    model = MLPRegressor(hidden=(8,), seed=0)
    assert model.predict_one({"x": 1.0}) == 0.0
    targets = [float(10 + i % 5) for i in range(50)]
    for i, y in enumerate(targets):
        model.learn_one({"x": float(i % 5)}, y)
    model.learn_one({"x": 1.0}, "twelve")
    model.learn_one({"x": 1.0}, math.nan)  # a bad label here; a missing one in a Series
    model.learn_many(pd.DataFrame({"x": [1.0, 2.0]}), pd.Series([math.nan, None]))
    assert model.rejected == {"bad_label": 2} and model.trainer.samples_trained == 50
    assert model.predict_one({"x": math.nan}) == pytest.approx(np.mean(targets))
    assert model.predict_many(pd.DataFrame({"x": [1.0, math.inf]})).iloc[1] == pytest.approx(12.0)


def test_class_labels_come_back_as_the_objects_river_gave() -> None:
    for labels in ([0, 1, 2], ["cat", "dog", "eel"], [np.int64(0), np.int64(1), np.int64(2)]):
        model = MLPClassifier(hidden=(8,), seed=0)
        for i in range(90):
            model.learn_one({"x": float(i % 3), "z": "abc"[i % 3]}, labels[i % 3])
        proba = model.predict_proba_one({"x": 2.0, "z": "c"})
        assert list(proba) == labels and math.isclose(sum(proba.values()), 1.0)
        assert model.predict_one({"x": 2.0, "z": "c"}) == labels[2]
        frame = model.predict_proba_many(pd.DataFrame({"x": [0.0, 1.0], "z": ["a", "b"]}))
        assert list(frame.columns) == labels
        assert list(model.predict_many(pd.DataFrame({"x": [0.0], "z": ["a"]}))) == [labels[0]]


def test_nan_cells_of_a_frame_are_missing_features() -> None:
    model = MLPRegressor(hidden=(8,), seed=0)
    X = pd.DataFrame({"a": [1.0, 2.0, math.nan], "b": [math.nan, 1.0, 2.0]})
    model.learn_many(X, pd.Series([1.0, 2.0, 3.0]))
    assert model.rejected == {} and model.trainer.samples_trained == 3
    assert model.predict_many(X).tolist() == [
        model.predict_one({"a": 1.0}),
        *[model.predict_one(x) for x in ({"a": 2.0, "b": 1.0}, {"b": 2.0})],
    ]


def test_module_docstring_example_runs() -> None:
    """The progressive_val_score example (Phishing, beside river's LogisticRegression)."""
    result = doctest.testmod(stream_trainer.river, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


def test_docs_example_runs() -> None:
    result = doctest.testfile(str(DOCS), module_relative=False)
    assert result.attempted >= 3 and result.failed == 0
