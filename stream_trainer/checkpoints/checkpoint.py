"""The :class:`Checkpoint`: everything a trainer needs to resume, saved with its offsets."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from stream_trainer.errors import CheckpointError

__all__ = ["FORMAT_VERSION", "Checkpoint"]

#: The checkpoint format this code writes. Older formats are upgraded on load (see
#: :data:`stream_trainer.checkpoints.codec.UPGRADES`); newer ones are refused.
FORMAT_VERSION = 1


@dataclass(eq=False)
class Checkpoint:
    """The whole state of an online-learning trainer at one instant.

    Parameters
    ----------
    tensors
        Model and optimizer tensors under flat names (``"model.0.weight"``,
        ``"optim.state.0.exp_avg"``). Saved bit for bit through safetensors.
    state
        Every other piece of trainer state (feature preprocessing, metrics, config, class labels),
        as JSON values. It must survive a JSON round trip unchanged: no tuples, no non-string keys,
        no NaN or infinity.
    offsets
        ``"topic:partition"`` -> the **next** offset to read.
    samples
        Samples trained over the model's whole life.
    step
        Optimizer steps over the model's whole life.
    config_fingerprint
        A digest of the training configuration that produced the tensors.
    writer_id
        The trainer instance that wrote the checkpoint.
    epoch
        The writer epoch obtained from :meth:`CheckpointStore.acquire_epoch`; a store refuses a
        checkpoint whose epoch is not its current one (the writer has been fenced off).
    created_at
        Unix time of creation, in seconds.
    version
        Assigned by the store when the checkpoint is saved; 0 before. :meth:`CheckpointStore.save`
        returns it and leaves the object it was given unchanged.
    format_version
        The checkpoint format; a loaded checkpoint always carries :data:`FORMAT_VERSION`.

    .. note::
       ``offsets`` holds the next offset to read, which is the last **trained** offset + 1 (the
       Kafka committed-offset convention). A trainer that has trained records 0..41 of
       ``clicks:3`` stores ``{"clicks:3": 42}`` and resumes by seeking partition 3 to 42.
    """

    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    offsets: dict[str, int]
    samples: int
    step: int
    config_fingerprint: str
    writer_id: str
    epoch: int
    created_at: float = field(default_factory=time.time)
    version: int = 0
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name, tensor in self.tensors.items():
            if not isinstance(name, str) or not name:
                msg = f"tensor names must be non-empty strings, got {name!r}"
                raise CheckpointError(msg)
            if not isinstance(tensor, torch.Tensor):
                msg = f"tensors[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}"
                raise CheckpointError(msg)
        if not isinstance(self.state, dict):
            msg = f"state must be a dict, got {type(self.state).__name__}"
            raise CheckpointError(msg)
        for key, offset in self.offsets.items():
            topic, sep, partition = key.rpartition(":") if isinstance(key, str) else ("", "", "")
            if not sep or not topic or not partition.isdigit():
                msg = f"offset keys must look like 'topic:partition', got {key!r}"
                raise CheckpointError(msg)
            if not _is_int(offset) or offset < 0:
                msg = f"offsets[{key!r}] must be an int >= 0 (next offset to read), got {offset!r}"
                raise CheckpointError(msg)
        for name in ("samples", "step", "epoch", "version", "format_version"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                msg = f"{name} must be an int >= 0, got {value!r}"
                raise CheckpointError(msg)
        for name in ("config_fingerprint", "writer_id"):
            if not isinstance(getattr(self, name), str):
                msg = f"{name} must be a str, got {getattr(self, name)!r}"
                raise CheckpointError(msg)
        if not isinstance(self.created_at, int | float) or not math.isfinite(self.created_at):
            msg = f"created_at must be a finite unix time, got {self.created_at!r}"
            raise CheckpointError(msg)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
