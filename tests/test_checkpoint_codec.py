"""The checkpoint codec: bit-exact round trips, chunking, manifest checks, HMAC, format upgrades."""

from __future__ import annotations

import hashlib
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


def every_kind_of_tensor() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "f64": torch.randn(3, 2, generator=gen, dtype=torch.float64),
        "i64": torch.tensor([-(2**63), 2**63 - 1, 5], dtype=torch.int64),
        "b": torch.randn(3, generator=gen),
        "a": torch.randn(2, 2, generator=gen),
        "i32": torch.tensor([7, -7], dtype=torch.int32),
        "bf16": torch.tensor([1.0, -2.5, math.inf], dtype=torch.bfloat16),
        "h": torch.ones(5, dtype=torch.float16),
        "i16": torch.tensor([-3], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 9], dtype=torch.uint8),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "scalar_i64": torch.tensor(-4, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "empty_bool": torch.zeros(3, 0, dtype=torch.bool),
        "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
        "every_other": torch.arange(10, dtype=torch.int64)[::2],
        'ünï "quoted" \\ \n\t\x01\x7f \u2028 名前': torch.arange(3, dtype=torch.int16),
    }


def test_segments_are_what_safetensors_writes() -> None:
    tensors = every_kind_of_tensor()
    blob = b"".join(codec.safetensors_segments(tensors))
    # safetensors itself refuses non-contiguous tensors; their contiguous copies hold the same.
    assert blob == safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})
    assert_bit_identical(safetensors.torch.load(blob), tensors)
    for name, tensor in tensors.items():  # each dtype alone, and every dtype against each other
        assert b"".join(codec.safetensors_segments({name: tensor})) == safetensors.torch.save(
            {name: tensor.contiguous()}
        )
    assert b"".join(codec.safetensors_segments({})) == safetensors.torch.save({})


def test_segments_view_the_tensors_without_copying() -> None:
    contiguous = torch.arange(1000, dtype=torch.float32)
    transposed = torch.arange(6, dtype=torch.int64).reshape(2, 3).t()
    # safetensors order: I64 before F32, whatever the names
    header, ints, floats = codec.safetensors_segments({"c": contiguous, "t": transposed})
    assert header.nbytes % 8 == 0 and int.from_bytes(header[:8], "little") == header.nbytes - 8
    assert ints.readonly and floats.readonly
    contiguous[0] = 42.0  # a view, not a snapshot: the tensor must not change during a save
    assert bytes(floats[:4]) == raw(torch.tensor([42.0]))
    transposed[0, 0] = 99  # a non-contiguous tensor is copied
    assert bytes(ints) == raw(torch.tensor([0, 3, 1, 4, 2, 5]))


def test_reserved_and_unsupported_tensors_are_refused() -> None:
    with pytest.raises(CheckpointError, match="__metadata__"):
        codec.safetensors_segments({"__metadata__": torch.ones(1)})
    with pytest.raises(CheckpointError, match="dtype"):
        codec.safetensors_segments({"c": torch.ones(1, dtype=torch.complex64)})
    with pytest.raises(CheckpointError, match="dense"):
        codec.safetensors_segments({"s": torch.eye(2).to_sparse()})


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 100, 2**20])
def test_parts_straddle_segments_and_join_to_the_payload(chunk_size: int) -> None:
    tensors = every_kind_of_tensor()
    c = CheckpointCodec(chunk_size=chunk_size)
    ck = checkpoint(tensors, {"s": "ü" * 30})
    encoded = c.encode(ck)
    m = encoded.manifest
    tensor_bytes = b"".join(bytes(p) for p in encoded.parts[: m.tensor_parts])
    assert tensor_bytes == b"".join(codec.safetensors_segments(tensors))
    assert [sum(map(len, part)) for part in encoded.segments] == list(m.part_sizes)
    assert [len(p) for p in encoded.parts] == list(m.part_sizes)
    assert all(isinstance(s, memoryview) for part in encoded.segments for s in part)
    assert_bit_identical(round_trip(ck, c).tensors, tensors)


def test_layout_then_seal_is_encode_and_a_wrong_checksum_is_caught() -> None:
    c = CheckpointCodec(chunk_size=64, hmac_key=b"k")
    ck = checkpoint(every_kind_of_tensor(), {"x": 1}, created_at=5.0)
    layout = c.layout(ck)
    sealed = c.seal(layout, layout.sha256())
    assert sealed.manifest_bytes == c.encode(ck).manifest_bytes
    payload = b"".join(bytes(p) for p in sealed.parts)
    assert layout.sha256() == hashlib.sha256(payload).hexdigest()
    wrong = c.seal(layout, hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(CheckpointCorruptError, match="SHA-256"):
        c.decode(wrong.manifest, [bytes(p) for p in wrong.parts])


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
    assert b"".join(codec.safetensors_segments(tensors)) == safetensors.torch.save(tensors)
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


def test_parts_read_back_in_ranges_decode_like_whole_parts() -> None:
    """A store may hand a part over as its ranges (ChunkedPart): sizes, SHA-256 and decoding are
    those of the joined bytes, and a flipped byte in one range is still caught."""
    tensors = every_kind_of_tensor()
    c = CheckpointCodec(chunk_size=64)
    encoded = c.encode(checkpoint(tensors, {"s": "x" * 70}))
    whole = [bytes(p) for p in encoded.parts]
    ranged = [codec.ChunkedPart([p[i : i + 7] for i in range(0, len(p), 7)]) for p in whole]
    assert [len(p) for p in ranged] == [len(p) for p in whole]
    mixed: list[bytes | codec.ChunkedPart] = [*ranged[:2], *whole[2:]]
    assert_bit_identical(c.decode(encoded.manifest, ranged).tensors, tensors)
    assert_bit_identical(c.decode(encoded.manifest, mixed).tensors, tensors)
    first = list(ranged[0].chunks)
    first[1] = bytes([first[1][0] ^ 0x01]) + first[1][1:]
    with pytest.raises(CheckpointCorruptError, match="SHA-256"):
        c.decode(encoded.manifest, [codec.ChunkedPart(first), *ranged[1:]])
    with pytest.raises(CheckpointCorruptError, match="part 0 has"):
        c.decode(encoded.manifest, [codec.ChunkedPart(first[:-1]), *ranged[1:]])
