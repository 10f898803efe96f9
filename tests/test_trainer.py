"""IncrementalTrainer: protocol, bad input, determinism, exactly-once state round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stream_trainer.errors import ConfigError
from stream_trainer.norms import registered_norm_names
from stream_trainer.records import Record
from stream_trainer.training import IncrementalTrainer, TrainerConfig
from stream_trainer.training.config import EXECUTION_SETTINGS, SCREENING_SETTINGS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _records(n: int, seed: int = 0, *, n_classes: int = 2, start: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        x1, x2 = rng.normal(size=2)
        label = int(x1 + 0.5 * x2 > 0) if n_classes == 2 else int(rng.integers(0, n_classes))
        out.append(Record({"x1": float(x1), "x2": float(x2), "c": "abc"[i % 3], "y": label}))
    return out


def _run(trainer: IncrementalTrainer, records: list[Record], sizes: list[int]) -> None:
    pos = 0
    for size in sizes:
        trainer.step(records[pos : pos + size])
        pos += size


def _assert_same(a: IncrementalTrainer, b: IncrementalTrainer) -> None:
    ta, tb = a.state_tensors(), b.state_tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert json.dumps(a.state_json(), sort_keys=True) == json.dumps(b.state_json(), sort_keys=True)
    assert a.metrics() == b.metrics()


def test_step_predicts_scores_then_learns() -> None:
    trainer = IncrementalTrainer(TrainerConfig(target="y", hidden=(8,), seed=0))
    records = _records(3)
    first = trainer.step(records)
    assert first.proba is None  # no model before the first labelled batch: unscored
    assert first.trained == 3 and trainer.samples_trained == 3
    assert trainer.metrics()["accuracy"] == 0.0 and trainer.unscored == 3
    second = trainer.step(_records(2, seed=1))
    assert second.proba is not None and second.proba.shape == (2, 2)
    np.testing.assert_allclose(second.proba.sum(axis=1), 1.0)
    assert second.loss is not None and math.isfinite(second.loss)
    assert second.predictions()[0] in ("0", "1")


def test_records_without_label_are_predicted_not_learned() -> None:
    trainer = IncrementalTrainer(TrainerConfig(target="y", hidden=(8,), seed=0))
    trainer.step(_records(10))
    before = {k: v.clone() for k, v in trainer.state_tensors().items()}
    unlabelled = [
        Record({"x1": 0.1, "x2": 0.2, "c": "a"}),
        Record({"x1": 1.0, "c": "b", "y": None}),
    ]
    report = trainer.step(unlabelled)
    assert report.predicted_only == 2 and report.trained == 0
    assert report.proba is not None and len(report.predictions()) == 2
    assert trainer.predicted_only == 2 and trainer.samples_trained == 10
    after = trainer.state_tensors()
    for key in before:
        if key.startswith("optim.") or key.endswith(("weight", "bias")):
            assert torch.equal(before[key], after[key]), key
    # A mixed batch learns from the labelled records only.
    mixed = trainer.step([*_records(3, seed=2), Record({"x1": 0.0, "x2": 0.0, "c": "a", "y": ""})])
    assert (mixed.trained, mixed.predicted_only) == (3, 1)
    # The first 10 had no model to predict them (unscored): 3 labelled records are scored.
    assert trainer.unscored == 10 and trainer.cls_metrics.n == 3
    assert trainer.metrics()["accuracy"] * 3 == pytest.approx(
        round(trainer.metrics()["accuracy"] * 3)
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"x1": float("nan"), "x2": 0.0, "y": 1}, "non_finite"),
        ({"x1": float("inf"), "x2": 0.0, "y": 1}, "non_finite"),
        ({"x1": "junk", "x2": 0.0, "y": 1}, "wrong_type"),
        ({"x1": [1, 2], "x2": 0.0, "y": 1}, "wrong_type"),
        ({"x1": 0.5, "x2": 0.0, "y": 1.5}, "bad_label"),
        ({"x1": 0.5, "x2": 0.0, "y": [1]}, "bad_label"),
        ({"y": 1}, "no_features"),
    ],
)
def test_bad_records_are_counted_by_reason_and_never_reach_the_model(
    value: dict[str, object], reason: str
) -> None:
    trainer = IncrementalTrainer(TrainerConfig(target="y", hidden=(8,), seed=0))
    trainer.step([Record({"x1": 0.1, "x2": 0.3, "y": 0}), Record({"x1": -0.1, "x2": 0.2, "y": 1})])
    seen: list[torch.Tensor] = []
    assert trainer.model is not None
    trainer.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    report = trainer.step([Record(value), Record({"x1": 0.2, "x2": 0.1, "y": 1})])
    assert [r.reason.value for r in report.rejected] == [reason]
    assert trainer.rejected == {reason: 1}
    assert report.trained == 1 and trainer.samples_trained == 3
    assert all(t.shape[0] == 1 and torch.isfinite(t).all() for t in seen)


def test_regression_task() -> None:
    rng = np.random.default_rng(0)
    trainer = IncrementalTrainer(TrainerConfig(target="y", hidden=(16,), lr=1e-2, seed=0))
    for _ in range(300):
        x = rng.normal(size=(4, 2))
        y = 10.0 + 3.0 * x[:, 0] - 2.0 * x[:, 1] + 0.1 * rng.normal(size=4)
        trainer.step(
            [
                Record({"a": float(r[0]), "b": float(r[1]), "y": float(t)})
                for r, t in zip(x, y, strict=True)
            ]
        )
    assert trainer.task == "regression"
    m = trainer.metrics()
    assert set(m) == {"mae", "rmse", "r2"} and m["r2"] > 0.8
    pred = trainer.predict_many([Record({"a": 1.0, "b": 0.0}), Record({"a": 0.0, "b": 1.0})])
    assert pred[0] == pytest.approx(13.0, abs=1.5) and pred[1] == pytest.approx(8.0, abs=1.5)
    report = trainer.step([Record({"a": 0.0, "b": 0.0, "y": "ten"})])
    assert report.rejected[0].reason.value == "bad_label"


def test_same_seed_gives_bit_identical_weights_and_other_seeds_differ() -> None:
    records = _records(120)
    sizes = [1, 5, 2, 40, 1, 1, 30, 40]
    runs = []
    for seed in (3, 3, 4):
        t = IncrementalTrainer(TrainerConfig(target="y", dropout=0.2, seed=seed))
        _run(t, records, sizes)
        runs.append(t.state_tensors())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
    assert not torch.equal(runs[0]["model.head.weight"], runs[2]["model.head.weight"])


def test_trainers_in_one_process_do_not_disturb_each_other() -> None:
    records = _records(60)
    alone = IncrementalTrainer(TrainerConfig(target="y", dropout=0.3, seed=1))
    _run(alone, records, [4] * 15)
    a = IncrementalTrainer(TrainerConfig(target="y", dropout=0.3, seed=1))
    other = IncrementalTrainer(TrainerConfig(target="y", dropout=0.3, seed=2))
    for i in range(15):
        a.step(records[4 * i : 4 * i + 4])
        other.step(records[4 * i : 4 * i + 4])
        torch.rand(3)  # someone else drawing from the global generator
    _assert_same(alone, a)


@pytest.mark.parametrize("norm", registered_norm_names())
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_state_round_trip_continues_bit_identically(norm: str, dropout: float) -> None:
    """A runs k steps; B = from_state(A's state through JSON); both take the same further steps
    (including a new class and a new feature) and end bit-identical."""
    config = TrainerConfig(target="y", norm=norm, hidden=(16, 8), dropout=dropout, seed=7)
    records = _records(90, n_classes=2)
    a = IncrementalTrainer(config)
    _run(a, records, [1, 7, 3, 1, 20])
    tensors = {k: v.clone() for k, v in a.state_tensors().items()}
    state = json.loads(json.dumps(a.state_json()))
    b = IncrementalTrainer.from_state(tensors, state)
    _assert_same(a, b)
    more = [
        *records[32:60],
        Record({"x1": 0.3, "x2": -1.0, "c": "z", "new": 2.5, "y": 2}),  # new class + new feature
        *records[60:],
    ]
    for t in (a, b):
        torch.manual_seed(12345)  # the global generator must not matter
        _run(t, more, [1, 4, 1, 16, 7, 1, 30])
    _assert_same(a, b)
    assert a.classes == b.classes == ["1", "0", "2"] or a.classes == b.classes == ["0", "1", "2"]


def test_state_json_is_pure_json_and_versioned() -> None:
    trainer = IncrementalTrainer(TrainerConfig(target="y", optimizer="adamw", seed=0))
    _run(trainer, _records(20), [1, 19])
    state = trainer.state_json()
    assert json.loads(json.dumps(state, allow_nan=False)) == state
    assert state["version"] == 2
    state["version"] = 99
    with pytest.raises(ConfigError, match="version"):
        IncrementalTrainer.from_state(trainer.state_tensors(), state)


def test_version_1_state_is_upgraded_with_the_settings_it_ran_with() -> None:
    """A version-1 state has no ``skip``/``lr_scale_min``/``lr_decay_samples``: it ran without."""
    old = {"skip": False, "lr_scale_min": 0.0, "lr_decay_samples": None}
    trainer = IncrementalTrainer(TrainerConfig(target="y", seed=0, **old))  # type: ignore[arg-type]
    _run(trainer, _records(30), [1, 29])
    state = json.loads(json.dumps(trainer.state_json()))
    state["version"] = 1
    for key in old:
        del state["config"][key]
    restored = IncrementalTrainer.from_state(trainer.state_tensors(), state)
    assert restored.config == trainer.config
    assert restored.model is not None and restored.model.skip is None
    _assert_same(trainer, restored)


def test_learning_rate_decays_with_the_samples_learned_to_a_floor() -> None:
    config = TrainerConfig(
        target="y", lr=1e-2, lr_scaling="none", lr_decay_samples=10, lr_decay_floor=0.5, seed=0
    )
    trainer = IncrementalTrainer(config)
    records = _records(60)
    lrs = []
    for size in (10, 20, 30):  # decay from the samples learned *before* each step
        trainer.step(records[:size])
        assert trainer.optimizer is not None
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-2, 1e-2 / math.sqrt(2), 1e-2 * 0.5])


def test_lr_scale_min_keeps_small_batches_at_the_base_rate() -> None:
    config = TrainerConfig(target="y", lr=1e-3, seed=0)  # the defaults: sqrt, 8, at least 1
    trainer = IncrementalTrainer(config)
    records = _records(40)
    trainer.step(records[:2])
    assert trainer.optimizer is not None
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    trainer.step(records[2:34])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 2)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_beta1_is_counted_in_samples(optimizer: str) -> None:
    """A batch of n > lr_reference_batch rows decays the first moment as n / 8 steps of 8 would;
    smaller batches keep beta1 = 0.9 and beta2 is never touched."""
    trainer = IncrementalTrainer(TrainerConfig(target="y", optimizer=optimizer, seed=0))
    records = _records(100)
    betas = []
    for lo, hi in ((0, 2), (2, 34), (34, 42), (42, 43)):
        trainer.step(records[lo:hi])
        assert trainer.optimizer is not None
        betas.append(trainer.optimizer.param_groups[0]["betas"])
    assert [b[0] for b in betas] == pytest.approx([0.9, 0.9**4, 0.9, 0.9])
    assert [b[1] for b in betas] == [0.999] * 4


def test_momentum_in_samples_off_or_sgd_keeps_the_optimizer_momentum() -> None:
    off = IncrementalTrainer(TrainerConfig(target="y", momentum_in_samples=False, seed=0))
    sgd = IncrementalTrainer(TrainerConfig(target="y", optimizer="sgd", lr=0.05, seed=0))
    off.step(_records(64))
    sgd.step(_records(64))
    assert off.optimizer is not None and sgd.optimizer is not None
    assert off.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert sgd.optimizer.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimizers_learn_a_separable_stream(optimizer: str) -> None:
    lr = 0.05 if optimizer == "sgd" else 3e-3
    config = TrainerConfig(target="y", optimizer=optimizer, lr=lr, weight_decay=1e-4, seed=0)
    trainer = IncrementalTrainer(config)
    _run(trainer, _records(600), [1] * 200 + [8] * 50)
    assert trainer.metrics()["rolling_accuracy"] > 0.85


@pytest.mark.parametrize(("scaling", "factor"), [("none", 1.0), ("linear", 8.0), ("sqrt", 8**0.5)])
def test_learning_rate_scales_with_the_labelled_batch_size(scaling: str, factor: float) -> None:
    trainer = IncrementalTrainer(
        TrainerConfig(target="y", lr=1e-3, lr_scaling=scaling, lr_reference_batch=2, seed=0)
    )
    trainer.step(_records(16))
    assert trainer.optimizer is not None
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * factor)


def test_grad_clip_bounds_the_update() -> None:
    records = _records(8)
    for clip, expect_small in ((1e-6, True), (None, False)):
        t = IncrementalTrainer(TrainerConfig(target="y", optimizer="sgd", lr=1.0, grad_clip=clip))
        t.step(records)
        w0 = t.state_tensors()["model.head.weight"].clone()
        t.step(records)
        delta = (t.state_tensors()["model.head.weight"] - w0).abs().max().item()
        assert (delta < 1e-5) == expect_small


def test_predict_many_changes_nothing_and_handles_bad_records() -> None:
    trainer = IncrementalTrainer(TrainerConfig(target="y", seed=0))
    assert trainer.predict_many(_records(2)) == [None, None]
    _run(trainer, _records(50), [10] * 5)
    before = json.dumps(trainer.state_json(), sort_keys=True)
    tensors = trainer.state_tensors()
    queries = [
        *_records(3, seed=9),
        Record({"x1": float("nan"), "x2": 0.0}),
        Record({"x1": 0.0, "x2": 0.0, "c": "never-seen", "brand_new": 1.0}),
    ]
    preds = trainer.predict_many(queries)
    proba = trainer.predict_proba_many(queries)
    assert preds[3] is None and proba[3] is None
    assert all(p in ("0", "1") for i, p in enumerate(preds) if i != 3)
    assert proba[0] is not None and sum(proba[0].values()) == pytest.approx(1.0)
    assert json.dumps(trainer.state_json(), sort_keys=True) == before
    for key, value in trainer.state_tensors().items():
        assert torch.equal(value, tensors[key]), key


def test_norm_snapshot_and_train_serve_gap_have_no_side_effects() -> None:
    trainer = IncrementalTrainer(TrainerConfig(target="y", norm="ema_batch", seed=0))
    _run(trainer, _records(40), [8] * 5)
    snap = trainer.norm_snapshot()
    # two norm layers in each of the three default members, named by member
    assert len(snap) == 6 and all(m.shape == (64,) for m, _ in snap.values())
    assert {name.split("/")[0] for name in snap} == {"mlp0", "mlp1", "mlp2"}
    before = trainer.state_tensors()
    gaps = trainer.train_serve_gap(_records(8, seed=3))
    assert set(gaps) == set(snap) and all(g >= 0 for g in gaps.values())
    for key, value in trainer.state_tensors().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm": "bogus"}, "unknown norm 'bogus'; valid: batch, ema_batch"),
        ({"norm": ("layer", "nope")}, "unknown norm 'nope'"),
        ({"norm": ("layer",), "hidden": (4, 4)}, "1 names for 2 hidden layers"),
        ({"norm_options": {"ema_batch": {"momentum": 2.0}}}, "momentum"),
        ({"norm_options": {"ema_batch": {"bogus": 1}}}, "bogus"),
        ({"norm_options": {"nonorm": {}}}, "unknown norm 'nonorm'"),
        ({"activation": "swish"}, "unknown activation"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"dropout": 1.0}, "dropout"),
        ({"lr_scaling": "cubic"}, "lr_scaling"),
        ({"lr_scale_min": -1.0}, "lr_scale_min"),
        ({"lr_decay_samples": 0}, "lr_decay_samples"),
        ({"lr_decay_floor": 1.5}, "lr_decay_floor"),
    ],
)
def test_config_is_validated_at_construction(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainerConfig(target="y", **kwargs)  # type: ignore[arg-type]


def test_config_round_trips_and_rejects_unknown_keys() -> None:
    config = TrainerConfig(target="y", norm=("layer", "ema_batch"), hidden=(4, 4))
    assert TrainerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="unknown trainer settings: colour"):
        TrainerConfig.from_dict({**config.to_dict(), "colour": "red"})
    with pytest.raises(ConfigError, match="target"):
        IncrementalTrainer(TrainerConfig())


def test_a_checkpoint_from_before_momentum_in_samples_matches_the_old_behaviour() -> None:
    """A configuration saved before the setting existed (no key) hashes like one that turns it
    off, and a state without it restores with it off; the new default differs."""
    import hashlib

    old = TrainerConfig(target="y", momentum_in_samples=False, member_momenta=())
    data = old.to_dict()
    del data["momentum_in_samples"]  # what a checkpoint written before the setting holds
    del data["member_momenta"]  # a later setting at its old value (one member): left out too
    for key in (*SCREENING_SETTINGS, *EXECUTION_SETTINGS):  # never in the fingerprint
        del data[key]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    assert old.fingerprint() == hashlib.sha256(text.encode()).hexdigest()
    assert TrainerConfig(target="y").fingerprint() != old.fingerprint()

    trainer = IncrementalTrainer(TrainerConfig(target="y", seed=0))
    trainer.step(_records(20))
    state = trainer.state_json()
    del state["config"]["momentum_in_samples"]
    restored = IncrementalTrainer.from_state(trainer.state_tensors(), state)
    assert restored.config.momentum_in_samples is False


@pytest.mark.parametrize("norm", ["ema_batch", "batch_renorm"])
def test_regression_served_one_record_at_a_time_has_no_blow_up(norm: str) -> None:
    """A stream that starts with a single record: the warm start mixes it half and half with the
    initial moments instead of taking a variance of 0 from it (``sample_weight``). Before, the
    second record of river's TrumpApproval was served 3,757 approval points off (RMSE 119)."""
    from stream_trainer.sources import open_source

    records = list(open_source("river:TrumpApproval", target="approval"))[:200]
    for expert in (False, True):
        trainer = IncrementalTrainer(
            TrainerConfig(target="approval", norm=norm, linear_expert=expert, seed=0)
        )
        worst = 0.0
        for record in records:
            report = trainer.step([record])
            if report.values is not None:
                worst = max(worst, abs(float(report.values[0]) - record.value["approval"]))
        assert worst < 10.0, (expert, worst)  # approval ratings vary by a few points
        assert trainer.metrics()["rmse"] < 2.0


def test_the_upgrade_chain_fills_in_what_older_states_ran_with() -> None:
    """A version-1 configuration gets the values it ran with for the settings version 2 added,
    then the later settings' old values; a version outside the chain is refused by name."""
    from stream_trainer.training.state import STATE_VERSION, upgrade_config

    raw = {"target": "y", "hidden": [8]}
    v1 = upgrade_config(raw, 1)
    assert (v1["skip"], v1["lr_scale_min"], v1["lr_decay_samples"]) == (False, 0.0, None)
    assert (v1["linear_expert"], v1["momentum_in_samples"]) == (False, False)
    current = upgrade_config({**raw, "skip": True}, STATE_VERSION)
    assert current["skip"] is True and "lr_scale_min" not in current
    for bad in (0, STATE_VERSION + 1, None):
        with pytest.raises(ConfigError, match="trainer state version"):
            upgrade_config(raw, bad)  # type: ignore[arg-type]
