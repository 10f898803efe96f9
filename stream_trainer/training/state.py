"""A trainer's state as a checkpoint holds it, and the one upgrade chain of older formats.

Two parts (:class:`~stream_trainer.training.IncrementalTrainer` delegates here):

* **tensors** (safetensors): ``model.<state_dict key>``, ``optim.<parameter index>.<key>`` (Adam's
  ``step``, ``exp_avg``, ``exp_avg_sq``), ``expert.<name>`` (the linear expert), ``rng.torch``;
* **JSON**: ``version``, ``config``, ``task``, ``classes``, the encoder's schema and statistics,
  the target statistics, the metrics, the counters, ``model_dims``, the optimizer's groups and
  the mixture's losses.

``version`` is :data:`STATE_VERSION`; a state of an older version is read by upgrading its
configuration through :data:`UPGRADES` one version at a time (each step says what the settings
added in the next version were when they did not exist), then filling in :data:`LATER_SETTINGS`
(settings added without a version bump, at the values a state without them ran with). The
checkpoint validation (:mod:`stream_trainer.training.state_validation`) applies the same chain.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from stream_trainer.errors import ConfigError
from stream_trainer.features import FeatureEncoder, RunningStandardizer
from stream_trainer.model.linear_expert import LinearExpert
from stream_trainer.training.config import LATER_SETTINGS, TrainerConfig
from stream_trainer.training.metrics import ClassificationMetrics, RegressionMetrics
from stream_trainer.training.mixture import ExpertMixture

if TYPE_CHECKING:
    from stream_trainer.training.trainer import IncrementalTrainer

__all__ = [
    "STATE_VERSION",
    "SUPPORTED_VERSIONS",
    "UPGRADES",
    "restore_trainer",
    "trainer_json",
    "trainer_tensors",
    "upgrade_config",
]

STATE_VERSION = 2

UPGRADES: Mapping[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    # Version 1 states predate these settings: the values they ran with (the newer defaults
    # differ).
    1: lambda config: {"skip": False, "lr_scale_min": 0.0, "lr_decay_samples": None, **config},
}
"""``version -> upgrade of a configuration of that version to the next one``."""

SUPPORTED_VERSIONS = tuple(range(min(UPGRADES), STATE_VERSION + 1))

_T = TypeVar("_T", bound="IncrementalTrainer")


def upgrade_config(config: Mapping[str, Any], version: int) -> dict[str, Any]:
    """A stored configuration of ``version`` as one of :data:`STATE_VERSION` (module doc)."""
    if version not in SUPPORTED_VERSIONS:
        raise ConfigError(
            f"trainer state version {version!r} is not one of {list(SUPPORTED_VERSIONS)}"
        )
    raw = dict(config)
    for older in range(version, STATE_VERSION):
        raw = UPGRADES[older](raw)
    return {**LATER_SETTINGS, **raw}


def trainer_tensors(trainer: IncrementalTrainer) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors and the RNG state, flat names, copies (module doc)."""
    tensors: dict[str, torch.Tensor] = {"rng.torch": trainer._rng_state.clone()}
    if trainer.model is None or trainer.optimizer is None:
        return tensors
    for name, value in trainer.model.state_dict().items():
        tensors[f"model.{name}"] = value.detach().clone().contiguous()
    for i, param in enumerate(trainer.model.parameters()):
        for key, value in trainer.optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{i}.{key}"] = value.detach().clone().contiguous()
    if trainer.expert is not None:
        for name, value in trainer.expert.state_tensors().items():
            tensors[f"expert.{name}"] = value
    return tensors


def trainer_json(trainer: IncrementalTrainer) -> dict[str, Any]:
    """Everything else, as JSON: config, schema, labels, metrics, counters (module doc)."""
    groups = []
    if trainer.optimizer is not None:
        for g in trainer.optimizer.param_groups:
            groups.append(
                {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
            )
    model = trainer.model
    return {
        "version": STATE_VERSION,
        "config": trainer.config.to_dict(),
        "task": trainer.task,
        "classes": trainer.classes,
        "encoder": trainer.encoder.state(),
        "y_scaler": trainer.y_scaler.state(),
        "metrics": {
            "classification": trainer.cls_metrics.state(),
            "regression": trainer.reg_metrics.state(),
        },
        "samples_trained": trainer.samples_trained,
        "predicted_only": trainer.predicted_only,
        "steps": trainer.steps,
        "rejected": dict(trainer.rejected),
        "model_dims": None if model is None else [model.in_features, model.out_features],
        "optimizer_groups": groups,
        "mixture": trainer.mixture.state(),
    }


def restore_trainer(
    cls: type[_T], tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]
) -> _T:
    """A ``cls`` trainer exactly as it was when its tensors and JSON state were taken, an older
    format upgraded first. Trusts its input: checkpoints go through
    :func:`~stream_trainer.training.state_validation.restore_validated` first."""
    config = upgrade_config(state["config"], state.get("version"))  # type: ignore[arg-type]
    trainer = cls(TrainerConfig.from_dict(config))
    trainer.task = state["task"]
    trainer.classes = list(state["classes"])
    trainer.class_index = {c: i for i, c in enumerate(trainer.classes)}
    trainer.encoder = FeatureEncoder.from_state(state["encoder"])
    trainer._set_encoder_limits()
    trainer.y_scaler = RunningStandardizer.from_state(state["y_scaler"])
    trainer.cls_metrics = ClassificationMetrics.from_state(state["metrics"]["classification"])
    trainer.reg_metrics = RegressionMetrics.from_state(state["metrics"]["regression"])
    trainer.samples_trained = int(state["samples_trained"])
    trainer.predicted_only = int(state["predicted_only"])
    trainer.steps = int(state["steps"])
    trainer.rejected = Counter(state["rejected"])
    if "mixture" in state:
        trainer.mixture = ExpertMixture.from_state(state["mixture"])
    if state["model_dims"] is not None:
        trainer._build_model(*state["model_dims"])
        assert trainer.model is not None and trainer.optimizer is not None
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        trainer.model.load_state_dict(model_state)
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                opt_state.setdefault(int(index), {})[key] = value
        n_params = len(list(trainer.model.parameters()))
        groups = [dict(g, params=list(range(n_params))) for g in state["optimizer_groups"]]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        trainer.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        if trainer.config.linear_expert:
            expert_state = {
                k[len("expert.") :]: v for k, v in tensors.items() if k.startswith("expert.")
            }
            trainer.expert = LinearExpert.from_state(
                expert_state, regression=trainer.task == "regression"
            )
    if "rng.torch" in tensors:
        trainer._rng_state = tensors["rng.torch"].clone()
    return trainer
