"""Rendezvous by environment: what ``torchrun`` (or any launcher) sets, read once and validated.

``torchrun --nproc-per-node N -m stream_trainer run ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every worker; :func:`world_from_env` reads
them and :func:`init_process_group` joins the group (``env://``) with a collective timeout, so a
replica that dies or hangs makes the others fail within ``timeout_seconds`` instead of waiting
forever.

Backend: ``gloo`` for CPU tensors (the trainer's model lives on the CPU); when CUDA is present the
group is created with ``"cpu:gloo,cuda:nccl"``, so collectives on CUDA tensors go through NCCL and
those on CPU tensors through gloo.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from stream_trainer.distributed.collectives import Collectives
from stream_trainer.errors import ConfigError

__all__ = ["World", "init_process_group", "world_from_env"]

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class World:
    """This process's place in the group."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(environ: Mapping[str, str], name: str, default: int | None) -> int:
    raw = environ.get(name)
    if raw is None:
        if default is None:
            raise ConfigError(f"{name} is not set (run under torchrun, or set it)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def world_from_env(environ: Mapping[str, str] | None = None) -> World:
    """The :class:`World` described by ``environ`` (default ``os.environ``); a world of one when
    ``WORLD_SIZE`` is unset."""
    env = os.environ if environ is None else environ
    world_size = _int(env, "WORLD_SIZE", 1)
    if world_size < 1:
        raise ConfigError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if world_size == 1:
        return World(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", 0))
    rank = _int(env, "RANK", None)
    if not 0 <= rank < world_size:
        raise ConfigError(
            f"RANK must be in [0, {world_size}), got {rank} (WORLD_SIZE={world_size})"
        )
    if "MASTER_ADDR" not in env:
        raise ConfigError("MASTER_ADDR is not set (run under torchrun, or set it)")
    return World(
        rank=rank,
        world_size=world_size,
        local_rank=_int(env, "LOCAL_RANK", rank),
        master_addr=env["MASTER_ADDR"],
        master_port=_int(env, "MASTER_PORT", None),
    )


def init_process_group(
    world: World, *, backend: str = "auto", timeout_seconds: float = 120.0
) -> Collectives:
    """Join the group described by ``world`` (``env://`` rendezvous) and return its collectives.

    ``timeout_seconds`` bounds every collective: past it the call raises and the process exits
    non-zero (the group is then restarted, see :mod:`stream_trainer.distributed`).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not timeout_seconds > 0:
        raise ConfigError(f"timeout_seconds must be > 0, got {timeout_seconds!r}")
    if backend == "auto":
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{world.master_addr}:{world.master_port}",
        rank=world.rank,
        world_size=world.world_size,
        timeout=timedelta(seconds=timeout_seconds),
    )
    return Collectives()
