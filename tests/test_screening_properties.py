"""Property tests of the screening contract: for any JSON-ish records in batches of any size, the
step never raises, every record is accepted or rejected, what is accepted leaves a state that
survives JSON unchanged and restores to a trainer that predicts the same, and a batch of rejected
records changes nothing but the counters."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_trainer.records import Record
from stream_trainer.training import IncrementalTrainer, TrainerConfig

_ODD_STRINGS = ["\ud800", "\udfff", "e\u0301", "\x00", "\U0001f600", "\ufeff", "", "<other>", "y"]

# Ordinary values most of the time, so that most records pass and the batches mix kinds.
_GOOD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.floats(min_value=-1e3, max_value=1e3),
    st.sampled_from(["x", "z", "\u00e9", "1"]),
)
_HOSTILE = st.one_of(
    st.integers(min_value=-(2**700), max_value=2**700),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e18, 1.7e18, 1e100, 1e154, -1e200, 2**53 + 1, math.nan, math.inf]),
    st.text(max_size=12),
    st.sampled_from(_ODD_STRINGS),
)
_SCALARS = st.one_of(_GOOD, _HOSTILE)
_NESTED = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=2), inner, max_size=2)
    ),
    max_leaves=4,
)
_VALUES = st.integers(0, 9).flatmap(lambda k: _GOOD if k < 7 else (_HOSTILE if k < 9 else _NESTED))
# A few recurring names (so kinds and categories are decided, then tested) and arbitrary new ones.
_NAMES = st.integers(0, 9).flatmap(
    lambda k: (
        st.sampled_from(["a", "b", "c", "d"])
        if k < 7
        else (st.text(max_size=10) if k < 9 else st.integers(0, 2))
    )
)
_RECORD = st.dictionaries(_NAMES, _VALUES, min_size=1, max_size=6).flatmap(
    lambda value: st.one_of(
        st.just(value),
        _NESTED.map(lambda label: {**value, "y": label}),
        st.sampled_from([0, 1, 2, "cat", "dog", 0.5, -2.25, None]).map(lambda y: {**value, "y": y}),
    )
)
_WIDE = st.integers(min_value=3, max_value=40).map(
    lambda n: {**{f"w{n}_{i}": float(i) for i in range(n)}, "y": n % 3}
)
_BATCHES = st.lists(st.lists(st.one_of(_RECORD, _WIDE), max_size=9), min_size=1, max_size=6)

_CONFIGS = [
    {},  # the default limits
    {
        "max_features": 6,
        "max_new_features_per_record": 4,
        "max_classes": 3,
        "max_string_length": 8,
        "max_abs_value": 1e6,
        "max_categories": 2,
    },
    {"task": "regression", "max_features": 30, "max_abs_value": 1e9},
    {"max_features": 4, "max_categories": 8},  # full early: later categories find no column
]


def _same_predictions(a: list[Any], b: list[Any]) -> bool:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, float) and isinstance(y, float):
            if not math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6):
                return False
        elif x != y:
            return False
    return True


def _counters_aside(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in ("rejected", "steps")}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batches=_BATCHES, limits=st.sampled_from(_CONFIGS))
def test_screening_contract(batches: list[list[dict[Any, Any]]], limits: dict[str, Any]) -> None:
    config = TrainerConfig(target="y", hidden=(4,), seed=0, **limits)
    trainer = IncrementalTrainer(config)
    for values in batches:
        records = [Record(value) for value in values]
        before = trainer.state_json()
        tensors_before = trainer.state_tensors()
        report = trainer.step(records)  # never raises

        assert len(report.accepted) + len(report.rejected) == len(records)
        assert report.trained + report.predicted_only == len(report.accepted)
        assert sum(trainer.rejected.values()) >= len(report.rejected)
        assert trainer.encoder.n_columns <= config.max_features
        assert len(trainer.classes) <= config.max_classes
        if trainer.model is not None:
            assert trainer.model.in_features <= config.max_features

        # The screen's plan of new columns and the encoder's growth agree: every feature of an
        # accepted record is registered, none silently dropped for want of a column.
        for record in report.accepted:
            for name, v in record.value.items():
                if v is not None and name != "y":
                    assert name in trainer.encoder.kinds

        state = trainer.state_json()
        text = json.dumps(state, allow_nan=False)  # a checkpoint holds strict JSON
        assert json.loads(text) == state

        if not report.accepted:
            assert _counters_aside(state) == _counters_aside(before)
            after = trainer.state_tensors()
            assert after.keys() == tensors_before.keys()
            assert all(after[k].equal(tensors_before[k]) for k in after)
            continue
        restored = IncrementalTrainer.from_state(trainer.state_tensors(), json.loads(text))
        assert restored.state_json() == state
        probe = [Record(dict(r.value)) for r in report.accepted]
        assert _same_predictions(restored.predict_many(probe), trainer.predict_many(probe))
