"""Checkpoint <-> bytes: a safetensors blob of the tensors, a JSON document of the rest, a manifest.

Layout of one stored version
----------------------------
``payload = tensors_blob || state_document``

* ``tensors_blob`` is a safetensors file, byte for byte what :func:`safetensors.torch.save`
  writes for the same dict (no ``__metadata__``): the header length as 8 bytes little-endian,
  the JSON header (``{"NAME": {"dtype", "shape", "data_offsets"}, ...}`` in data order, no
  spaces, non-ASCII names as raw UTF-8, padded with spaces to a multiple of 8 bytes), then the
  raw little-endian bytes of every tensor. Tensors are laid out as safetensors lays them out:
  by dtype in the order I64, F64, F32, I32, BF16, F16, I16, I8, U8, BOOL, then by name. It is
  never built as one buffer: the encoder returns it as a list of segments, the header followed
  by a read-only view of each tensor's own memory (a copy only for a tensor that is not a
  contiguous CPU tensor). It is read back with :func:`safetensors.torch.load`, the library's
  own validating parser. Nothing is ever unpickled.
* ``state_document`` is UTF-8 JSON: the trainer state plus offsets, counters and identity.
* Each section is cut into parts of at most ``chunk_size`` bytes (a Redis string holds at most
  512 MiB); the parts of the tensors come first. A part is a tuple of segments (views, not
  copies) that may straddle tensors; :attr:`EncodedCheckpoint.parts` joins one part on demand.
* The manifest (canonical JSON) lists the format version, the section and part sizes, the
  SHA-256 of the whole payload and a copy of the small metadata (offsets, samples, step, writer,
  epoch) so that versions can be listed without reading parts. When a key is configured
  (environment variable :data:`HMAC_KEY_ENV`, never the store) the manifest carries an
  HMAC-SHA256 over its canonical form, which covers the payload through the SHA-256.

Encoding comes in two steps so that a store can hash the payload while it writes it:
:meth:`CheckpointCodec.layout` (segments and sizes, no hashing) then
:meth:`CheckpointCodec.seal` (the manifest, given the SHA-256 of the payload).
:meth:`CheckpointCodec.encode` does both. A store writes every part, then the manifest, then
publishes; the tensors must not change until the save returns (the views read them in place).

Reading checks, in this order, before anything is decoded: manifest size and nesting (it is
parsed bounded, :func:`~stream_trainer.checkpoints.validation.load_json`), manifest HMAC (when a
key is set), manifest schema and format version (and a state section of at most
:data:`MAX_STATE_BYTES`), number and size of parts, SHA-256 of the payload. Only then are the
safetensors header and the JSON document (bounded again) parsed. A failed check raises
:class:`~stream_trainer.checkpoints.validation.CheckpointInvalidError` with its reason.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import safetensors.torch
import torch

from stream_trainer.checkpoints.checkpoint import FORMAT_VERSION, Checkpoint
from stream_trainer.checkpoints.validation import (
    MAX_MANIFEST_DEPTH,
    MAX_STATE_DEPTH,
    CheckpointInvalidError,
    json_depth,
    load_json,
)
from stream_trainer.errors import CheckpointError, ConfigError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "HMAC_KEY_ENV",
    "MAX_CHUNK_SIZE",
    "MAX_STATE_BYTES",
    "UPGRADES",
    "CheckpointCodec",
    "CheckpointLayout",
    "ChunkedPart",
    "EncodedCheckpoint",
    "Manifest",
    "safetensors_segments",
]

DEFAULT_CHUNK_SIZE = 64 * 2**20
#: Redis refuses bulk strings above 512 MiB (``proto-max-bulk-len``).
MAX_CHUNK_SIZE = 512 * 2**20
HMAC_KEY_ENV = "STREAM_TRAINER_CHECKPOINT_HMAC_KEY"
_MAX_MANIFEST_BYTES = 16 * 2**20
#: Largest state document read back (it holds the feature schema, labels and metrics; the
#: tensors are apart): a manifest that announces more is refused before any part is read.
MAX_STATE_BYTES = 256 * 2**20

#: ``UPGRADES[n]`` turns a format-``n`` state document into a format-``n + 1`` one. Loading runs
#: the chain up to :data:`FORMAT_VERSION`; a format with no path is refused with a clear error.
#: Format 1 is the first, so the table is empty.
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}

# torch dtype -> safetensors dtype name. Only these are written; the reader accepts what
# safetensors accepts.
_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# The order in which safetensors lays tensors out: by dtype, from the last member of its ``Dtype``
# enum to the first (U64, I64, F64, ..., U8, BOOL), then by name. Ranks of the dtypes above.
_SAFETENSORS_ORDER = {
    name: rank
    for rank, name in enumerate(
        ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")
    )
}
_META_KEYS = (
    "created_at",
    "samples",
    "step",
    "offsets",
    "writer_id",
    "epoch",
    "config_fingerprint",
)


@dataclass(frozen=True)
class Manifest:
    """What a stored version's manifest says, read without touching its parts."""

    format_version: int
    version: int
    sha256: str
    tensors_size: int
    state_size: int
    tensor_parts: int
    part_sizes: tuple[int, ...]
    created_at: float
    samples: int
    step: int
    offsets: dict[str, int]
    writer_id: str
    epoch: int
    config_fingerprint: str
    signed: bool
    signature_checked: bool

    @property
    def size_bytes(self) -> int:
        """Bytes of payload (all parts), manifest excluded."""
        return self.tensors_size + self.state_size


Part = tuple[memoryview, ...]


class ChunkedPart:
    """A part read back in several ranges, kept as those ranges.

    A store that reads a part piecewise hands this to :meth:`CheckpointCodec.decode` instead of
    joining the ranges itself: the decoder joins every range of a section in one go, one copy of
    the payload where joining the ranges of each part and then the parts would make two.
    ``len()`` is the part's size in bytes.
    """

    __slots__ = ("_size", "chunks")

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self.chunks = tuple(chunks)
        self._size = sum(len(chunk) for chunk in self.chunks)

    def __len__(self) -> int:
        return self._size


PartData = bytes | ChunkedPart
"""One part as read back by a store: its bytes, or its ranges (:class:`ChunkedPart`)."""


@dataclass(frozen=True)
class CheckpointLayout:
    """A checkpoint laid out as parts, before hashing: see :meth:`CheckpointCodec.layout`.

    ``parts`` holds every part in write order (the tensor parts first, then the state parts),
    each as a tuple of views into the tensors and the state document; nothing is copied.
    """

    version: int
    meta: dict[str, Any]
    tensors_size: int
    state_size: int
    tensor_parts: int
    parts: list[Part]

    def sha256(self) -> str:
        """Hex SHA-256 of the payload: every segment of every part, in order."""
        digest = hashlib.sha256()
        for part in self.parts:
            for segment in part:
                digest.update(segment)
        return digest.hexdigest()


class _JoinedParts(Sequence[memoryview]):
    """The parts as contiguous buffers, each joined only when it is asked for."""

    def __init__(self, parts: list[Part]) -> None:
        self._parts = parts

    def __len__(self) -> int:
        return len(self._parts)

    @overload
    def __getitem__(self, index: int) -> memoryview: ...
    @overload
    def __getitem__(self, index: slice) -> list[memoryview]: ...
    def __getitem__(self, index: int | slice) -> memoryview | list[memoryview]:
        if isinstance(index, slice):
            return [_joined(part) for part in self._parts[index]]
        return _joined(self._parts[index])

    def __iter__(self) -> Iterator[memoryview]:
        return (_joined(part) for part in self._parts)


@dataclass(frozen=True)
class EncodedCheckpoint:
    """An encoded checkpoint: write the parts in order, then ``manifest_bytes``.

    ``segments[i]`` is part ``i`` as views (zero-copy, for stores that can write a part in
    pieces); :attr:`parts` gives each part as one buffer, joining its segments on access.
    """

    manifest: Manifest
    manifest_bytes: bytes
    segments: list[Part]

    @property
    def parts(self) -> Sequence[memoryview]:
        """Part ``i`` as one contiguous buffer (a copy when it spans several segments)."""
        return _JoinedParts(self.segments)


class CheckpointCodec:
    """Encodes and decodes checkpoints; see the module docstring for the layout.

    Parameters
    ----------
    chunk_size
        Largest part in bytes, in ``[1, MAX_CHUNK_SIZE]``.
    hmac_key
        Key of the manifest HMAC, or ``None`` to neither sign nor require signatures. With a key,
        unsigned and wrongly signed checkpoints are refused. Use :meth:`from_env` in production.
    """

    def __init__(self, *, chunk_size: int = DEFAULT_CHUNK_SIZE, hmac_key: bytes | None = None):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            msg = f"chunk_size must be an int, got {chunk_size!r}"
            raise ConfigError(msg)
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            msg = f"chunk_size must be in [1, {MAX_CHUNK_SIZE}] bytes, got {chunk_size!r}"
            raise ConfigError(msg)
        if hmac_key is not None and (not isinstance(hmac_key, bytes) or not hmac_key):
            msg = "hmac_key must be non-empty bytes or None"
            raise ConfigError(msg)
        self.chunk_size = chunk_size
        self._hmac_key = hmac_key

    @classmethod
    def from_env(
        cls, *, chunk_size: int = DEFAULT_CHUNK_SIZE, environ: Mapping[str, str] | None = None
    ) -> CheckpointCodec:
        """The production codec: HMAC key from :data:`HMAC_KEY_ENV` (UTF-8) when it is set."""
        env = os.environ if environ is None else environ
        raw = env.get(HMAC_KEY_ENV)
        if raw is not None and not raw:
            msg = f"{HMAC_KEY_ENV} is set but empty; unset it or give a key"
            raise ConfigError(msg)
        return cls(chunk_size=chunk_size, hmac_key=raw.encode() if raw else None)

    @property
    def signs(self) -> bool:
        """Whether this codec signs manifests and requires valid signatures."""
        return self._hmac_key is not None

    # ------------------------------------------------------------------ encode

    def encode(self, checkpoint: Checkpoint) -> EncodedCheckpoint:
        """Encode ``checkpoint`` (its ``version`` included) into parts and a manifest.

        The same as :meth:`layout`, hashing every part here, then :meth:`seal`.
        """
        layout = self.layout(checkpoint)
        return self.seal(layout, layout.sha256())

    def layout(self, checkpoint: Checkpoint) -> CheckpointLayout:
        """Lay ``checkpoint`` out as parts (views, no copy) without hashing them.

        Raises :class:`CheckpointError` for a tensor safetensors cannot hold or a state that is
        not JSON.
        """
        segments = safetensors_segments(checkpoint.tensors)
        document = {
            "format_version": FORMAT_VERSION,
            "version": checkpoint.version,
            "state": checkpoint.state,
            **{key: getattr(checkpoint, key) for key in _META_KEYS},
        }
        try:
            doc = json.dumps(document, allow_nan=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            msg = f"checkpoint state is not JSON (no NaN/inf, no objects): {exc}"
            raise CheckpointError(msg) from exc
        if json_depth(doc) > MAX_STATE_DEPTH:
            msg = f"checkpoint state is nested deeper than {MAX_STATE_DEPTH} (it could not be read)"
            raise CheckpointError(msg)
        if json.loads(doc)["state"] != checkpoint.state:
            msg = "checkpoint state does not survive JSON unchanged (tuples? non-str keys?)"
            raise CheckpointError(msg)
        tensor_parts = _split(segments, self.chunk_size)
        return CheckpointLayout(
            version=checkpoint.version,
            meta={key: getattr(checkpoint, key) for key in _META_KEYS},
            tensors_size=sum(len(segment) for segment in segments),
            state_size=len(doc),
            tensor_parts=len(tensor_parts),
            parts=tensor_parts + _split([memoryview(doc)], self.chunk_size),
        )

    def seal(self, layout: CheckpointLayout, sha256: str) -> EncodedCheckpoint:
        """The manifest of ``layout``, whose payload has the hex SHA-256 ``sha256``.

        ``sha256`` must have been computed over exactly the bytes that were (or will be) written;
        a wrong one makes the version fail its checks on load, never load wrong tensors.
        """
        body = {
            "format_version": FORMAT_VERSION,
            "version": layout.version,
            "sha256": sha256,
            "sections": {"tensors": layout.tensors_size, "state": layout.state_size},
            "tensor_parts": layout.tensor_parts,
            "parts": [sum(len(segment) for segment in part) for part in layout.parts],
            "meta": layout.meta,
        }
        signature = None
        if self._hmac_key is not None:
            signature = hmac.new(self._hmac_key, _canonical(body), hashlib.sha256).hexdigest()
        manifest_bytes = _canonical({"manifest": body, "hmac": signature})
        manifest = self.read_manifest(manifest_bytes, version=layout.version)
        return EncodedCheckpoint(
            manifest=manifest, manifest_bytes=manifest_bytes, segments=layout.parts
        )

    # ------------------------------------------------------------------ decode

    def read_manifest(self, data: bytes, *, version: int) -> Manifest:
        """Check and parse a manifest: size and nesting, then HMAC, then format, then schema.

        Raises :class:`CheckpointInvalidError` when it fails a check, :class:`CheckpointError`
        when it comes from a newer format or one with no upgrade path.
        """
        where = f"checkpoint version {version}"
        if len(data) > _MAX_MANIFEST_BYTES:
            msg = f"{where}: manifest of {len(data)} bytes is over {_MAX_MANIFEST_BYTES}"
            raise CheckpointInvalidError(msg, reason="manifest")
        envelope = self._envelope(data, where)
        body, signature = envelope["manifest"], envelope["hmac"]
        if self._hmac_key is not None:
            if signature is None:
                msg = f"{where}: unsigned checkpoint refused ({HMAC_KEY_ENV} is set)"
                raise CheckpointInvalidError(msg, reason="unsigned")
            expected = hmac.new(self._hmac_key, _canonical(body), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, signature):
                msg = f"{where}: HMAC does not match (wrong key or tampered manifest)"
                raise CheckpointInvalidError(msg, reason="signature")
        fmt = body.get("format_version")
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
            msg = f"{where}: manifest has no valid format_version ({fmt!r})"
            raise CheckpointInvalidError(msg, reason="manifest")
        _check_format(fmt, where)
        try:
            sections = body["sections"]
            meta = body["meta"]
            manifest = Manifest(
                format_version=fmt,
                version=_int(body["version"]),
                sha256=_str(body["sha256"]),
                tensors_size=_int(sections["tensors"]),
                state_size=_int(sections["state"]),
                tensor_parts=_int(body["tensor_parts"]),
                part_sizes=tuple(_int(size) for size in body["parts"]),
                created_at=_float(meta["created_at"]),
                samples=_int(meta["samples"]),
                step=_int(meta["step"]),
                offsets={_str(k): _int(v) for k, v in meta["offsets"].items()},
                writer_id=_str(meta["writer_id"]),
                epoch=_int(meta["epoch"]),
                config_fingerprint=_str(meta["config_fingerprint"]),
                signed=signature is not None,
                signature_checked=self._hmac_key is not None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            msg = f"{where}: manifest field missing or of the wrong type ({exc!r})"
            raise CheckpointInvalidError(msg, reason="manifest") from exc
        if manifest.version != version:
            msg = f"{where}: manifest belongs to version {manifest.version}"
            raise CheckpointInvalidError(msg, reason="manifest")
        sizes = manifest.part_sizes
        if (
            len(manifest.sha256) != 64
            or not 0 <= manifest.tensor_parts <= len(sizes)
            or sum(sizes[: manifest.tensor_parts]) != manifest.tensors_size
            or sum(sizes[manifest.tensor_parts :]) != manifest.state_size
        ):
            msg = f"{where}: manifest sizes or checksum field are inconsistent"
            raise CheckpointInvalidError(msg, reason="manifest")
        if manifest.state_size > MAX_STATE_BYTES:
            size = manifest.state_size
            msg = f"{where}: state document of {size} bytes is over {MAX_STATE_BYTES}"
            raise CheckpointInvalidError(msg, reason="manifest")
        return manifest

    def is_signed(self, data: bytes) -> bool | None:
        """Whether a stored manifest carries a signature that checks with this codec's key (with
        no key: any signature); ``None`` when the manifest cannot be read at all."""
        try:
            envelope = self._envelope(data, "manifest")
        except CheckpointInvalidError:
            return None
        signature = envelope["hmac"]
        if signature is None or self._hmac_key is None:
            return signature is not None
        expected = hmac.new(self._hmac_key, _canonical(envelope["manifest"]), hashlib.sha256)
        return hmac.compare_digest(expected.hexdigest(), signature)

    @staticmethod
    def _envelope(data: bytes, where: str) -> dict[str, Any]:
        """The manifest's ``{"manifest": {...}, "hmac": str | None}``, parsed bounded."""
        if len(data) > _MAX_MANIFEST_BYTES:
            msg = f"{where}: manifest of {len(data)} bytes is over {_MAX_MANIFEST_BYTES}"
            raise CheckpointInvalidError(msg, reason="manifest")
        try:
            envelope = load_json(data, max_depth=MAX_MANIFEST_DEPTH)
            body = envelope["manifest"]
            signature = envelope["hmac"]
        except (ValueError, TypeError, KeyError) as exc:
            msg = f"{where}: manifest is not valid JSON of the expected shape ({exc})"
            raise CheckpointInvalidError(msg, reason="manifest") from exc
        if not isinstance(body, dict) or not (signature is None or isinstance(signature, str)):
            msg = f"{where}: manifest is not valid JSON of the expected shape"
            raise CheckpointInvalidError(msg, reason="manifest")
        return {"manifest": body, "hmac": signature}

    def check_parts(
        self, manifest: Manifest, parts: Sequence[PartData | None], *, sha256: str | None = None
    ) -> None:
        """Check part count, sizes and the payload SHA-256; decodes nothing.

        ``sha256`` is the hex digest of the concatenated parts when the store already computed it
        while reading them (over exactly these bytes); otherwise it is computed here.
        """
        where = f"checkpoint version {manifest.version}"
        if len(parts) != len(manifest.part_sizes):
            msg = f"{where}: {len(parts)} parts read, manifest lists {len(manifest.part_sizes)}"
            raise CheckpointInvalidError(msg, reason="missing")
        digest = hashlib.sha256()
        for index, (part, size) in enumerate(zip(parts, manifest.part_sizes, strict=True)):
            if part is None:
                msg = f"{where}: part {index} is missing"
                raise CheckpointInvalidError(msg, reason="missing")
            if len(part) != size:
                msg = f"{where}: part {index} has {len(part)} bytes, manifest says {size}"
                raise CheckpointInvalidError(msg, reason="checksum")
            if sha256 is None:
                for piece in part.chunks if isinstance(part, ChunkedPart) else (part,):
                    digest.update(piece)
        if not hmac.compare_digest(sha256 or digest.hexdigest(), manifest.sha256):
            msg = f"{where}: SHA-256 of the payload does not match the manifest"
            raise CheckpointInvalidError(msg, reason="checksum")

    def decode(
        self, manifest: Manifest, parts: Sequence[PartData | None], *, sha256: str | None = None
    ) -> Checkpoint:
        """Check the parts (:meth:`check_parts`), then decode them into a :class:`Checkpoint`.

        The state document is parsed bounded (:func:`~stream_trainer.checkpoints.validation.
        load_json`: nesting, finite numbers); what it holds is the caller's to validate.
        """
        self.check_parts(manifest, parts, sha256=sha256)
        where = f"checkpoint version {manifest.version}"
        blob = _join(parts[: manifest.tensor_parts])
        doc = _join(parts[manifest.tensor_parts :])
        try:
            # Not unpickling: safetensors reads a JSON header (names, dtypes, shapes, byte ranges)
            # and copies raw little-endian bytes; it has no code path that runs stored objects.
            tensors = safetensors.torch.load(blob)
        except Exception as exc:  # the parser's own error types vary between versions
            msg = f"{where}: tensor section is not a valid safetensors blob ({exc})"
            raise CheckpointInvalidError(msg, reason="tensors") from exc
        try:
            document = load_json(doc, max_depth=MAX_STATE_DEPTH)
            if not isinstance(document, dict):
                raise TypeError("state document is not a JSON object")
        except (ValueError, TypeError) as exc:
            msg = f"{where}: state section is not a JSON object ({exc})"
            raise CheckpointInvalidError(msg, reason="state") from exc
        document = _upgrade(document, manifest.format_version, where)
        meta = {key: document.get(key) for key in _META_KEYS}
        expected = {key: getattr(manifest, key) for key in _META_KEYS}
        if meta != expected or document.get("version") != manifest.version:
            msg = f"{where}: state document disagrees with its manifest"
            raise CheckpointInvalidError(msg, reason="state")
        try:
            return Checkpoint(
                tensors=dict(tensors),
                state=document["state"],
                version=manifest.version,
                format_version=FORMAT_VERSION,
                **meta,
            )
        except (KeyError, CheckpointError) as exc:
            msg = f"{where}: state document is invalid ({exc})"
            raise CheckpointInvalidError(msg, reason="state") from exc


def safetensors_segments(tensors: Mapping[str, torch.Tensor]) -> list[memoryview]:
    """The bytes :func:`safetensors.torch.save` writes for ``tensors``, as a list of segments.

    ``b"".join(safetensors_segments(t)) == safetensors.torch.save(t)``. The first segment is the
    8-byte header length and the padded JSON header; then comes one read-only view per non-empty
    tensor, in data order, over the tensor's own memory: a tensor is copied only when it is not
    a contiguous CPU tensor. The views keep the tensors alive; the tensors must not change while
    the segments are in use.
    """
    if sys.byteorder != "little":  # pragma: no cover - no such machine in production
        raise CheckpointError("checkpoints are written on little-endian machines only")
    ordered = []
    for name, tensor in tensors.items():
        dtype_name = _DTYPES.get(tensor.dtype)
        if dtype_name is None:
            msg = f"tensor {name!r} has dtype {tensor.dtype}; supported: {sorted(_DTYPES.values())}"
            raise CheckpointError(msg)
        if tensor.layout != torch.strided:
            msg = f"tensor {name!r} is {tensor.layout}; only dense tensors are saved"
            raise CheckpointError(msg)
        if name == "__metadata__":
            raise CheckpointError("'__metadata__' is reserved by safetensors; rename the tensor")
        ordered.append((_SAFETENSORS_ORDER[dtype_name], name, tensor, dtype_name))
    ordered.sort(key=lambda item: (item[0], item[1]))
    header: dict[str, Any] = {}
    views: list[memoryview] = []
    offset = 0
    for _, name, tensor, dtype_name in ordered:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": dtype_name,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        if nbytes:
            source = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            views.append(source.numpy().data.toreadonly())
    try:
        header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        msg = f"a tensor name is not valid Unicode: {exc}"
        raise CheckpointError(msg) from exc
    header_bytes += b" " * (-len(header_bytes) % 8)
    return [memoryview(len(header_bytes).to_bytes(8, "little") + header_bytes), *views]


def _split(segments: Sequence[memoryview], size: int) -> list[Part]:
    """Cut the concatenation of ``segments`` into parts of ``size`` bytes (the last one shorter),
    each part a tuple of slices of the segments."""
    parts: list[Part] = []
    current: list[memoryview] = []
    room = size
    for segment in segments:
        begin = 0
        while begin < len(segment):
            take = min(room, len(segment) - begin)
            current.append(segment[begin : begin + take])
            begin += take
            room -= take
            if room == 0:
                parts.append(tuple(current))
                current, room = [], size
    if current:
        parts.append(tuple(current))
    return parts


def _joined(part: Part) -> memoryview:
    return part[0] if len(part) == 1 else memoryview(b"".join(part))


def _join(parts: Sequence[PartData | None]) -> bytes:
    pieces: list[bytes] = []
    for part in parts:
        if isinstance(part, ChunkedPart):
            pieces.extend(part.chunks)
        elif part is not None:
            pieces.append(part)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _canonical(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def _check_format(fmt: int, where: str) -> None:
    if fmt > FORMAT_VERSION:
        msg = (
            f"{where}: written in checkpoint format {fmt} by a newer stream-trainer; "
            f"this one reads formats up to {FORMAT_VERSION}"
        )
        raise CheckpointError(msg)
    missing = [n for n in range(fmt, FORMAT_VERSION) if n not in UPGRADES]
    if missing:
        msg = (
            f"{where}: checkpoint format {fmt} cannot be upgraded to {FORMAT_VERSION} "
            f"(no upgrade from format {missing[0]})"
        )
        raise CheckpointError(msg)


def _upgrade(document: dict[str, Any], fmt: int, where: str) -> dict[str, Any]:
    _check_format(fmt, where)
    for n in range(fmt, FORMAT_VERSION):
        document = UPGRADES[n](document)
    return document


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: object) -> int:
    if not _is_int(value) or not 0 <= value < 2**63:  # type: ignore[operator]
        raise ValueError(f"expected an int in [0, 2**63), got {value!r}")
    return value  # type: ignore[return-value]


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a str, got {value!r}")
    return value
