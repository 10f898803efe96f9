"""Stored bytes as untrusted input: bounded JSON, and the trainer state's structural validation.

The property tests mutate a real trainer state at random (a key removed, a value replaced by any
JSON value, a tensor reshaped or retyped) and require that :func:`restore_trainer` either refuses
it with a ``CheckpointError`` or gives a trainer that steps, predicts and checkpoints again.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_trainer.checkpoints import CheckpointInvalidError
from stream_trainer.checkpoints.validation import json_depth, load_json
from stream_trainer.errors import CheckpointError
from stream_trainer.records import Record
from stream_trainer.training import IncrementalTrainer, TrainerConfig
from stream_trainer.training.state_validation import restore_trainer, validate_trainer_state

_TEXT = st.text(alphabet='ab[]{}"\\:, \n\u00e9', max_size=6)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=12,
)  # fmt: skip


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(value=_JSON, ascii_only=st.booleans())
def test_json_depth_is_the_nesting_of_the_document(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth(text) == _depth(value)
    assert load_json(text, max_depth=_depth(value)) == value


@pytest.mark.parametrize(
    ("document", "why"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "nested 200000 deep"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested 100000 deep"),
        (b"[" * 200_000, "nested 200000 deep"),  # never closed: still refused before parsing
        (b'{"x": NaN}', "NaN is not a finite number"),
        (b'{"x": -Infinity}', "-Infinity is not a finite number"),
        (b'{"x": 1e999}', "is not a finite float"),
        (b'{"x": ' + b"9" * 5000 + b"}", "digits"),
        (b'{"x": "\xff"}', "not UTF-8"),
    ],
)
def test_hostile_json_is_refused_with_a_reason(document: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        load_json(document, max_depth=64)


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"k": "[[[[" * 1000, "e": '\\"[[[', "l": [[1]]}).encode()
    assert json_depth(text) == 3


# ------------------------------------------------------------------ trainer state


CONFIGS = [
    {},
    {"norm": "batch_renorm", "optimizer": "sgd"},
    {"norm": "layer", "linear_expert": False, "skip": False, "weight_standardization": True},
    {"task": "regression", "norm": ("ema_batch", "online"), "hidden": (8, 4)},
    {"norm": "batch", "dropout": 0.2, "optimizer": "adamw"},
    {"norm": "group"},
    {"norm": "rms"},
    {"norm": "none", "features": ("x",)},
]


def _records(n: int, regression: bool) -> list[Record]:
    rows = []
    for i in range(6):
        label: Any = i * 0.5 if regression else i % (2 + n)
        rows.append(Record({"x": float(i % 3), f"c{n}": "abc"[i % 3], "y": label}))
    return rows


def _trained(config: dict[str, Any], rounds: int = 2) -> IncrementalTrainer:
    options = dict(config)
    trainer = IncrementalTrainer(
        TrainerConfig(target="y", hidden=options.pop("hidden", (8,)), seed=0, **options)
    )
    for n in range(rounds):
        records = _records(n, trainer.config.task == "regression")
        trainer.step(records)
        trainer.step(records[:1])
        trainer.step([Record({"x": 1.0, "z": 2.0})])  # predicted only, a new feature
    return trainer


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
@pytest.mark.parametrize("rounds", [0, 1, 3])
def test_every_state_a_trainer_writes_validates_and_restores(
    config: dict[str, Any], rounds: int
) -> None:
    trainer = _trained(config, rounds)
    state = json.loads(json.dumps(trainer.state_json()))
    validate_trainer_state(trainer.state_tensors(), state, fingerprint=trainer.config.fingerprint())
    restored = restore_trainer(trainer.state_tensors(), state)
    assert restored.samples_trained == trainer.samples_trained
    records = _records(0, trainer.config.task == "regression")
    assert restored.predict_many(records) == trainer.predict_many(records)
    restored.step(records)


def test_model_dims_of_two_billion_are_refused_before_any_allocation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer = _trained({})
    state = json.loads(json.dumps(trainer.state_json()))
    state["model_dims"] = [2_000_000_000, 2]
    state["encoder"]["n_columns"] = 2_000_000_000
    built: list[int] = []
    real = IncrementalTrainer._build_model
    monkeypatch.setattr(
        IncrementalTrainer, "_build_model", lambda self, *a: built.append(1) or real(self, *a)
    )
    with pytest.raises(CheckpointInvalidError, match=r"model in_features|n_columns") as info:
        restore_trainer(trainer.state_tensors(), state)
    assert info.value.reason == "state" and built == []


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:4]):
            out += _paths(item, (*prefix, index))
    return out


_BASE = _trained({}, rounds=2)
_BASE_STATE = json.loads(json.dumps(_BASE.state_json()))
_BASE_TENSORS = _BASE.state_tensors()
_STATE_PATHS = _paths(_BASE_STATE)
_DTYPES = [torch.float32, torch.float64, torch.int64, torch.uint8]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    path=st.sampled_from(_STATE_PATHS),
    action=st.sampled_from(["delete", "replace"]),
    value=_JSON,
    tensor=st.sampled_from(sorted(_BASE_TENSORS)),
    tensor_action=st.sampled_from(["keep", "reshape", "retype", "delete", "scale"]),
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
    dtype=st.sampled_from(_DTYPES),
)
def test_a_mutated_state_is_refused_or_restores_to_a_working_trainer(
    path: tuple[Any, ...],
    action: str,
    value: Any,
    tensor: str,
    tensor_action: str,
    shape: list[int],
    dtype: torch.dtype,
) -> None:
    state = copy.deepcopy(_BASE_STATE)
    parent = state
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    tensors = dict(_BASE_TENSORS)
    if tensor_action == "reshape":
        tensors[tensor] = torch.zeros(shape, dtype=tensors[tensor].dtype)
    elif tensor_action == "retype":
        tensors[tensor] = tensors[tensor].to(dtype)
    elif tensor_action == "delete":
        del tensors[tensor]
    elif tensor_action == "scale" and tensors[tensor].is_floating_point():
        tensors[tensor] = tensors[tensor] * -3.0
    try:
        trainer = restore_trainer(tensors, state)
    except CheckpointError:
        return
    # Accepted: it must work as a trainer, and what it saves must be accepted again.
    records = _records(1, trainer.task == "regression")
    trainer.predict_many(records)
    trainer.step(records)
    again = json.loads(json.dumps(trainer.state_json(), allow_nan=False))
    validate_trainer_state(trainer.state_tensors(), again)


def test_states_written_before_later_settings_still_validate() -> None:
    """A version-1 state (no ``skip``, ``lr_scale_min``, ``lr_decay_samples``) and one from
    before the linear expert and ``momentum_in_samples`` (no keys, no mixture) validate and
    restore, as :meth:`IncrementalTrainer.from_state` upgrades them."""
    old = {
        "skip": False,
        "lr_scale_min": 0.0,
        "lr_decay_samples": None,
        "linear_expert": False,
        "momentum_in_samples": False,
    }
    trainer = _trained(old)
    state = json.loads(json.dumps(trainer.state_json()))
    state["version"] = 1
    for key in old:
        del state["config"][key]
    del state["mixture"]
    validate_trainer_state(trainer.state_tensors(), state, fingerprint=trainer.config.fingerprint())
    restored = restore_trainer(trainer.state_tensors(), state)
    assert restored.config == trainer.config and restored.expert is None
