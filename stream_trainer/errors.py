"""One exception root for the whole project.

Every error carries a ``retriable`` attribute. The service loop decides what to do with an error
(retry with backoff, or stop with a clear message) from that attribute alone, never from the text.
"""

from __future__ import annotations

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FencedWriterError",
    "SourceError",
    "StoreUnavailableError",
    "StreamTrainerError",
]


class StreamTrainerError(Exception):
    """Root of every error raised on purpose by stream-trainer.

    ``retriable`` says whether repeating the same operation later may succeed (a broker or a store
    that is down) or never will (a bad configuration, a corrupt checkpoint).
    """

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ConfigError(StreamTrainerError, ValueError):
    """A setting is unknown, out of range or inconsistent with another one. Never retriable."""


class DataError(StreamTrainerError, ValueError):
    """A source cannot be read at all (missing file, unknown format). Bad *records* are not errors:
    they are rejected, counted and set aside."""


class SourceError(StreamTrainerError):
    """A record source (Kafka, a file) failed; retriable when the cause is transient."""


class CheckpointError(StreamTrainerError):
    """A checkpoint could not be written or read."""


class CheckpointCorruptError(CheckpointError):
    """A stored checkpoint failed its checksum, HMAC or format check. The loader falls back to the
    previous version; the bytes are never decoded."""


class FencedWriterError(CheckpointError):
    """A writer whose epoch is no longer current tried to publish a checkpoint."""


class StoreUnavailableError(CheckpointError):
    """The checkpoint store (Redis) is unreachable; retriable."""

    retriable = True
