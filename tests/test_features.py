"""FeatureEncoder and RunningStandardizer: the documented policy, and exact running statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stream_trainer.features import OTHER_CATEGORY, FeatureEncoder, RunningStandardizer
from stream_trainer.features.encoder import _BATCH_SCREEN_ROWS
from stream_trainer.features.standardizer import WARMUP
from stream_trainer.records import RejectReason


def test_numeric_features_are_standardized_with_running_moments() -> None:
    enc = FeatureEncoder(target="y")
    xs = [1.0, 2.0, 6.0, -3.0]
    out = [enc.fit_transform([{"a": x, "y": 0}])[0, 0] for x in xs]
    # Each record is scaled with the statistics *including* itself (labels are not involved).
    for i, x in enumerate(xs):
        seen = np.array(xs[: i + 1])
        std = seen.std() if i > 0 and seen.std() > 0 else 1.0
        assert out[i] == pytest.approx((x - seen.mean()) / std, abs=1e-6)
    assert enc.column_names() == ["a"]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=60),
    st.lists(st.integers(1, 9), min_size=1, max_size=20),
)
def test_standardizer_batches_merge_to_the_exact_moments(
    values: list[float], cuts: list[int]
) -> None:
    scaler = RunningStandardizer(1)
    x = np.array(values)[:, None]
    pos = 0
    for cut in [*cuts, len(values)]:
        scaler.update(x[pos : pos + cut])
        pos += cut
    assert scaler.count[0] == len(values)
    assert scaler.mean[0] == pytest.approx(x.mean(), rel=1e-9, abs=1e-6)
    assert scaler.m2[0] / len(values) == pytest.approx(x.var(), rel=1e-6, abs=1e-3)


def test_categories_one_hot_with_an_overflow_bucket() -> None:
    enc = FeatureEncoder(target="y", max_categories=2)
    out = enc.fit_transform([{"c": "a"}, {"c": "b"}, {"c": "c"}, {"c": "d"}, {"c": "a"}])
    assert enc.column_names() == ["c=a", "c=b", f"c={OTHER_CATEGORY}"]
    np.testing.assert_array_equal(out, [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]])


def test_new_and_missing_features_mid_stream() -> None:
    enc = FeatureEncoder(target="y")
    first = enc.fit_transform([{"a": 1.0, "y": 1}, {"a": 3.0, "y": 0}])
    assert first.shape == (2, 1)
    later = enc.fit_transform([{"a": 2.0, "b": 5.0, "c": "x"}, {"b": 7.0, "a": None}])
    assert enc.column_names() == ["a", "b", "c=x"]  # growth only appends
    assert later.shape == (2, 3)
    assert later[1, 0] == 0.0  # missing numeric -> running mean -> 0
    assert later[1, 2] == 0.0  # missing category -> no category
    assert np.isfinite(later).all()


def test_kind_is_fixed_by_the_first_value() -> None:
    enc = FeatureEncoder(target="y")
    enc.fit_transform([{"a": 1.0, "c": "x"}])
    assert enc.check({"a": "junk"})[0] is RejectReason.WRONG_TYPE  # type: ignore[index]
    assert enc.check({"c": 3})[0] is RejectReason.WRONG_TYPE  # type: ignore[index]
    assert enc.check({"a": None, "c": "new", "y": "label"}) is None


def test_features_restrict_the_columns() -> None:
    enc = FeatureEncoder(target="y", features=["b"])
    out = enc.fit_transform([{"a": 1.0, "b": 2.0, "y": 1}, {"a": 5.0, "b": 4.0}])
    assert enc.column_names() == ["b"] and out.shape == (2, 1)


def test_outliers_are_clipped() -> None:
    enc = FeatureEncoder(target=None, clip=3.0)
    enc.fit_transform([{"a": 0.0}, {"a": 1.0}] * 50)
    assert enc.fit_transform([{"a": 1e9}])[0, 0] == 3.0


def test_transform_is_read_only_and_state_round_trips_through_json() -> None:
    enc = FeatureEncoder(target="y", max_categories=3)
    enc.fit_transform([{"a": 1.0, "c": "x", "b": True}, {"a": 4.0, "c": "y", "b": False}])
    state = json.loads(json.dumps(enc.state()))
    served = enc.transform([{"a": 2.0, "c": "unseen", "z": 1.0}])
    assert served.shape == (1, enc.n_columns) and served[0, 1:].sum() == 0.0
    assert enc.state() == state
    copy = FeatureEncoder.from_state(state)
    batch = [{"a": 9.0, "c": "w", "new": 1.0}, {"a": -1.0, "c": "x"}]
    np.testing.assert_array_equal(copy.fit_transform(batch), enc.fit_transform(batch))
    assert copy.state() == enc.state()


_FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**1100), max_value=2**1100),
    st.integers(min_value=-3, max_value=3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e6, max_value=1e6),
    st.sampled_from([math.nan, math.inf, -math.inf, 2**53, 2**53 + 1, -(2**1030)]),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=1), st.integers(), max_size=1),
)


@settings(max_examples=400, deadline=None)
@example({"a": math.nan, "c": 1.0}, None)
@example({"c": math.inf}, None)
@example({"a": 2**1030}, None)
@example({"b": 2.0, "a": "x"}, None)
@example({"y": 1}, None)
@given(
    st.dictionaries(st.sampled_from(["a", "b", "c", "y", "new"]), _FIELD_VALUES, max_size=5),
    st.sampled_from([None, ("a", "b", "c")]),
)
def test_check_record_answers_exactly_as_the_two_reference_checks(
    value: dict[str, object], features: tuple[str, ...] | None
) -> None:
    """The one-pass check of the trainer's hot path against check_values then check, on an
    encoder that has seen a numeric ``a``, a categorical ``b`` and no ``c`` (target ``y``)."""
    from stream_trainer.records import check_values

    enc = FeatureEncoder(target="y", features=features)
    enc.fit_transform([{"a": 1.0, "b": "x", "y": 1}])
    limits = {"max_abs_value": enc.max_abs_value, "max_string_length": enc.max_string_length}
    expected = check_values(value, "y", **limits) or enc.check(value)
    assert enc.check_record(value) == expected


_NUMERIC_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(min_value=-1e6, max_value=1e6),
    st.sampled_from([math.nan, math.inf, 1e100, -1e100, int(1e100) + 1, 10**100, 2**1100, "1.5"]),
)


@settings(max_examples=300, deadline=None)
@example([{"a": 1.0, "c": 2.0, "y": 1}, {"a": 1e100, "c": -1e100}], None)
@example([{"a": 10**100, "c": 2**1100, "y": 0}], None)
@example([{"a": int(1e100) + 1, "c": 1.0}], None)
@example([{"a": None, "c": None}, {"a": 1.0}], None)
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["a", "c", "y", "b", "new"]), _NUMERIC_VALUES, max_size=5)
        | st.fixed_dictionaries({"a": _NUMERIC_VALUES, "c": _NUMERIC_VALUES, "y": st.integers()}),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([None, ("a", "c")]),
)
def test_batch_screen_and_encode_answer_as_the_record_paths(
    values: list[dict[str, object]], features: tuple[str, ...] | None
) -> None:
    """``screen`` (a batch of known numeric features at once) gives each record
    ``screen_record``'s answer, limits and their neighbours included, on an encoder that knows the
    numeric ``a`` and ``c`` (target ``y``); the accepted records encode as one at a time."""
    enc = FeatureEncoder(target="y", features=features)
    enc.fit_transform([{"a": 1.0, "c": 2.0, "y": 1}, {"a": 3.0, "c": -1.0, "y": 0}])
    # repeated up to the batch path's size (a smaller batch is screened record by record)
    values = values * -(-_BATCH_SCREEN_ROWS // len(values))
    outcomes = enc.screen(values)
    assert outcomes == [enc.screen_record(value) for value in values]
    accepted = [v for v, o in zip(values, outcomes, strict=True) if o is False]
    if accepted:
        raw = [[math.nan if (v := value.get(n)) is None else v for n in "ac"] for value in accepted]
        expected = enc.scaler.transform(np.array(raw, dtype=np.float64)).astype(np.float32)
        np.testing.assert_array_equal(enc.transform(accepted), expected)


def test_one_outlier_does_not_swamp_the_running_statistics() -> None:
    """After WARMUP values a column's statistics see each value clipped to clip * std: one
    absurd value moves the mean by at most clip * std / n, and values within the band give the
    exact moments."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(200, 1))
    exact = RunningStandardizer(1)
    exact.update(x)
    np.testing.assert_allclose(exact.mean, x.mean(0))
    np.testing.assert_allclose(exact.std(), x.std(0))

    robust = RunningStandardizer(1)
    robust.update(x)
    robust.update(np.array([[2.0**62]]))
    bound = x.mean(0) + 10 * x.std(0)
    np.testing.assert_allclose(robust.mean, (x.sum(0) + bound) / 201)
    assert robust.std()[0] < 3 * x.std(0)[0]

    # Before WARMUP values nothing is clipped: the first values define the scale.
    early = RunningStandardizer(1)
    early.update(np.array([[1.0]] * (WARMUP - 1) + [[1e6]]))
    assert early.mean[0] == pytest.approx((WARMUP - 1 + 1e6) / WARMUP)


def test_a_one_record_batch_is_clipped_as_a_larger_one() -> None:
    """The plain-Python check of a one-row batch and the numpy one agree, NaN included."""
    rng = np.random.default_rng(1)
    scaler = RunningStandardizer(4)
    scaler.update(rng.normal(size=(50, 4)))
    scaler.grow(5)  # a new column, below WARMUP: never clipped
    row = np.array([[1e9, 0.1, np.nan, -1e9, 1e9]])
    one = scaler._clipped(row)
    two = scaler._clipped(np.vstack([row, row]))
    np.testing.assert_array_equal(one, two[:1])
    assert one[0, 0] < 20 and one[0, 3] > -20 and np.isnan(one[0, 2]) and one[0, 4] == 1e9
    within = np.array([[0.1, 0.2, 0.3, np.nan, 5.0]])
    assert scaler._clipped(within) is within  # nothing to clip: the batch itself, no copy
