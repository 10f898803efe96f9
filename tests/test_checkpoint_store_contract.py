"""One contract suite over every checkpoint store: memory, local directory and Redis.

Each store gets a ``Backend``: a way to open more stores on the same storage (a second trainer)
and a ``Tamper`` that reaches the raw bytes to simulate corruption. The Redis cases need a real
redis-server and are marked ``integration``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from stream_trainer.checkpoints import (
    HMAC_KEY_ENV,
    Checkpoint,
    CheckpointCodec,
    CheckpointInvalidError,
    CheckpointStore,
    LocalDirCheckpointStore,
    MemoryCheckpointStore,
    RedisCheckpointStore,
    UnsignedWriterError,
)
from stream_trainer.checkpoints.store import VersionedStore
from stream_trainer.errors import CheckpointCorruptError, CheckpointError, FencedWriterError

KEY = b"test-hmac-key"
CHUNK = 64  # bytes: every checkpoint here spans several parts


def make_checkpoint(seed: int, *, epoch: int = 0, writer: str = "writer-a") -> Checkpoint:
    gen = torch.Generator().manual_seed(seed)
    return Checkpoint(
        tensors={
            "model.w": torch.randn(4, 3, generator=gen),
            "model.b64": torch.randn(5, generator=gen, dtype=torch.float64),
            "optim.step": torch.tensor([seed], dtype=torch.int64),
        },
        state={"seed": seed, "labels": ["a", "b"], "mean": 0.25 * seed},
        offsets={"clicks:0": 10 * seed, "clicks:1": 10 * seed + 1},
        samples=100 * seed,
        step=seed,
        config_fingerprint="cfg-1",
        writer_id=writer,
        epoch=epoch,
        created_at=1_700_000_000.0 + seed,
    )


def assert_same(loaded: Checkpoint, original: Checkpoint) -> None:
    assert loaded.tensors.keys() == original.tensors.keys()
    for name, tensor in original.tensors.items():
        got = loaded.tensors[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
    for name in ("state", "offsets", "samples", "step", "config_fingerprint", "writer_id", "epoch"):
        assert getattr(loaded, name) == getattr(original, name), name
    assert loaded.created_at == original.created_at


class Tamper:
    """Raw access to one store's storage."""

    def part(self, version: int, index: int) -> bytes: ...
    def set_part(self, version: int, index: int, data: bytes) -> None: ...
    def delete_part(self, version: int, index: int) -> None: ...
    def manifest(self, version: int) -> bytes: ...
    def set_manifest(self, version: int, data: bytes) -> None: ...
    def set_pointer(self, version: int) -> None: ...
    def exists(self, version: int) -> bool: ...


class MemoryTamper(Tamper):
    def __init__(self, store: MemoryCheckpointStore) -> None:
        self.space = store._space

    def part(self, version: int, index: int) -> bytes:
        return self.space.parts[version, index]

    def set_part(self, version: int, index: int, data: bytes) -> None:
        self.space.parts[version, index] = data

    def delete_part(self, version: int, index: int) -> None:
        del self.space.parts[version, index]

    def manifest(self, version: int) -> bytes:
        return self.space.manifests[version]

    def set_manifest(self, version: int, data: bytes) -> None:
        self.space.manifests[version] = data

    def set_pointer(self, version: int) -> None:
        self.space.latest = version

    def exists(self, version: int) -> bool:
        return version in self.space.manifests or any(k[0] == version for k in self.space.parts)


class LocalTamper(Tamper):
    def __init__(self, root: Path) -> None:
        self.root = root

    def _part(self, version: int, index: int) -> Path:
        return self.root / "versions" / str(version) / f"part-{index:05d}"

    def part(self, version: int, index: int) -> bytes:
        return self._part(version, index).read_bytes()

    def set_part(self, version: int, index: int, data: bytes) -> None:
        self._part(version, index).write_bytes(data)

    def delete_part(self, version: int, index: int) -> None:
        self._part(version, index).unlink()

    def manifest(self, version: int) -> bytes:
        return (self.root / "versions" / str(version) / "manifest.json").read_bytes()

    def set_manifest(self, version: int, data: bytes) -> None:
        (self.root / "versions" / str(version) / "manifest.json").write_bytes(data)

    def set_pointer(self, version: int) -> None:
        pointer = json.loads((self.root / "LATEST").read_bytes())
        pointer["latest"] = version
        (self.root / "LATEST").write_text(json.dumps(pointer))

    def exists(self, version: int) -> bool:
        return (self.root / "versions" / str(version)).exists()


class RedisTamper(Tamper):
    def __init__(self, store: RedisCheckpointStore) -> None:
        self.client, self.prefix = store.client, store.prefix

    def set_part(self, version: int, index: int, data: bytes) -> None:
        self.client.set(f"{self.prefix}:v:{version}:part:{index}", data)

    def part(self, version: int, index: int) -> bytes:
        return self.client.get(f"{self.prefix}:v:{version}:part:{index}")

    def delete_part(self, version: int, index: int) -> None:
        assert self.client.delete(f"{self.prefix}:v:{version}:part:{index}") == 1

    def manifest(self, version: int) -> bytes:
        return self.client.get(f"{self.prefix}:v:{version}:manifest")

    def set_manifest(self, version: int, data: bytes) -> None:
        self.client.set(f"{self.prefix}:v:{version}:manifest", data)

    def set_pointer(self, version: int) -> None:
        self.client.set(f"{self.prefix}:latest", version)

    def exists(self, version: int) -> bool:
        return bool(list(self.client.scan_iter(match=f"{self.prefix}:v:{version}:*")))


@dataclass
class Backend:
    kind: str
    open: Callable[..., VersionedStore]  # another store on the same storage
    tamper: Tamper


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HMAC_KEY_ENV, raising=False)


@pytest.fixture(params=["memory", "local", pytest.param("redis", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    opened: list[VersionedStore] = []

    def options(kw: dict[str, Any]) -> dict[str, Any]:
        kw.setdefault("codec", CheckpointCodec(chunk_size=CHUNK))
        return kw

    if request.param == "memory":
        root = MemoryCheckpointStore()

        def open_store(**kw: Any) -> VersionedStore:
            return root.reopen(**options(kw))

        tamper: Tamper = MemoryTamper(root)
    elif request.param == "local":

        def open_store(**kw: Any) -> VersionedStore:
            return LocalDirCheckpointStore(tmp_path / "ckpt", fsync=False, **options(kw))

        tamper = LocalTamper(tmp_path / "ckpt")
    else:
        url = request.getfixturevalue("redis_url")

        def open_store(**kw: Any) -> VersionedStore:
            return RedisCheckpointStore.from_url(url, prefix="contract", **options(kw))

        tamper = RedisTamper(open_store())

    def tracked(**kw: Any) -> VersionedStore:
        store = open_store(**kw)
        opened.append(store)
        return store

    yield Backend(request.param, tracked, tamper)
    for store in opened:
        store.close()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts safetensors parses: proof that a rejected version was never decoded."""
    calls: list[int] = []
    real = safetensors.torch.load

    def counting(data: bytes) -> dict[str, torch.Tensor]:
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(safetensors.torch, "load", counting)
    return calls


def rewrite_manifest(
    tamper: Tamper, version: int, change: Callable[[dict[str, Any]], None], key: bytes | None
) -> None:
    envelope = json.loads(tamper.manifest(version))
    change(envelope["manifest"])
    body = json.dumps(envelope["manifest"], sort_keys=True, separators=(",", ":")).encode()
    envelope["hmac"] = None if key is None else hmac.new(key, body, hashlib.sha256).hexdigest()
    tamper.set_manifest(version, json.dumps(envelope).encode())


def test_every_store_satisfies_the_protocol(backend: Backend) -> None:
    assert isinstance(backend.open(), CheckpointStore)


def test_empty_store(backend: Backend) -> None:
    store = backend.open()
    assert store.load_latest() is None
    assert store.list_versions() == []
    assert store.latest_version() is None
    assert store.current_epoch() == 0


def test_round_trip_and_version_numbers(backend: Backend) -> None:
    store = backend.open()
    first, second = make_checkpoint(1), make_checkpoint(2)
    assert store.save(first) == 1
    assert store.save(second) == 2
    assert first.version == 0, "save must not change the caller's checkpoint"
    latest = store.load_latest()
    assert latest is not None and latest.version == 2
    assert_same(latest, second)
    assert_same(store.load(1), first)
    assert store.latest_version() == 2
    assert store.corrupt_loads == 0


def test_list_versions_reads_manifests(backend: Backend) -> None:
    store = backend.open()
    store.save(make_checkpoint(1))
    store.save(make_checkpoint(2))
    infos = store.list_versions()
    assert [info.version for info in infos] == [1, 2]
    info = infos[1]
    assert (info.samples, info.step, info.epoch, info.writer_id) == (200, 2, 0, "writer-a")
    assert info.offsets == {"clicks:0": 20, "clicks:1": 21}
    assert info.created_at == 1_700_000_002.0
    assert info.parts > 2 and info.size_bytes > 0 and info.error is None
    assert store.verify(2).ok and store.verify(2).size_bytes == info.size_bytes


def test_keeps_only_the_last_k_versions(backend: Backend) -> None:
    store = backend.open(keep=2)
    for seed in range(1, 5):
        store.save(make_checkpoint(seed))
    assert [info.version for info in store.list_versions()] == [3, 4]
    assert not backend.tamper.exists(1) and not backend.tamper.exists(2)
    assert backend.tamper.exists(3) and backend.tamper.exists(4)
    with pytest.raises(CheckpointError, match="does not exist"):
        store.load(1)


def _flip(t: Tamper, v: int, key: bytes | None) -> None:
    data = bytearray(t.part(v, 1))
    data[len(data) // 2] ^= 0x01
    t.set_part(v, 1, bytes(data))


def _truncate(t: Tamper, v: int, key: bytes | None) -> None:
    t.set_part(v, 0, t.part(v, 0)[:-3])


def _missing_part(t: Tamper, v: int, key: bytes | None) -> None:
    t.delete_part(v, 2)


def _pointer_to_missing(t: Tamper, v: int, key: bytes | None) -> None:
    t.set_pointer(99)


def _bad_hmac(t: Tamper, v: int, key: bytes | None) -> None:
    rewrite_manifest(t, v, lambda body: body["meta"].update(samples=1), b"attacker-key")


def _unsigned(t: Tamper, v: int, key: bytes | None) -> None:
    rewrite_manifest(t, v, lambda body: None, None)


def _deep_manifest(t: Tamper, v: int, key: bytes | None) -> None:
    t.set_manifest(v, b'{"manifest":' * 100_000 + b"{}" + b"}" * 100_000)


CORRUPTIONS = {
    "flipped-byte": (_flip, None),
    "truncated-part": (_truncate, None),
    "missing-part": (_missing_part, None),
    "pointer-to-missing-version": (_pointer_to_missing, None),
    "bad-hmac": (_bad_hmac, KEY),
    "unsigned-with-key-set": (_unsigned, KEY),
    "flipped-byte-signed": (_flip, KEY),
    "manifest-nested-100000-deep": (_deep_manifest, None),
    "manifest-nested-100000-deep-signed": (_deep_manifest, KEY),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_latest_falls_back_to_previous_version(
    backend: Backend, corruption: str, decoded: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    damage, key = CORRUPTIONS[corruption]
    store = backend.open(codec=CheckpointCodec(chunk_size=CHUNK, hmac_key=key))
    saved = {1: make_checkpoint(1), 2: make_checkpoint(2)}
    store.save(saved[1])
    store.save(saved[2])
    damage(backend.tamper, 2, key)
    # A pointer naming a missing version falls back to the newest published one: 2.
    fallback = 2 if corruption == "pointer-to-missing-version" else 1
    decoded.clear()
    with caplog.at_level(logging.WARNING, logger="stream_trainer.checkpoints"):
        loaded = store.load_latest()
    assert loaded is not None and loaded.version == fallback
    assert_same(loaded, saved[fallback])
    assert store.corrupt_loads == 1
    assert len(decoded) == 1, "only the fallback version may reach the safetensors parser"
    assert any("skipping checkpoint version" in r.getMessage() for r in caplog.records)
    bad = 99 if corruption == "pointer-to-missing-version" else 2
    result = store.verify(bad)
    assert not result.ok and result.error
    with pytest.raises(CheckpointError):
        store.load(bad)
    assert len(decoded) == 1


def test_every_version_corrupt_raises(backend: Backend) -> None:
    store = backend.open()
    store.save(make_checkpoint(1))
    store.save(make_checkpoint(2))
    _flip(backend.tamper, 1, None)
    _truncate(backend.tamper, 2, None)
    with pytest.raises(CheckpointCorruptError, match="no stored checkpoint passes"):
        store.load_latest()
    assert store.corrupt_loads == 2


@pytest.mark.parametrize("checksum", ["stale-checksum", "recomputed-checksum"])
def test_planted_pickle_is_never_executed(
    backend: Backend, tmp_path: Path, checksum: str, decoded: list[int]
) -> None:
    side_effect = tmp_path / "pwned"
    # Hand-written pickle opcodes for ``open(side_effect, "w")``; the pickle module is not used.
    payload = f"cbuiltins\nopen\n(V{side_effect}\nVw\ntR.".encode()
    store = backend.open()
    first = make_checkpoint(1)
    store.save(first)
    store.save(make_checkpoint(2))
    envelope = json.loads(backend.tamper.manifest(2))
    body = envelope["manifest"]
    state_parts = [
        backend.tamper.part(2, i) for i in range(body["tensor_parts"], len(body["parts"]))
    ]
    for index, part in enumerate([payload, *state_parts]):
        backend.tamper.set_part(2, index, part)

    def plant(manifest: dict[str, Any]) -> None:
        manifest["sections"]["tensors"] = len(payload)
        manifest["tensor_parts"] = 1
        manifest["parts"] = [len(payload), *map(len, state_parts)]
        if checksum == "recomputed-checksum":
            manifest["sha256"] = hashlib.sha256(payload + b"".join(state_parts)).hexdigest()

    rewrite_manifest(backend.tamper, 2, plant, None)
    decoded.clear()
    loaded = store.load_latest()
    assert loaded is not None and loaded.version == 1
    assert store.corrupt_loads == 1
    result = store.verify(2)
    expected = "SHA-256" if checksum == "stale-checksum" else "safetensors"
    assert not result.ok and expected in (result.error or "")
    assert not side_effect.exists()
    assert len(decoded) == (1 if checksum == "stale-checksum" else 3)


def test_crash_between_parts_and_pointer_leaves_previous_version(backend: Backend) -> None:
    store = backend.open()
    first = make_checkpoint(1)
    store.save(first)
    staged, _ = store._stage(make_checkpoint(2))  # parts written, pointer never switched
    assert staged == 2 and backend.tamper.exists(2)
    reader = backend.open()
    loaded = reader.load_latest()
    assert loaded is not None
    assert_same(loaded, first)
    assert reader.latest_version() == 1
    assert [info.version for info in reader.list_versions()] == [1]
    assert reader.corrupt_loads == 0
    third = make_checkpoint(3)
    assert store.save(third) == 3
    loaded = reader.load_latest()
    assert loaded is not None and loaded.version == 3
    assert [info.version for info in reader.list_versions()] == [1, 3]


def test_fencing_rejects_the_older_writer(backend: Backend) -> None:
    writer_a, writer_b = backend.open(), backend.open()
    epoch_a = writer_a.acquire_epoch("a")
    assert epoch_a == 1
    writer_a.save(make_checkpoint(1, epoch=epoch_a, writer="a"))
    epoch_b = writer_b.acquire_epoch("b")
    assert epoch_b == 2 and writer_a.current_epoch() == 2
    assert writer_b.save(make_checkpoint(2, epoch=epoch_b, writer="b")) == 2
    with pytest.raises(FencedWriterError):
        writer_a.save(make_checkpoint(3, epoch=epoch_a, writer="a"))
    assert writer_a.latest_version() == 2
    latest = writer_b.load_latest()
    assert latest is not None and latest.writer_id == "b"


def test_fencing_is_rechecked_at_the_pointer_switch(backend: Backend) -> None:
    writer_a, writer_b = backend.open(), backend.open()
    epoch_a = writer_a.acquire_epoch("a")
    version, encoded = writer_a._stage(make_checkpoint(1, epoch=epoch_a, writer="a"))
    writer_b.acquire_epoch("b")  # takes over while a is writing
    with pytest.raises(FencedWriterError):
        writer_a._publish(version, epoch_a, len(encoded.parts), [])
    assert writer_b.latest_version() is None and writer_b.load_latest() is None


def test_publish_refuses_an_incomplete_version(backend: Backend) -> None:
    store = backend.open()
    store.save(make_checkpoint(1))
    version, encoded = store._stage(make_checkpoint(2))
    backend.tamper.delete_part(version, 1)
    with pytest.raises(CheckpointError, match="incomplete"):
        store._publish(version, 0, len(encoded.parts), [])
    assert store.latest_version() == 1


def test_close_is_idempotent_and_final(backend: Backend) -> None:
    store = backend.open()
    store.close()
    store.close()
    with pytest.raises(CheckpointError, match="closed"):
        store.load_latest()


def test_list_and_verify_report_a_hostile_manifest_without_raising(backend: Backend) -> None:
    store = backend.open()
    store.save(make_checkpoint(1))
    store.save(make_checkpoint(2))
    _deep_manifest(backend.tamper, 2, None)
    infos = store.list_versions()
    assert [info.version for info in infos] == [1, 2]
    assert infos[0].error is None and "nested 100001 deep" in (infos[1].error or "")
    result = store.verify(2)
    assert not result.ok and "nested 100001 deep" in (result.error or "")
    restored = store.load_newest(lambda checkpoint: checkpoint.samples)
    assert restored is not None and restored.checkpoint.version == 1 and restored.value == 100
    assert list(restored.rejected) == [2] and restored.reasons == {2: "manifest"}


def test_a_validation_failure_falls_back_like_a_checksum_failure(backend: Backend) -> None:
    store = backend.open()
    for seed in (1, 2, 3):
        store.save(make_checkpoint(seed))

    def restore(checkpoint: Checkpoint) -> int:
        if checkpoint.state["seed"] == 3:
            raise CheckpointInvalidError("seed 3 is not wanted", reason="state")
        return int(checkpoint.state["seed"])

    restored = store.load_newest(restore)
    assert restored is not None and restored.value == 2
    assert restored.rejected == {3: "seed 3 is not wanted"} and restored.reasons == {3: "state"}
    assert store.verify(3, validate=restore).error == "seed 3 is not wanted"
    assert store.verify(2, validate=restore).ok


def test_signed_store_keeps_unsigned_versions_and_counts_only_signed_ones(
    backend: Backend,
) -> None:
    unsigned_writer = backend.open(keep=2)
    unsigned_writer.save(make_checkpoint(1))
    unsigned_writer.save(make_checkpoint(2))
    signed_writer = backend.open(keep=2, codec=CheckpointCodec(chunk_size=CHUNK, hmac_key=KEY))
    for seed in (3, 4, 5, 6):
        signed_writer.save(make_checkpoint(seed))
    # Versions 1 and 2 are unsigned: never loaded, never pruned; keep=2 counts signed ones only.
    assert [info.version for info in signed_writer.list_versions()] == [1, 2, 5, 6]
    assert [info.signed for info in signed_writer.list_versions()] == [False, False, True, True]
    assert backend.tamper.exists(1) and not backend.tamper.exists(3)
    for version in (1, 2):
        assert "unsigned checkpoint refused" in (signed_writer.verify(version).error or "")
    latest = signed_writer.load_latest()
    assert latest is not None and latest.version == 6


def test_a_writer_without_the_key_refuses_a_store_with_signed_versions(
    backend: Backend,
) -> None:
    signed = backend.open(codec=CheckpointCodec(chunk_size=CHUNK, hmac_key=KEY))
    signed.save(make_checkpoint(1))
    signed.save(make_checkpoint(2))
    unsigned = backend.open()
    with pytest.raises(UnsignedWriterError, match=r"signed checkpoints \(versions \[1, 2\]\)"):
        unsigned.acquire_epoch("no-key")
    with pytest.raises(UnsignedWriterError) as info:
        unsigned.save(make_checkpoint(3))
    assert info.value.retriable is False
    assert [i.version for i in unsigned.list_versions()] == [1, 2]  # reading is still allowed
    assert unsigned.current_epoch() == 0 and backend.tamper.exists(1)


# The memory store's pointer is an int in process memory: nothing to damage, so not a case.
@pytest.mark.parametrize(
    "backend", ["local", pytest.param("redis", marks=pytest.mark.integration)], indirect=True
)
def test_an_unreadable_pointer_is_never_mistaken_for_an_empty_store(backend: Backend) -> None:
    store = backend.open()
    store.save(make_checkpoint(1))
    store.save(make_checkpoint(2))
    if backend.kind == "redis":
        assert isinstance(backend.tamper, RedisTamper)
        backend.tamper.client.set(f"{backend.tamper.prefix}:latest", b"[[[[not a number")
        latest = store.load_latest()  # the published versions remain: the newest is loaded
        assert latest is not None and latest.version == 2
        return
    assert isinstance(backend.tamper, LocalTamper)
    (backend.tamper.root / "LATEST").write_bytes(b"[" * 100_000)
    with pytest.raises(CheckpointInvalidError, match="LATEST is unreadable"):
        store.load_latest()


def test_a_part_grown_out_of_bounds_is_refused_without_reading_it_whole(
    backend: Backend, decoded: list[int]
) -> None:
    store = backend.open()
    store.save(make_checkpoint(1))
    store.save(make_checkpoint(2))
    backend.tamper.set_part(2, 0, backend.tamper.part(2, 0) + b"\0" * (8 * 2**20))
    if isinstance(store, LocalDirCheckpointStore):
        parts, _ = store._read_parts_hashed(2, [CHUNK, CHUNK])
        assert [len(part or b"") for part in parts] == [CHUNK + 1, CHUNK]
    decoded.clear()
    result = store.verify(2)
    if backend.kind == "redis":
        # GETRANGE reads only the manifest's byte ranges, which are intact: the version loads.
        assert result.ok and decoded and max(decoded) < 2**20
        return
    assert not result.ok and "bytes, manifest says" in (result.error or "") and decoded == []
    latest = store.load_latest()
    assert latest is not None and latest.version == 1
