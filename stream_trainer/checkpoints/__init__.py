"""Checkpoints: the :class:`Checkpoint` record, its codec (safetensors + JSON) and its stores.

Save the checkpoint (with the next offsets) first, then commit those offsets, then report metrics.
"""

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
