"""A trainer's state as a checkpoint holds it, and the one upgrade chain of older formats.

Two parts (:class:`~stream_trainer.training.IncrementalTrainer` delegates here):

* **tensors** (safetensors): ``model.<state_dict key>``, ``optim.<parameter index>.<key>`` (Adam's
  ``step``, ``exp_avg``, ``exp_avg_sq``) of the first MLP member, the same under
  ``member<k>.model.`` and ``member<k>.optim.`` for member ``k >= 1`` (``member_momenta``),
  ``expert.<name>`` (the linear expert), ``rng.torch``;
* **JSON**: ``version``, ``config``, ``task``, ``classes``, the encoder's schema and statistics,
  the target statistics, the metrics, the counters, ``model_dims``, the optimizers' groups (the
  same for every member) and the mixture's experts and losses.

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
    "member_prefix",
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


def member_prefix(k: int) -> str:
    """The tensor-name prefix of MLP member ``k`` (none for the first: the one-member layout)."""
    return "" if k == 0 else f"member{k}."


def trainer_tensors(trainer: IncrementalTrainer) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors and the RNG state, flat names, copies (module doc)."""
    tensors: dict[str, torch.Tensor] = {"rng.torch": trainer._rng_state.clone()}
    for k, (model, optimizer) in enumerate(zip(trainer.members, trainer.optimizers, strict=True)):
        prefix = member_prefix(k)
        for name, value in model.state_dict().items():
            tensors[f"{prefix}model.{name}"] = value.detach().clone().contiguous()
        for i, param in enumerate(model.parameters()):
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{prefix}optim.{i}.{key}"] = value.detach().clone().contiguous()
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
        trainer.mixture = ExpertMixture.from_state(state["mixture"], trainer.expert_names)
    if state["model_dims"] is not None:
        trainer._build_model(*state["model_dims"])
        for k, (model, optimizer) in enumerate(
            zip(trainer.members, trainer.optimizers, strict=True)
        ):
            _load_member(model, optimizer, tensors, member_prefix(k), state["optimizer_groups"])
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


def _load_member(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    optimizer_groups: list[dict[str, Any]],
) -> None:
    """Load one member's parameters, buffers and optimizer state from ``prefix``-ed tensors."""
    head = f"{prefix}model."
    model.load_state_dict({k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)})
    opt_head = f"{prefix}optim."
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(opt_head):
            index, key = name[len(opt_head) :].split(".", 1)
            opt_state.setdefault(int(index), {})[key] = value
    n_params = len(list(model.parameters()))
    groups = [dict(g, params=list(range(n_params))) for g in optimizer_groups]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
