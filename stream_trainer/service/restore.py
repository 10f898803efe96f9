"""What the service accepts from a stored checkpoint: its state validated, then applied.

A checkpoint's state is ``{"trainer": <IncrementalTrainer.state_json()>, "service": {...}}``
(see :meth:`TrainerService.checkpoint`). :func:`restore_checkpoint` checks the service part's
types, then validates and applies the trainer part
(:func:`~stream_trainer.training.state_validation.restore_trainer`), and the pending store of
delayed labels when there is one (``service.labels`` and the ``pending.*`` tensors,
:func:`~stream_trainer.service.label_join.validate_label_state`). Every failure is a
:class:`~stream_trainer.checkpoints.CheckpointInvalidError`, so the store's
:meth:`~stream_trainer.checkpoints.CheckpointStore.load_newest` falls back to an older version;
``stream-trainer checkpoints verify`` runs the same function.
"""

from __future__ import annotations

from typing import Any

from stream_trainer.checkpoints import Checkpoint, CheckpointInvalidError
from stream_trainer.service.label_join import split_label_tensors, validate_label_state
from stream_trainer.training import IncrementalTrainer
from stream_trainer.training.state_validation import restore_trainer

__all__ = ["restore_checkpoint", "validate_service_state"]


def restore_checkpoint(checkpoint: Checkpoint) -> IncrementalTrainer:
    """The trainer ``checkpoint`` holds, after :func:`validate_service_state` and the trainer
    state's structural validation; raises only ``CheckpointError`` subclasses."""
    validate_service_state(checkpoint.state)
    trainer_tensors, pending = split_label_tensors(checkpoint.tensors)
    labels = checkpoint.state.get("service", {}).get("labels")
    if labels is not None or pending:
        validate_label_state(pending, labels)
    return restore_trainer(
        trainer_tensors,
        checkpoint.state["trainer"],
        fingerprint=checkpoint.config_fingerprint,
    )


def validate_service_state(state: dict[str, Any]) -> None:
    """``state["trainer"]`` is an object; ``state["service"]``, when present, has the types
    the service reads (``batch_log_lines`` a count, ``dead_lettered`` counts by reason,
    ``origins`` a partition's first offset or ``null``)."""
    if not isinstance(state.get("trainer"), dict):
        _fail("the state has no trainer object")
    service = state.get("service", {})
    if not isinstance(service, dict):
        _fail("state['service'] must be an object")
    if not _is_count(service.get("version", 1)) or not _is_count(service.get("batch_log_lines", 0)):
        _fail("service version and batch_log_lines must be integers >= 0")
    if not isinstance(service.get("run_name", ""), str):
        _fail("service run_name must be a string")
    dead = service.get("dead_lettered", {})
    if not isinstance(dead, dict) or not all(_is_count(n) for n in dead.values()):
        _fail("service dead_lettered must map reasons to counts")
    origins = service.get("origins", {})
    if not isinstance(origins, dict) or not all(
        isinstance(k, str) and (v is None or _is_count(v)) for k, v in origins.items()
    ):
        _fail("service origins must map partitions to offsets >= 0 or null")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def _fail(message: str) -> None:
    raise CheckpointInvalidError(f"invalid service state: {message}", reason="state")
