"""A checkpoint store in process memory, for tests and ``memory://``."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from stream_trainer.checkpoints.codec import CheckpointCodec, EncodedCheckpoint
from stream_trainer.checkpoints.store import DEFAULT_KEEP, VersionedStore
from stream_trainer.errors import CheckpointError, FencedWriterError

__all__ = ["MemoryCheckpointStore"]


@dataclass
class _Space:
    """What a Redis server or a directory holds; shared by stores opened on it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    parts: dict[tuple[int, int], bytes] = field(default_factory=dict)
    manifests: dict[int, bytes] = field(default_factory=dict)
    latest: int | None = None
    published: list[int] = field(default_factory=list)
    next_version: int = 1
    epoch: int = 0
    epoch_writer: str = ""


class MemoryCheckpointStore(VersionedStore):
    """Keeps checkpoints as encoded bytes in a dict, so corruption can be simulated.

    :meth:`reopen` gives a second store on the same memory, as a second trainer would get by
    opening the same Redis URL.
    """

    def __init__(
        self,
        *,
        keep: int = DEFAULT_KEEP,
        codec: CheckpointCodec | None = None,
        _space: _Space | None = None,
    ) -> None:
        super().__init__(keep=keep, codec=codec)
        self._space = _Space() if _space is None else _space

    def reopen(
        self, *, keep: int | None = None, codec: CheckpointCodec | None = None
    ) -> MemoryCheckpointStore:
        """Another store over the same memory (own settings, shared contents)."""
        return MemoryCheckpointStore(
            keep=self.keep if keep is None else keep,
            codec=self.codec if codec is None else codec,
            _space=self._space,
        )

    def _acquire_epoch(self, writer_id: str) -> int:
        with self._space.lock:
            self._space.epoch += 1
            self._space.epoch_writer = writer_id
            return self._space.epoch

    def current_epoch(self) -> int:
        self._check_open()
        return self._space.epoch

    def _reserve_version(self) -> int:
        with self._space.lock:
            version = self._space.next_version
            self._space.next_version += 1
            return version

    def _write_version(self, version: int, encoded: EncodedCheckpoint) -> None:
        with self._space.lock:
            for index, part in enumerate(encoded.parts):
                self._space.parts[version, index] = bytes(part)
            self._space.manifests[version] = encoded.manifest_bytes

    def _publish(self, version: int, epoch: int, parts: int, drop: Sequence[int]) -> None:
        space = self._space
        with space.lock:
            if epoch != space.epoch:
                msg = f"epoch {epoch} is not current ({space.epoch}); version {version} refused"
                raise FencedWriterError(msg)
            if space.latest is not None and space.latest >= version:
                msg = f"version {version} is older than the latest version {space.latest}"
                raise CheckpointError(msg)
            missing = [i for i in range(parts) if (version, i) not in space.parts]
            if version not in space.manifests or missing:
                msg = f"version {version} is incomplete (missing parts {missing}); not published"
                raise CheckpointError(msg)
            space.latest = version
            gone_versions = [v for v in space.published if v in set(drop)]
            space.published = [v for v in space.published if v not in gone_versions] + [version]
            for gone in gone_versions:
                space.manifests.pop(gone, None)
                for key in [key for key in space.parts if key[0] == gone]:
                    del space.parts[key]

    def _read_manifest(self, version: int) -> bytes | None:
        return self._space.manifests.get(version)

    def _read_parts(self, version: int, count: int) -> Sequence[bytes | None]:
        return [self._space.parts.get((version, index)) for index in range(count)]

    def _pointer(self) -> int | None:
        return self._space.latest

    def _published(self) -> list[int]:
        return list(self._space.published)
