"""The checkpoint codec: bit-exact round trips, chunking, manifest checks, HMAC, format upgrades."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_trainer.checkpoints import HMAC_KEY_ENV, Checkpoint, CheckpointCodec, codec
from stream_trainer.errors import CheckpointCorruptError, CheckpointError, ConfigError

PACKAGE = Path(__file__).resolve().parents[1] / "stream_trainer" / "checkpoints"


def checkpoint(tensors: dict[str, torch.Tensor], state: dict | None = None, **kw) -> Checkpoint:
    fields = dict(offsets={"t:0": 1}, samples=1, step=1, config_fingerprint="c", writer_id="w")
    fields.update(kw)
    fields.setdefault("epoch", 0)
    return Checkpoint(tensors=tensors, state={} if state is None else state, **fields)


def raw(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def round_trip(ck: Checkpoint, c: CheckpointCodec | None = None) -> Checkpoint:
    c = c or CheckpointCodec(chunk_size=16)
    encoded = c.encode(ck)
    manifest = c.read_manifest(encoded.manifest_bytes, version=ck.version)
    return c.decode(manifest, [bytes(p) for p in encoded.parts])


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert raw(got[name]) == raw(want[name]), name


def test_tensors_round_trip_bit_identical() -> None:
    tensors = {
        "f32": torch.tensor([1.5, -0.0, math.inf, math.nan, 1e-45], dtype=torch.float32),
        "f64": torch.tensor([[math.pi, -1e308], [5e-324, math.nan]], dtype=torch.float64),
        "i64": torch.tensor([-(2**63), 2**63 - 1, 0], dtype=torch.int64),
        "bf16": torch.tensor([1.0, 2.5], dtype=torch.bfloat16),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(7, dtype=torch.int32),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    }
    loaded = round_trip(checkpoint(tensors))
    assert_bit_identical(loaded.tensors, tensors)


def test_empty_dicts_round_trip() -> None:
    loaded = round_trip(checkpoint({}, {}, offsets={}))
    assert loaded.tensors == {} and loaded.state == {} and loaded.offsets == {}


def test_state_and_metadata_round_trip_exactly() -> None:
    state = {
        "labels": ["spam", "ham", "ünïcode"],
        "scaler": {"mean": [0.1, 1e300, -2.5e-310], "n": 2**62, "on": True, "none": None},
        "nested": [[1, [2, {"x": 3}]]],
    }
    ck = checkpoint({"w": torch.ones(2)}, state, offsets={"a:0": 5, "b.c:12": 0}, samples=9,
                    step=4, created_at=1234.5678901234567, epoch=3, version=7)  # fmt: skip
    loaded = round_trip(ck)
    assert json.dumps(loaded.state) == json.dumps(state)
    for name in ("offsets", "samples", "step", "created_at", "epoch", "version", "writer_id"):
        assert getattr(loaded, name) == getattr(ck, name)


@pytest.mark.parametrize(
    "state", [{"t": (1, 2)}, {"k": {1: 2}}, {"x": math.nan}, {"x": math.inf}, {"o": object()}]
)
def test_state_that_would_not_survive_json_is_refused(state: dict) -> None:
    with pytest.raises(CheckpointError):
        CheckpointCodec().encode(checkpoint({}, state))


def test_blob_is_what_safetensors_writes() -> None:
    tensors = {
        "b": torch.randn(3, dtype=torch.float32),
        "a": torch.randn(2, 2, dtype=torch.float32),
        "c": torch.arange(4, dtype=torch.int64),
        "h": torch.ones(5, dtype=torch.float16),
    }
    blob = bytes(codec._safetensors_blob(tensors))
    assert blob == safetensors.torch.save(tensors)
    assert_bit_identical(safetensors.torch.load(blob), tensors)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10**6])
def test_parts_respect_chunk_size(chunk_size: int) -> None:
    c = CheckpointCodec(chunk_size=chunk_size)
    tensors = {"w": torch.randn(50)}
    encoded = c.encode(checkpoint(tensors, {"s": "x" * 100}))
    sizes = [len(p) for p in encoded.parts]
    m = encoded.manifest
    assert all(1 <= size <= chunk_size for size in sizes)
    assert sum(sizes[: m.tensor_parts]) == m.tensors_size == len(safetensors.torch.save(tensors))
    assert m.tensor_parts == -(-m.tensors_size // chunk_size)
    assert len(sizes) == m.tensor_parts + -(-m.state_size // chunk_size)


_DTYPES = [torch.float32, torch.float64, torch.int64, torch.int8, torch.float16, torch.bool]


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.text(min_size=1, max_size=8), max_size=4, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = math.prod(shape)
        data = draw(st.binary(min_size=numel * 8, max_size=numel * 8))
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0)
        as_bytes = flat.to(torch.uint8)[: numel * torch.empty(0, dtype=dtype).element_size()]
        out[name] = (
            as_bytes.view(dtype).reshape(shape) if numel else torch.zeros(shape, dtype=dtype)
        )
    return out


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    tensors=tensor_dicts(),
    state=st.dictionaries(st.text(max_size=4), _JSON, max_size=3),
    chunk_size=st.integers(1, 300),
    key=st.none() | st.binary(min_size=1, max_size=8),
)
def test_codec_round_trip_property(tensors, state, chunk_size, key) -> None:
    c = CheckpointCodec(chunk_size=chunk_size, hmac_key=key)
    ck = checkpoint(tensors, state)
    encoded = c.encode(ck)
    assert all(1 <= len(p) <= chunk_size for p in encoded.parts)
    assert sum(map(len, encoded.parts)) == encoded.manifest.size_bytes
    loaded = round_trip(ck, c)
    assert_bit_identical(loaded.tensors, tensors)
    assert json.dumps(loaded.state, sort_keys=True) == json.dumps(state, sort_keys=True)


def test_payload_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    c = CheckpointCodec(chunk_size=32)
    encoded = c.encode(checkpoint({"w": torch.randn(20)}))
    parts = [bytes(p) for p in encoded.parts]
    parts[1] = bytes([parts[1][0] ^ 0xFF]) + parts[1][1:]
    monkeypatch.setattr(safetensors.torch, "load", lambda data: pytest.fail("decoded"))
    with pytest.raises(CheckpointCorruptError, match="SHA-256"):
        c.decode(encoded.manifest, parts)
    with pytest.raises(CheckpointCorruptError, match="part 0 has"):
        c.decode(encoded.manifest, [parts[0][:-1], *parts[1:]])
    with pytest.raises(CheckpointCorruptError, match="parts read"):
        c.decode(encoded.manifest, parts[:-1])


def test_manifest_for_another_version_is_refused() -> None:
    c = CheckpointCodec()
    encoded = c.encode(checkpoint({}, version=4))
    with pytest.raises(CheckpointCorruptError, match="belongs to version 4"):
        c.read_manifest(encoded.manifest_bytes, version=5)
    with pytest.raises(CheckpointCorruptError, match="not valid JSON"):
        c.read_manifest(b"\x80\x04not json", version=4)


def test_hmac_signing_and_checking() -> None:
    signer = CheckpointCodec(hmac_key=b"k1")
    ck = checkpoint({"w": torch.ones(3)})
    signed = signer.encode(ck)
    assert signed.manifest.signed and signed.manifest.signature_checked
    round_trip(ck, signer)
    with pytest.raises(CheckpointCorruptError, match="HMAC does not match"):
        CheckpointCodec(hmac_key=b"k2").read_manifest(signed.manifest_bytes, version=0)
    unsigned = CheckpointCodec().encode(ck)
    with pytest.raises(CheckpointCorruptError, match="unsigned checkpoint refused"):
        signer.read_manifest(unsigned.manifest_bytes, version=0)
    # Without a key, signatures cannot be checked; the SHA-256 still is.
    lenient = CheckpointCodec().read_manifest(signed.manifest_bytes, version=0)
    assert lenient.signed and not lenient.signature_checked


def test_hmac_key_comes_from_the_environment() -> None:
    assert CheckpointCodec.from_env(environ={}).signs is False
    assert CheckpointCodec.from_env(environ={HMAC_KEY_ENV: "secret"}).signs is True
    with pytest.raises(ConfigError, match="empty"):
        CheckpointCodec.from_env(environ={HMAC_KEY_ENV: ""})


@pytest.mark.parametrize("chunk_size", [0, -1, codec.MAX_CHUNK_SIZE + 1, 1.5, True])
def test_bad_chunk_size_is_a_config_error(chunk_size: object) -> None:
    with pytest.raises(ConfigError, match="chunk_size"):
        CheckpointCodec(chunk_size=chunk_size)  # type: ignore[arg-type]


def _with_format(manifest_bytes: bytes, fmt: int) -> bytes:
    envelope = json.loads(manifest_bytes)
    envelope["manifest"]["format_version"] = fmt
    return json.dumps(envelope).encode()


def test_newer_format_is_refused_with_a_clear_error() -> None:
    c = CheckpointCodec()
    encoded = c.encode(checkpoint({}))
    with pytest.raises(CheckpointError, match="format 2 by a newer stream-trainer") as info:
        c.read_manifest(_with_format(encoded.manifest_bytes, 2), version=0)
    assert not isinstance(info.value, CheckpointCorruptError)


def test_older_format_is_upgraded_through_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    c = CheckpointCodec()
    ck = checkpoint({"w": torch.ones(1)}, {"old": 1})
    encoded = c.encode(ck)  # written as format 1
    monkeypatch.setattr(codec, "FORMAT_VERSION", 2)
    with pytest.raises(CheckpointError, match="no upgrade from format 1"):
        c.read_manifest(encoded.manifest_bytes, version=0)

    def upgrade(document: dict) -> dict:
        return {**document, "state": {"new": document["state"]["old"] + 1}}

    monkeypatch.setitem(codec.UPGRADES, 1, upgrade)
    manifest = c.read_manifest(encoded.manifest_bytes, version=0)
    loaded = c.decode(manifest, [bytes(p) for p in encoded.parts])
    assert loaded.state == {"new": 2} and loaded.format_version == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [("offsets", {"no-partition": 1}), ("offsets", {"t:0": -1}), ("samples", -1), ("epoch", 1.5)],
)
def test_invalid_checkpoint_fields_are_refused(field: str, value: object) -> None:
    with pytest.raises(CheckpointError, match=field.rstrip("s")):
        checkpoint({}, **{field: value})


def test_package_never_unpickles() -> None:
    sources = "\n".join(p.read_text() for p in PACKAGE.glob("*.py"))
    banned = r"import pickle|from pickle|(?<!safetensors\.)torch\.load\b|\bdill\b|\bmarshal\b"
    assert re.findall(banned, sources) == []
    assert "safetensors.torch.load(blob)" in sources
