"""A checkpoint store in a local directory: the embedded default (``file://DIR``).

Layout::

    DIR/LATEST                 {"latest": N, "published": [..., N]}  (the pointer)
    DIR/EPOCH                  {"epoch": E, "writer_id": "..."}
    DIR/NEXT                   next version number to reserve
    DIR/.lock                  flock(2) taken around every read-modify-write of the three above
    DIR/versions/N/part-00000  parts of version N, then DIR/versions/N/manifest.json
    DIR/staging/               versions being written

A version is written in ``staging/``, each file fsynced, then renamed into ``versions/`` in one
step. Publishing rewrites ``LATEST`` through a temporary file, fsync and :func:`os.replace`, under
the lock, after checking the epoch and that every part is on disk. A crash leaves either the old
pointer or the new one, never a half-written version behind it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from stream_trainer.checkpoints.codec import CheckpointCodec, EncodedCheckpoint, PartData
from stream_trainer.checkpoints.store import DEFAULT_KEEP, VersionedStore
from stream_trainer.checkpoints.validation import CheckpointInvalidError, load_json
from stream_trainer.errors import CheckpointError, FencedWriterError

__all__ = ["LocalDirCheckpointStore"]

_MAX_CONTROL_BYTES = 1 << 20  # LATEST lists the published versions: a few bytes each


class LocalDirCheckpointStore(VersionedStore):
    """Checkpoints in ``directory`` (created if missing).

    Parameters
    ----------
    directory
        Where the store lives; one trainer deployment per directory.
    keep
        Published versions to keep; older ones are deleted after each successful save.
    codec
        Encoder/decoder; default :meth:`CheckpointCodec.from_env`.
    fsync
        Flush files and directories to disk before each rename (turn off only in tests).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep: int = DEFAULT_KEEP,
        codec: CheckpointCodec | None = None,
        fsync: bool = True,
    ) -> None:
        super().__init__(keep=keep, codec=codec)
        self.directory = Path(directory)
        self._fsync = fsync
        try:
            (self.directory / "versions").mkdir(parents=True, exist_ok=True)
            (self.directory / "staging").mkdir(exist_ok=True)
        except OSError as exc:
            msg = f"cannot create checkpoint directory {self.directory}: {exc}"
            raise CheckpointError(msg) from exc

    # ------------------------------------------------------------ epoch

    def _acquire_epoch(self, writer_id: str) -> int:
        with self._locked():
            epoch = self._read_epoch() + 1
            self._write_atomic("EPOCH", _json({"epoch": epoch, "writer_id": writer_id}))
            return epoch

    def current_epoch(self) -> int:
        self._check_open()
        return self._read_epoch()

    # ------------------------------------------------------------ primitives

    def _reserve_version(self) -> int:
        with self._locked():
            try:
                version = int((self.directory / "NEXT").read_text())
            except FileNotFoundError:
                version = 1 + max([0, *self._on_disk(), *self._read_pointer()[1]])
            except (OSError, ValueError) as exc:
                msg = f"cannot read {self.directory / 'NEXT'}: {exc}"
                raise CheckpointError(msg) from exc
            self._write_atomic("NEXT", str(version + 1).encode())
            return version

    def _write_version(self, version: int, encoded: EncodedCheckpoint) -> None:
        staging = self.directory / "staging" / f"{version}-{uuid.uuid4().hex}"
        try:
            staging.mkdir()
            for index, part in enumerate(encoded.parts):
                self._write_file(staging / _part_name(index), part)
            self._write_file(staging / "manifest.json", encoded.manifest_bytes)
            self._sync_dir(staging)
            os.rename(staging, self.directory / "versions" / str(version))
            self._sync_dir(self.directory / "versions")
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            msg = f"cannot write checkpoint version {version} in {self.directory}: {exc}"
            raise CheckpointError(msg) from exc

    def _publish(self, version: int, epoch: int, parts: int, drop: Sequence[int]) -> None:
        with self._locked():
            current = self._read_epoch()
            if epoch != current:
                msg = f"epoch {epoch} is not the current epoch {current}; version {version} refused"
                raise FencedWriterError(msg)
            latest, published = self._read_pointer()
            if latest is not None and latest >= version:
                msg = f"version {version} is older than the latest version {latest}"
                raise CheckpointError(msg)
            folder = self.directory / "versions" / str(version)
            names = ["manifest.json", *(_part_name(i) for i in range(parts))]
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                msg = f"version {version} is incomplete (missing {missing}); not published"
                raise CheckpointError(msg)
            published = [v for v in published if v not in set(drop)] + [version]
            self._write_atomic("LATEST", _json({"latest": version, "published": published}))
            self._prune(version, set(published))

    def _read_manifest(self, version: int) -> bytes | None:
        return _read(self.directory / "versions" / str(version) / "manifest.json")

    def _read_parts(self, version: int, count: int) -> Sequence[bytes | None]:
        folder = self.directory / "versions" / str(version)
        return [_read(folder / _part_name(index)) for index in range(count)]

    def _read_parts_hashed(
        self, version: int, sizes: Sequence[int]
    ) -> tuple[Sequence[PartData | None], str | None]:
        """Each part read up to one byte past the size its manifest gives: a part file grown
        out of bounds is never read whole (the size check then refuses it)."""
        folder = self.directory / "versions" / str(version)
        parts = [_read(folder / _part_name(i), limit=size) for i, size in enumerate(sizes)]
        return parts, None

    def _pointer(self) -> int | None:
        return self._read_pointer()[0]

    def _published(self) -> list[int]:
        return self._read_pointer()[1]

    # ------------------------------------------------------------ helpers

    def _prune(self, newest: int, kept: set[int]) -> None:
        """Delete published versions beyond ``keep`` and abandoned writes below ``newest``."""
        for version in self._on_disk():
            if version < newest and version not in kept:
                shutil.rmtree(self.directory / "versions" / str(version), ignore_errors=True)
        for entry in (self.directory / "staging").iterdir():
            number = entry.name.partition("-")[0]
            if number.isdigit() and int(number) < newest:
                shutil.rmtree(entry, ignore_errors=True)

    def _on_disk(self) -> list[int]:
        folder = self.directory / "versions"
        return sorted(int(entry.name) for entry in folder.iterdir() if entry.name.isdigit())

    def _read_pointer(self) -> tuple[int | None, list[int]]:
        pointer = self._read_control("LATEST")
        if pointer is None:
            return None, []
        try:
            latest, published = pointer["latest"], pointer["published"]
            if not _is_version(latest) or not all(_is_version(v) for v in published):
                raise TypeError("not version numbers")
        except (TypeError, KeyError) as exc:
            msg = f"the LATEST pointer in {self.directory} is unreadable ({exc!r})"
            raise CheckpointInvalidError(msg, reason="manifest") from exc
        return latest, sorted(published)

    def _read_epoch(self) -> int:
        data = self._read_control("EPOCH")
        if data is None:
            return 0
        epoch = data.get("epoch") if isinstance(data, dict) else None
        if not isinstance(epoch, int) or not _is_version(epoch):
            msg = f"the EPOCH file in {self.directory} is unreadable ({epoch!r} is no epoch)"
            raise CheckpointError(msg)
        return epoch

    def _read_control(self, name: str) -> Any:
        """One of the small JSON files (``LATEST``, ``EPOCH``), read and parsed bounded."""
        path = self.directory / name
        data = _read(path, limit=_MAX_CONTROL_BYTES)
        if data is None:
            return None
        try:
            if len(data) > _MAX_CONTROL_BYTES:
                raise ValueError(f"larger than {_MAX_CONTROL_BYTES} bytes")
            return load_json(data, max_depth=2)
        except ValueError as exc:
            msg = f"{path} is unreadable ({exc})"
            raise CheckpointInvalidError(msg, reason="manifest") from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A fresh descriptor each time, so threads of one process exclude each other too.
        with open(self.directory / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write_atomic(self, name: str, data: bytes) -> None:
        target = self.directory / name
        temporary = self.directory / f".{name}.{uuid.uuid4().hex}.tmp"
        try:
            self._write_file(temporary, data)
            os.replace(temporary, target)
            self._sync_dir(self.directory)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            msg = f"cannot write {target}: {exc}"
            raise CheckpointError(msg) from exc

    def _write_file(self, path: Path, data: bytes | memoryview) -> None:
        with open(path, "wb") as handle:
            handle.write(data)
            if self._fsync:
                handle.flush()
                os.fsync(handle.fileno())

    def _sync_dir(self, path: Path) -> None:
        if self._fsync:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)


def _part_name(index: int) -> str:
    return f"part-{index:05d}"


def _is_version(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _read(path: Path, *, limit: int | None = None) -> bytes | None:
    """The file's bytes (at most ``limit + 1`` with a limit), ``None`` if it is absent."""
    try:
        if limit is not None:
            with open(path, "rb") as handle:
                return handle.read(limit + 1)
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        msg = f"cannot read {path}: {exc}"
        raise CheckpointError(msg) from exc


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True).encode()
