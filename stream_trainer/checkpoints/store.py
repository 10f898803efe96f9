"""The :class:`CheckpointStore` protocol and the save/load logic its implementations share.

Every store keeps numbered versions, each made of parts and a manifest (see
:mod:`stream_trainer.checkpoints.codec`), a *latest* pointer naming the newest published version,
a version counter and a writer epoch.

Saving follows one order, which is what makes a crash at any point harmless:

1. check that the checkpoint's epoch is the store's current epoch (fast refusal);
2. reserve version ``N`` (a counter; a crash leaves a gap, never a reuse);
3. write every part of ``N`` and its manifest (not yet visible to loaders);
4. switch the latest pointer to ``N`` in one atomic step that re-checks that every part of ``N``
   exists and that the epoch is still current, else refuses (``FencedWriterError``);
5. delete versions older than the newest ``keep``.

Loaders only follow the pointer (and published versions below it), so they see ``N - 1`` or
``N``, never a mix. :meth:`load_newest` falls back to older versions when the newest fails its
checks (those of the codec, then the caller's own validation), counting each failure in
``corrupt_loads`` and naming it in :attr:`Restored.rejected`.

Signatures. With a key (see :mod:`~stream_trainer.checkpoints.codec`) an unsigned or wrongly
signed version is never loaded and never pruned: ``keep`` counts the versions whose signature
checks, and only those are deleted. Without a key a writer refuses a store that holds signed
versions (:class:`UnsignedWriterError`, at :meth:`acquire_epoch` and at each save), so it can
neither continue signed history nor prune it.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, Protocol, TypeVar, runtime_checkable

from stream_trainer.checkpoints.checkpoint import Checkpoint
from stream_trainer.checkpoints.codec import (
    HMAC_KEY_ENV,
    CheckpointCodec,
    EncodedCheckpoint,
    Manifest,
    PartData,
)
from stream_trainer.checkpoints.validation import CheckpointInvalidError, rejection_reason
from stream_trainer.errors import (
    CheckpointCorruptError,
    CheckpointError,
    ConfigError,
    FencedWriterError,
)

__all__ = [
    "DEFAULT_KEEP",
    "CheckpointInfo",
    "CheckpointStore",
    "Restored",
    "StoreAccessError",
    "UnsignedWriterError",
    "VerifyResult",
    "VersionMissingError",
]

T = TypeVar("T")

DEFAULT_KEEP = 3
logger = logging.getLogger("stream_trainer.checkpoints")


@dataclass(frozen=True)
class CheckpointInfo:
    """One stored version as its manifest describes it (no part is read).

    ``error`` is set, and the other fields zero, when the manifest itself cannot be read.
    """

    version: int
    size_bytes: int = 0
    created_at: float = 0.0
    samples: int = 0
    step: int = 0
    offsets: dict[str, int] = field(default_factory=dict)
    writer_id: str = ""
    epoch: int = 0
    format_version: int = 0
    parts: int = 0
    signed: bool = False
    error: str | None = None


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a full check of one version: manifest, HMAC, parts, SHA-256 and decoding."""

    version: int
    ok: bool
    error: str | None = None
    size_bytes: int = 0
    signed: bool = False
    signature_checked: bool = False


@dataclass(frozen=True)
class Restored(Generic[T]):
    """What :meth:`CheckpointStore.load_newest` restored.

    ``value`` is what the caller's ``restore`` made of ``checkpoint``; ``rejected`` maps each
    newer version that was tried and refused to why (the error's message), ``reasons`` to the
    :data:`~stream_trainer.checkpoints.validation.REJECT_REASONS` value of that error.
    """

    checkpoint: Checkpoint
    value: T
    rejected: dict[int, str] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)


class UnsignedWriterError(CheckpointError):
    """A writer without a key met a store that holds signed versions. Never retriable."""


class StoreAccessError(CheckpointError):
    """The store refused this client (wrong password, rejected TLS certificate, no
    permission): retrying the same credentials cannot succeed. Never retriable."""


@runtime_checkable
class CheckpointStore(Protocol):
    """Where checkpoints live. Implementations: memory, local directory, Redis."""

    corrupt_loads: int

    def save(self, checkpoint: Checkpoint) -> int:
        """Publish ``checkpoint`` as a new version and return its number.

        Raises :class:`FencedWriterError` when ``checkpoint.epoch`` is not the current epoch.
        """
        ...

    def load_latest(self) -> Checkpoint | None:
        """The newest version that passes every check, ``None`` when nothing was ever saved.

        A version that fails is logged, counted in ``corrupt_loads`` and skipped; when every
        version fails, :class:`CheckpointCorruptError` is raised.
        """
        ...

    def load_newest(self, restore: Callable[[Checkpoint], T]) -> Restored[T] | None:
        """The newest version that passes every check and that ``restore`` accepts.

        ``restore`` validates and applies a decoded checkpoint; a :class:`CheckpointCorruptError`
        from it rejects the version like a failed checksum (any other error propagates). ``None``
        when nothing was ever saved; :class:`CheckpointCorruptError` when every version fails.
        """
        ...

    def load(self, version: int) -> Checkpoint:
        """One version; :class:`CheckpointCorruptError` when it fails a check."""
        ...

    def latest_version(self) -> int | None:
        """The version the latest pointer names, without checking it."""
        ...

    def list_versions(self) -> list[CheckpointInfo]:
        """Published versions, oldest first, from their manifests only."""
        ...

    def verify(
        self, version: int, validate: Callable[[Checkpoint], object] | None = None
    ) -> VerifyResult:
        """Run every check on one version, then ``validate`` on the decoded checkpoint; never
        raises for a bad version."""
        ...

    def acquire_epoch(self, writer_id: str) -> int:
        """Atomically increment the writer epoch and return it, fencing every older writer."""
        ...

    def current_epoch(self) -> int:
        """The current writer epoch (0 before any :meth:`acquire_epoch`)."""
        ...

    def close(self) -> None:
        """Release connections and files; idempotent."""
        ...


class VersionMissingError(CheckpointInvalidError):
    """The asked-for version has no manifest in the store (never saved, pruned, or lost)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="missing")


class VersionedStore(abc.ABC):
    """Save/load logic over a few storage primitives; subclasses supply the primitives."""

    def __init__(self, *, keep: int = DEFAULT_KEEP, codec: CheckpointCodec | None = None) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            msg = f"keep must be an int >= 1, got {keep!r}"
            raise ConfigError(msg)
        self.keep = keep
        self.codec = CheckpointCodec.from_env() if codec is None else codec
        self.corrupt_loads = 0
        self._closed = False

    # ------------------------------------------------------------ primitives

    @abc.abstractmethod
    def _reserve_version(self) -> int: ...

    @abc.abstractmethod
    def _write_version(self, version: int, encoded: EncodedCheckpoint) -> None:
        """Write parts and manifest of ``version`` without publishing it."""

    @abc.abstractmethod
    def _publish(self, version: int, epoch: int, parts: int, drop: Sequence[int]) -> None:
        """Atomically: check parts and epoch, switch the pointer, then delete the published
        versions ``drop`` (those :meth:`_to_drop` chose)."""

    @abc.abstractmethod
    def _read_manifest(self, version: int) -> bytes | None: ...

    @abc.abstractmethod
    def _read_parts(self, version: int, count: int) -> Sequence[bytes | None]: ...

    @abc.abstractmethod
    def _pointer(self) -> int | None: ...

    @abc.abstractmethod
    def _published(self) -> list[int]:
        """Published versions, ascending."""

    @abc.abstractmethod
    def _acquire_epoch(self, writer_id: str) -> int: ...

    @abc.abstractmethod
    def current_epoch(self) -> int: ...

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once."""

    # ------------------------------------------------------------ the protocol

    def acquire_epoch(self, writer_id: str) -> int:
        self._check_open()
        self._signatures()  # a writer without a key stops here on a signed store
        return self._acquire_epoch(writer_id)

    def save(self, checkpoint: Checkpoint) -> int:
        self._check_open()
        self._check_epoch(checkpoint)
        signatures = self._signatures()
        version, encoded = self._stage(checkpoint)
        drop = self._to_drop(signatures)
        self._publish(version, checkpoint.epoch, len(encoded.parts), drop)
        logger.info(
            "checkpoint version %d saved (%d bytes, %d parts, epoch %d)",
            version,
            encoded.manifest.size_bytes,
            len(encoded.parts),
            checkpoint.epoch,
        )
        return version

    def load_latest(self) -> Checkpoint | None:
        restored = self.load_newest(lambda checkpoint: checkpoint)
        return None if restored is None else restored.checkpoint

    def load_newest(self, restore: Callable[[Checkpoint], T]) -> Restored[T] | None:
        self._check_open()
        candidates = self._candidates()
        rejected: dict[int, str] = {}
        reasons: dict[int, str] = {}
        for version in candidates:
            try:
                checkpoint = self.load(version)
                value = restore(checkpoint)
            except CheckpointCorruptError as exc:
                self.corrupt_loads += 1
                rejected[version], reasons[version] = str(exc), rejection_reason(exc)
                logger.warning(
                    "skipping checkpoint version %d (%s): %s", version, reasons[version], exc
                )
                continue
            return Restored(checkpoint, value, rejected=rejected, reasons=reasons)
        if rejected:
            msg = f"no stored checkpoint passes its checks: {'; '.join(rejected.values())}"
            raise CheckpointCorruptError(msg)
        return None

    def load(self, version: int) -> Checkpoint:
        self._check_open()
        manifest, parts, sha256 = self._read(version)
        return self.codec.decode(manifest, parts, sha256=sha256)

    def latest_version(self) -> int | None:
        self._check_open()
        return self._pointer()

    def list_versions(self) -> list[CheckpointInfo]:
        self._check_open()
        infos = []
        for version in self._published():
            try:
                manifest = self._manifest(version)
            except CheckpointError as exc:
                if exc.retriable:
                    raise
                infos.append(CheckpointInfo(version=version, error=str(exc)))
                continue
            infos.append(
                CheckpointInfo(
                    version=version,
                    size_bytes=manifest.size_bytes,
                    created_at=manifest.created_at,
                    samples=manifest.samples,
                    step=manifest.step,
                    offsets=manifest.offsets,
                    writer_id=manifest.writer_id,
                    epoch=manifest.epoch,
                    format_version=manifest.format_version,
                    parts=len(manifest.part_sizes),
                    signed=manifest.signed,
                )
            )
        return infos

    def verify(
        self, version: int, validate: Callable[[Checkpoint], object] | None = None
    ) -> VerifyResult:
        self._check_open()
        manifest = None
        try:
            manifest, parts, sha256 = self._read(version)
            checkpoint = self.codec.decode(manifest, parts, sha256=sha256)
            if validate is not None:
                validate(checkpoint)
        except CheckpointError as exc:
            if exc.retriable:
                raise
            return VerifyResult(
                version=version,
                ok=False,
                error=str(exc),
                size_bytes=0 if manifest is None else manifest.size_bytes,
                signed=False if manifest is None else manifest.signed,
                signature_checked=self.codec.signs,
            )
        return VerifyResult(
            version=version,
            ok=True,
            size_bytes=manifest.size_bytes,
            signed=manifest.signed,
            signature_checked=manifest.signature_checked,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> VersionedStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ helpers

    def _stage(self, checkpoint: Checkpoint) -> tuple[int, EncodedCheckpoint]:
        """Steps 2 and 3 of a save: reserve a version and write it, unpublished."""
        version = self._reserve_version()
        encoded = self.codec.encode(replace(checkpoint, version=version))
        self._write_version(version, encoded)
        return version, encoded

    def _candidates(self) -> list[int]:
        """Versions to try, newest first: the pointer's, then the published ones below it.

        An unreadable pointer is logged and skipped (the published versions remain); with
        neither a pointer nor published versions, that unreadable pointer is raised: a store
        whose history cannot be found must not pass for an empty one.
        """
        try:
            pointer = self._pointer()
        except CheckpointCorruptError as exc:
            logger.warning("the latest pointer is unreadable, trying published versions: %s", exc)
            published = self._published()
            if not published:
                raise
            return list(reversed(published))
        candidates = [] if pointer is None else [pointer]
        candidates += [v for v in reversed(self._published()) if pointer is None or v < pointer]
        return candidates

    def _signatures(self) -> dict[int, bool | None]:
        """Each published version -> whether its manifest is signed (with a key: signed with
        it), ``None`` when unreadable. Raises :class:`UnsignedWriterError` for a writer without a
        key on a store that holds signed versions."""
        signatures: dict[int, bool | None] = {}
        for version in self._published():
            data = self._read_manifest(version)
            signatures[version] = None if data is None else self.codec.is_signed(data)
        if not self.codec.signs:
            signed = sorted(v for v, is_signed in signatures.items() if is_signed)
            if signed:
                msg = (
                    f"this store holds signed checkpoints (versions {signed}) and this writer has "
                    f"no key: set {HMAC_KEY_ENV} to the key they were signed with, or use "
                    "another store"
                )
                raise UnsignedWriterError(msg)
        return signatures

    def _to_drop(self, signatures: dict[int, bool | None]) -> list[int]:
        """Published versions to delete once one more is published: beyond the newest
        ``keep - 1``; with a key only versions whose signature checks count and go."""
        if self.codec.signs:
            prunable = [v for v, is_signed in sorted(signatures.items()) if is_signed]
        else:
            prunable = sorted(signatures)
        return prunable[: max(0, len(prunable) - (self.keep - 1))]

    def _check_epoch(self, checkpoint: Checkpoint) -> None:
        current = self.current_epoch()
        if checkpoint.epoch != current:
            msg = (
                f"writer {checkpoint.writer_id!r} has epoch {checkpoint.epoch} but the store's "
                f"current epoch is {current}: a newer writer took over"
            )
            raise FencedWriterError(msg)

    def _manifest(self, version: int) -> Manifest:
        data = self._read_manifest(version)
        if data is None:
            msg = f"checkpoint version {version} does not exist (no manifest)"
            raise VersionMissingError(msg)
        return self.codec.read_manifest(data, version=version)

    def _read(self, version: int) -> tuple[Manifest, Sequence[PartData | None], str | None]:
        """Manifest (checked), parts (not yet checked: :meth:`CheckpointCodec.decode` does) and,
        when the store hashed them while reading, the SHA-256 of their concatenation."""
        manifest = self._manifest(version)
        parts, sha256 = self._read_parts_hashed(version, manifest.part_sizes)
        return manifest, parts, sha256

    def _read_parts_hashed(
        self, version: int, sizes: Sequence[int]
    ) -> tuple[Sequence[PartData | None], str | None]:
        """The parts, and optionally their SHA-256 computed while they arrived (a store whose
        reads are slow overlaps the two); ``None`` lets the codec hash them."""
        return self._read_parts(version, len(sizes)), None

    def _check_open(self) -> None:
        if self._closed:
            msg = f"{type(self).__name__} is closed"
            raise CheckpointError(msg)
