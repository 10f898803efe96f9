"""Checkpoints: the :class:`Checkpoint` record, its codec (safetensors + JSON) and its stores.

Save the checkpoint (with the next offsets) first, then commit those offsets, then report metrics.

The names below load on first use, so that :mod:`stream_trainer.checkpoints.urls` (what the
command line needs to build its parser) comes without torch and redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stream_trainer._lazy import lazy_getattr

if TYPE_CHECKING:
    from stream_trainer.checkpoints.checkpoint import FORMAT_VERSION, Checkpoint
    from stream_trainer.checkpoints.codec import (
        DEFAULT_CHUNK_SIZE,
        HMAC_KEY_ENV,
        CheckpointCodec,
        EncodedCheckpoint,
        Manifest,
    )
    from stream_trainer.checkpoints.local_store import LocalDirCheckpointStore
    from stream_trainer.checkpoints.memory_store import MemoryCheckpointStore
    from stream_trainer.checkpoints.redis_store import RedisCheckpointStore
    from stream_trainer.checkpoints.retry import ExponentialBackoff, RetryPolicy
    from stream_trainer.checkpoints.store import (
        CheckpointInfo,
        CheckpointStore,
        Restored,
        StoreAccessError,
        UnsignedWriterError,
        VerifyResult,
    )
    from stream_trainer.checkpoints.urls import open_store
    from stream_trainer.checkpoints.validation import REJECT_REASONS, CheckpointInvalidError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "HMAC_KEY_ENV",
    "REJECT_REASONS",
    "Checkpoint",
    "CheckpointCodec",
    "CheckpointInfo",
    "CheckpointInvalidError",
    "CheckpointStore",
    "EncodedCheckpoint",
    "ExponentialBackoff",
    "LocalDirCheckpointStore",
    "Manifest",
    "MemoryCheckpointStore",
    "RedisCheckpointStore",
    "Restored",
    "RetryPolicy",
    "StoreAccessError",
    "UnsignedWriterError",
    "VerifyResult",
    "open_store",
]

_HOMES = {
    "FORMAT_VERSION": "stream_trainer.checkpoints.checkpoint",
    "Checkpoint": "stream_trainer.checkpoints.checkpoint",
    "DEFAULT_CHUNK_SIZE": "stream_trainer.checkpoints.codec",
    "HMAC_KEY_ENV": "stream_trainer.checkpoints.codec",
    "CheckpointCodec": "stream_trainer.checkpoints.codec",
    "EncodedCheckpoint": "stream_trainer.checkpoints.codec",
    "Manifest": "stream_trainer.checkpoints.codec",
    "LocalDirCheckpointStore": "stream_trainer.checkpoints.local_store",
    "MemoryCheckpointStore": "stream_trainer.checkpoints.memory_store",
    "RedisCheckpointStore": "stream_trainer.checkpoints.redis_store",
    "ExponentialBackoff": "stream_trainer.checkpoints.retry",
    "RetryPolicy": "stream_trainer.checkpoints.retry",
    "CheckpointInfo": "stream_trainer.checkpoints.store",
    "CheckpointStore": "stream_trainer.checkpoints.store",
    "Restored": "stream_trainer.checkpoints.store",
    "StoreAccessError": "stream_trainer.checkpoints.store",
    "UnsignedWriterError": "stream_trainer.checkpoints.store",
    "VerifyResult": "stream_trainer.checkpoints.store",
    "open_store": "stream_trainer.checkpoints.urls",
    "REJECT_REASONS": "stream_trainer.checkpoints.validation",
    "CheckpointInvalidError": "stream_trainer.checkpoints.validation",
}


__getattr__ = lazy_getattr(__name__, _HOMES)
