"""MLP members (``TrainerConfig.member_momenta``): trained independently on every batch, weighed
by their recent errors, and carried everywhere the trainer goes (checkpoint, validation, export,
the river estimators, the command line)."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch

from stream_trainer.checkpoints import CheckpointInvalidError
from stream_trainer.commands._learner_args import add_learner_arguments, trainer_config
from stream_trainer.errors import ConfigError
from stream_trainer.records import Record
from stream_trainer.training import IncrementalTrainer, TrainerConfig
from stream_trainer.training.served_model import input_rows, served_module
from stream_trainer.training.state_validation import restore_trainer, validate_trainer_state

MOMENTA = (0.001, 0.03, 0.1)


def _jumping(n: int, seed: int, every: int = 200) -> list[Record]:
    """Two features whose offset jumps every ``every`` records; the label depends on the
    deviation from the current offset: a norm that forgets fast recenters after each jump."""
    rng = np.random.default_rng(seed)
    out, offset = [], np.zeros(2)
    for i in range(n):
        if i % every == 0:
            offset = rng.uniform(-6, 6, 2)
        d = rng.normal(0, 1, 2)
        value = {"a": float(offset[0] + d[0]), "b": float(offset[1] + d[1]), "y": int(d.sum() > 0)}
        out.append(Record(value, offset=i))
    return out


def _batches(records: list[Record], seed: int = 0) -> list[list[Record]]:
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < len(records):
        size = int(rng.integers(1, 9))
        out.append(records[i : i + size])
        i += size
    return out


def _config(**kw: object) -> TrainerConfig:
    base = {"target": "y", "hidden": (8, 8), "seed": 2, "member_momenta": MOMENTA}
    return TrainerConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_the_configuration_of_members() -> None:
    config = _config()
    options = config.member_norm_options()
    assert [o["ema_batch"]["momentum"] for o in options] == list(MOMENTA)
    # one member without the setting, or with a norm that keeps no running statistics
    assert len(TrainerConfig(member_momenta=()).member_norm_options()) == 1
    assert len(_config(norm="layer").member_norm_options()) == 1
    for bad, match in (((0.0,), "in \\(0, 1\\]"), ((0.1, 0.1), "repeats"), ((0.1,) * 9, "at most")):
        with pytest.raises(ConfigError, match=match):
            TrainerConfig(member_momenta=bad)
    assert TrainerConfig.from_dict(config.to_dict()) == config
    assert config.fingerprint() != dataclasses.replace(config, member_momenta=(0.1,)).fingerprint()


@pytest.mark.parametrize("engine", ["auto", "torch"])
def test_each_member_learns_as_a_trainer_of_its_own(engine: str) -> None:
    """The first member of a three-member trainer is initialised first from the same generator,
    so it is the one MLP of a single-member trainer with its momentum: after a stream of
    variable batches (with a feature appearing on the way) they agree to rounding. (A class
    appearing later draws the new output rows member after member, so only the first member's
    draws would match: every class is in the first batch.)"""
    records = _jumping(300, 0)
    for i, r in enumerate(records):
        r.value["y"] = i % 3 if i < 3 else r.value["y"] + (i % 11 == 0)
        if i >= 150:
            r.value["c"] = float(i % 5)
    many = IncrementalTrainer(_config(engine=engine))
    one = IncrementalTrainer(_config(engine=engine, member_momenta=MOMENTA[:1]))
    for batch in [records[:3], *_batches(records[3:])]:
        many.step(batch)
        one.step(batch)
    assert len(many.members) == 3 and len(one.members) == 1
    assert one.model is not None and one.model.in_features == 3
    for a, b in zip(many.members[0].parameters(), one.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the members differ: their norms forget at different speeds
    assert not torch.equal(many.members[0].head.weight, many.members[2].head.weight)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_weight_moves_to_the_member_whose_time_scale_wins(seed: int) -> None:
    """On a stream whose offsets jump every 200 records, the fast-forgetting member makes fewer
    errors than the slow one, and the mixture serves it."""
    records = _jumping(3000, seed)
    trainer = IncrementalTrainer(_config(member_momenta=(0.001, 0.1), linear_expert=False))
    for record in records:
        trainer.step([record])
    weights, losses = trainer.expert_weights(), trainer.expert_losses()
    assert set(weights) == {"mlp0", "mlp1"}
    assert weights["mlp1"] > 0.99
    assert losses["mlp1"] < losses["mlp0"] - 10
    alone = IncrementalTrainer(_config(member_momenta=(0.001,), linear_expert=False))
    for record in records:
        alone.step([record])
    assert trainer.metrics()["accuracy"] > alone.metrics()["accuracy"] + 0.03


def test_the_mixture_serves_the_weighted_members() -> None:
    trainer = IncrementalTrainer(_config())
    for batch in _batches(_jumping(400, 1)):
        trainer.step(batch)
    assert list(trainer.expert_weights()) == ["mlp0", "mlp1", "mlp2", "linear"]
    probe = _jumping(20, 5)
    served = trainer.predict_proba_many(probe)
    x = torch.from_numpy(trainer.encoder.transform([r.value for r in probe]))
    w = trainer.mixture.weights()
    with torch.no_grad():
        members = [torch.softmax(m.eval()(x).double(), 1).numpy() for m in trainer.members]
    assert trainer.expert is not None
    linear = trainer.expert.logits(x.numpy())
    linear = np.exp(linear - linear.max(1, keepdims=True))
    linear /= linear.sum(1, keepdims=True)
    want = sum(wk * p for wk, p in zip(w, [*members, linear], strict=True))
    got = np.array([[row[c] for c in trainer.classes] for row in served])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_a_restore_keeps_every_member_and_continues_exactly() -> None:
    records = _jumping(600, 3)
    batches = _batches(records)
    trainer = IncrementalTrainer(_config())
    for batch in batches[:60]:
        trainer.step(batch)
    tensors, state = trainer.state_tensors(), trainer.state_json()
    assert {"member1.model.head.weight", "member2.optim.0.exp_avg"} <= set(tensors)
    assert state["mixture"]["experts"] == ["mlp0", "mlp1", "mlp2", "linear"]
    restored = restore_trainer(tensors, state, fingerprint=trainer.config.fingerprint())
    for batch in batches[60:]:
        trainer.step(batch)
        restored.step(batch)
    assert restored.metrics() == trainer.metrics()
    np.testing.assert_array_equal(restored.mixture.losses, trainer.mixture.losses)
    for a, b in zip(trainer.members, restored.members, strict=True):
        for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q)


def test_a_checkpoint_that_lost_a_member_is_refused() -> None:
    trainer = IncrementalTrainer(_config())
    for batch in _batches(_jumping(100, 4)):
        trainer.step(batch)
    tensors, state = trainer.state_tensors(), trainer.state_json()
    validate_trainer_state(tensors, state)
    missing = {k: v for k, v in tensors.items() if not k.startswith("member2.")}
    with pytest.raises(CheckpointInvalidError, match="missing"):
        validate_trainer_state(missing, state)
    wrong = {**state, "mixture": {"experts": ["mlp", "linear"], "losses": [0.0, 0.0]}}
    with pytest.raises(CheckpointInvalidError, match="mixture experts"):
        validate_trainer_state(tensors, wrong)
    # a state of fewer members than the configuration names is refused too
    one = {**state, "config": {**state["config"], "member_momenta": [0.001]}}
    with pytest.raises(CheckpointInvalidError):
        validate_trainer_state(tensors, one)


def test_the_export_serves_the_mixture_of_members() -> None:
    trainer = IncrementalTrainer(_config())
    for batch in _batches(_jumping(300, 6)):
        trainer.step(batch)
    module, metadata = served_module(trainer)
    probe = _jumping(10, 9)
    x = input_rows(metadata["input_columns"], [r.value for r in probe]).float()
    with torch.no_grad():
        exported = module(x).numpy()
    served = trainer.predict_proba_many(probe)
    want = np.array([[row[c] for c in trainer.classes] for row in served])
    np.testing.assert_allclose(exported, want, rtol=1e-6, atol=1e-9)
    assert set(metadata["expert_weights"]) == {"mlp0", "mlp1", "mlp2", "linear"}


def test_the_command_line_sets_the_members() -> None:
    parser = argparse.ArgumentParser()
    add_learner_arguments(parser)
    args = parser.parse_args(["--member-momenta", "0.003,0.03"])
    assert trainer_config(args, "y").member_momenta == (0.003, 0.03)
    args = parser.parse_args(["--member-momenta", "none"])
    assert trainer_config(args, "y").member_momenta == ()
    with pytest.raises(SystemExit):
        parser.parse_args(["--member-momenta", "fast"])


def test_toml_and_the_environment_set_the_members(tmp_path) -> None:
    from stream_trainer.service.config import load_service_config

    path = tmp_path / "service.toml"
    path.write_text("[trainer]\nmember_momenta = [0.01, 0.1]\n")
    assert load_service_config(config_file=path, environ={}).trainer.member_momenta == (0.01, 0.1)
    environ = {"STREAM_TRAINER_TRAINER__MEMBER_MOMENTA": "0.003,0.03"}
    assert load_service_config(environ=environ).trainer.member_momenta == (0.003, 0.03)
    with pytest.raises(ConfigError, match="member_momenta"):
        load_service_config(environ={"STREAM_TRAINER_TRAINER__MEMBER_MOMENTA": "0.5,2"})


def test_a_momentum_asked_for_runs_alone() -> None:
    """``--norm-option ema_batch.momentum=M`` (or the same in TOML, the environment, the river
    estimator) without ``member_momenta`` trains one member with M, not the default grid."""
    from stream_trainer.cli import build_parser
    from stream_trainer.commands.run import service_config
    from stream_trainer.river import MLPClassifier
    from stream_trainer.service.config import load_service_config
    from stream_trainer.training.config import DEFAULT_MEMBER_MOMENTA

    parser = argparse.ArgumentParser()
    add_learner_arguments(parser)
    config = trainer_config(parser.parse_args(["--norm-option", "ema_batch.momentum=0.03"]), "y")
    assert config.member_momenta == () and config.member_norm_options()[0]["ema_batch"] == {
        "momentum": 0.03
    }
    # another option is no momentum: the default members stay
    config = trainer_config(parser.parse_args(["--norm-option", "ema_batch.eps=0.001"]), "y")
    assert config.member_momenta == DEFAULT_MEMBER_MOMENTA
    both = ["--norm-option", "ema_batch.momentum=0.03", "--member-momenta", "0.01,0.1"]
    assert trainer_config(parser.parse_args(both), "y").member_momenta == (0.01, 0.1)

    args = build_parser().parse_args(["run", "--norm-option", "ema_batch.momentum=0.03"])
    assert service_config(args, environ={}).trainer.member_momenta == ()
    args = build_parser().parse_args(["run", "--norm-option", "ema_batch.warm_start=false"])
    assert service_config(args, environ={}).trainer.member_momenta == DEFAULT_MEMBER_MOMENTA
    environ = {"STREAM_TRAINER_TRAINER__NORM_OPTIONS": '{"ema_batch": {"momentum": 0.03}}'}
    assert load_service_config(environ=environ).trainer.member_momenta == ()

    alone = MLPClassifier(norm_options={"ema_batch": {"momentum": 0.03}})
    assert alone.trainer.config.member_momenta == ()
    assert MLPClassifier().trainer.config.member_momenta == DEFAULT_MEMBER_MOMENTA


def test_a_checkpoint_from_before_members_restores_one_member() -> None:
    """A state written before ``member_momenta`` existed (no key) restores as the one member it
    trained, and its fingerprint is that of ``member_momenta=()``: a service resumes it with
    ``--member-momenta none`` and refuses the new default rather than change the model."""
    trainer = IncrementalTrainer(_config(member_momenta=()))
    for batch in _batches(_jumping(100, 2)):
        trainer.step(batch)
    tensors, state = trainer.state_tensors(), trainer.state_json()
    old = {k: v for k, v in state["config"].items() if k != "member_momenta"}
    state = {
        **state,
        "config": old,
        "mixture": {"experts": ["mlp", "linear"], "losses": [1.0, 2.0]},
    }
    restored = restore_trainer(tensors, state)
    assert len(restored.members) == 1 and restored.config.member_momenta == ()
    assert restored.config.fingerprint() == trainer.config.fingerprint()
    assert restored.config.fingerprint() != _config().fingerprint()
    np.testing.assert_array_equal(restored.mixture.losses, [1.0, 2.0])
