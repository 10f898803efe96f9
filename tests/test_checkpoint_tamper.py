"""Checkpoint tampering over every store: the service falls back to the newest valid version.

Each case writes a real history with the service (a CSV through the file source, three
checkpoints), damages the newest version in one way, then checks that

* a new service restores the version before it (number asserted), names the damaged one in
  ``rejected_versions`` with the expected reason, logs it and counts it in
  ``stream_trainer_checkpoint_rejected_total{reason}``;
* ``checkpoints verify`` of the damaged version exits 1 and ``checkpoints list`` shows it as
  FAILED (memory store: the same check through :func:`check_version`);
* the restored service trains the rest of the stream and saves a version that validates.

Content tamperings recompute the payload SHA-256 (and, in a signed store, could not re-sign:
those run unsigned), so they pass the checksum and must be caught by the structural validation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from prometheus_client import CollectorRegistry

from stream_trainer.checkpoints import (
    HMAC_KEY_ENV,
    CheckpointCodec,
    MemoryCheckpointStore,
    UnsignedWriterError,
    open_store,
)
from stream_trainer.checkpoints.store import VersionedStore
from stream_trainer.cli import main as cli_main
from stream_trainer.commands.checkpoints import check_version
from stream_trainer.errors import CheckpointCorruptError, ConfigError
from stream_trainer.service import TrainerService, load_service_config
from stream_trainer.service.restore import restore_checkpoint
from tests.test_checkpoint_store_contract import (
    LocalTamper,
    MemoryTamper,
    RedisTamper,
    Tamper,
)

KEY = "tamper-suite-key"
RECORDS = 300
EVERY = 100  # records per checkpoint: versions 1, 2, 3


@dataclass
class Stores:
    kind: str
    url: str
    open: Callable[[], VersionedStore]  # a store on the same storage, codec from the env
    tamper: Callable[[VersionedStore], Tamper]


@pytest.fixture(params=["memory", "local", pytest.param("redis", marks=pytest.mark.integration)])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    if request.param == "memory":
        root = MemoryCheckpointStore()

        def open_memory() -> VersionedStore:
            return root.reopen(codec=CheckpointCodec.from_env(chunk_size=4096))

        yield Stores("memory", "memory://", open_memory, lambda store: MemoryTamper(root))
    elif request.param == "local":
        url = f"file://{tmp_path / 'ckpt'}?chunk_size=4096"
        yield Stores(
            "local", url, lambda: open_store(url), lambda store: LocalTamper(tmp_path / "ckpt")
        )
    else:
        base = request.getfixturevalue("redis_url")
        url = f"{base}?prefix=tamper&chunk_size=4096"
        yield Stores("redis", url, lambda: open_store(url), RedisTamper)  # type: ignore[arg-type]


@pytest.fixture
def csv_source(tmp_path: Path) -> Path:
    lines = ["x1,x2,colour,label"]
    colours = ("red", "green", "blue")
    lines += [f"{i % 9},{math.cos(i):.6f},{colours[i % 3]},{(i // 3) % 2}" for i in range(RECORDS)]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp_path: Path, source: Path, url: str) -> Any:
    settings = {
        "source": str(source),
        "checkpoint": url,
        "checkpoint_every_records": EVERY,
        "batch_sizes": "10",
        "dead_letter": str(tmp_path / "dead-letters.jsonl"),
        "metrics_address": "off",
        "progress": False,
        "run_name": "tamper",
    }
    trainer = {"target": "label", "task": "classification", "hidden": (8,), "seed": 3}
    return load_service_config(flags=settings, trainer_flags=trainer, environ={})


def _service(config: Any, stores: Stores, registry: CollectorRegistry | None = None) -> Any:
    store = stores.open() if stores.kind == "memory" else None
    return TrainerService(config, store=store, registry=registry or CollectorRegistry())


def _history(tmp_path: Path, source: Path, stores: Stores) -> tuple[Any, int]:
    config = _config(tmp_path, source, stores.url)
    report = _service(config, stores).run()
    assert report["final_checkpoint_ok"] and report["samples"] == RECORDS
    newest = report["checkpoint_version"]
    assert newest == 3
    return config, newest


# -------------------------------------------------------------------- tampering tools


def _sign(body: dict[str, Any], key: str | None) -> bytes:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    signature = None if key is None else hmac.new(key.encode(), canonical, "sha256").hexdigest()
    return json.dumps({"manifest": body, "hmac": signature}).encode()


def _manifest(tamper: Tamper, version: int) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(tamper.manifest(version))["manifest"]
    return body


def _payload(tamper: Tamper, version: int) -> tuple[bytes, bytes]:
    body = _manifest(tamper, version)
    parts = [tamper.part(version, i) for i in range(len(body["parts"]))]
    return b"".join(parts[: body["tensor_parts"]]), b"".join(parts[body["tensor_parts"] :])


def _write_payload(
    tamper: Tamper, version: int, blob: bytes, doc: bytes, *, key: str | None = None
) -> None:
    """Replace the payload of ``version`` (two parts) and write a manifest whose sizes, SHA-256
    and metadata match it: the checksum passes, only the content is wrong."""
    body = _manifest(tamper, version)
    tamper.set_part(version, 0, blob)
    tamper.set_part(version, 1, doc)
    body.update(
        sections={"tensors": len(blob), "state": len(doc)},
        tensor_parts=1,
        parts=[len(blob), len(doc)],
        sha256=hashlib.sha256(blob + doc).hexdigest(),
    )
    try:
        document = json.loads(doc)
        body["meta"] = {k: document[k] for k in body["meta"]}
    except (ValueError, KeyError, TypeError, RecursionError):
        pass  # unparsable on purpose: the manifest keeps its metadata
    tamper.set_manifest(version, _sign(body, key))


def _edit(
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    document: Callable[[dict[str, Any]], None] | None = None,
    text: Callable[[str], str] | None = None,
) -> Callable[[Tamper, int], None]:
    """A tampering that decodes the payload, changes it and writes it back consistently."""

    def apply(tamper: Tamper, version: int) -> None:
        blob, doc = _payload(tamper, version)
        loaded = dict(safetensors.torch.load(blob))
        if tensors is not None:
            tensors(loaded)
            blob = safetensors.torch.save(loaded)
        parsed = json.loads(doc)
        if document is not None:
            document(parsed)
        out = json.dumps(parsed, separators=(",", ":"))
        _write_payload(tamper, version, blob, (text(out) if text else out).encode())

    return apply


def _trainer(document: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = document["state"]["trainer"]
    return state


def _raw(change: Callable[[bytes, bytes], tuple[bytes, bytes]]) -> Callable[[Tamper, int], None]:
    def apply(tamper: Tamper, version: int) -> None:
        blob, doc = _payload(tamper, version)
        _write_payload(tamper, version, *change(blob, doc))

    return apply


def _set(tensor: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[tensor] = tensors[tensor].clone()
        tensors[tensor].view(-1)[0] = value

    return change


def _swap_shape(tensors: dict[str, torch.Tensor]) -> None:
    weight = tensors["model.body.0.weight"]
    tensors["model.body.0.weight"] = weight.reshape(tuple(reversed(weight.shape))).contiguous()


def _deep_manifest(tamper: Tamper, version: int) -> None:
    tamper.set_manifest(version, b"[" * 200_000 + b"]" * 200_000)


def _wrong_checksum(tamper: Tamper, version: int) -> None:
    body = _manifest(tamper, version)
    body["sha256"] = "0" * 64
    tamper.set_manifest(version, _sign(body, None))


def _truncate_stale(tamper: Tamper, version: int) -> None:
    tamper.set_part(version, 0, tamper.part(version, 0)[:-3])


def _drop_key(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda document: _trainer(document).pop(key)


def _dims(value: Any) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        _trainer(document)["model_dims"][0] = value

    return change


def _inject_regression_key(document: dict[str, Any]) -> None:
    _trainer(document)["metrics"]["regression"]["report"] = 1


def _column_out_of_range(document: dict[str, Any]) -> None:
    _trainer(document)["encoder"]["numeric_columns"][0] = 10**6


def _extra_class(document: dict[str, Any]) -> None:
    _trainer(document)["classes"].append("never-seen")


def _huge_window(document: dict[str, Any]) -> None:
    trainer = _trainer(document)
    trainer["config"]["rolling_window"] = 10**12
    trainer["metrics"]["classification"]["window"] = 10**12


def _other_config(document: dict[str, Any]) -> None:
    _trainer(document)["config"]["lr"] = 0.5  # the manifest's fingerprint no longer matches


def _bad_service_state(document: dict[str, Any]) -> None:
    document["state"]["service"]["dead_lettered"] = {"wrong_type": -5}


def _bad_origins(document: dict[str, Any]) -> None:
    document["state"]["service"]["origins"] = {"t:0": "the beginning"}


def _state_not_object(document: dict[str, Any]) -> None:
    document["state"]["trainer"] = ["not", "a", "state"]


def _nan_text(text: str) -> str:
    return text.replace('"log_loss_sum":', '"log_loss_sum":NaN,"was":', 1)


def _overflow_text(text: str) -> str:
    return text.replace('"lr":0.003', '"lr":1e999', 1)


def _deep_state(blob: bytes, doc: bytes) -> tuple[bytes, bytes]:
    return blob, b"[" * 200_000 + b"]" * 200_000


def _truncated_rehashed(blob: bytes, doc: bytes) -> tuple[bytes, bytes]:
    return blob[:-3], doc


def _short_rng(tensors: dict[str, torch.Tensor]) -> None:
    tensors["rng.torch"] = tensors["rng.torch"][:100].clone()


def _float64_head(tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.head.weight"] = tensors["model.head.weight"].double()


def _extra_tensor(tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.backdoor"] = torch.zeros(3)


def _negative_variance(tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.body.1.running_var"] = -tensors["model.body.1.running_var"].abs() - 1.0


def _optimizer_shape(tensors: dict[str, torch.Tensor]) -> None:
    tensors["optim.0.exp_avg"] = tensors["optim.0.exp_avg"][:1].clone()


# name -> (tampering, expected rejection reason)
TAMPERINGS: dict[str, tuple[Callable[[Tamper, int], None], str]] = {
    "manifest-nested-200000-deep": (_deep_manifest, "manifest"),
    "state-nested-200000-deep": (_raw(_deep_state), "state"),
    "state-key-removed-encoder": (_edit(document=_drop_key("encoder")), "state"),
    "state-key-removed-classes": (_edit(document=_drop_key("classes")), "state"),
    "tensor-shape-swapped": (_edit(tensors=_swap_shape), "tensors"),
    "model-dims-2e9-int": (_edit(document=_dims(2_000_000_000)), "state"),
    "model-dims-2e9-float": (_edit(document=_dims(2e9)), "state"),
    "nan-weights": (_edit(tensors=_set("model.head.weight", math.nan)), "tensors"),
    "inf-optimizer-state": (_edit(tensors=_set("optim.0.exp_avg_sq", math.inf)), "tensors"),
    "truncated-tensor-bytes": (_truncate_stale, "checksum"),
    "truncated-tensor-bytes-rehashed": (_raw(_truncated_rehashed), "tensors"),
    "wrong-checksum": (_wrong_checksum, "checksum"),
    "nan-literal-in-state": (_edit(text=_nan_text), "state"),
    "overflowing-number-in-state": (_edit(text=_overflow_text), "state"),
    "regression-metrics-extra-key": (_edit(document=_inject_regression_key), "state"),
    "encoder-column-out-of-range": (_edit(document=_column_out_of_range), "state"),
    "class-without-output": (_edit(document=_extra_class), "state"),
    "rolling-window-1e12": (_edit(document=_huge_window), "state"),
    "config-differs-from-fingerprint": (_edit(document=_other_config), "state"),
    "service-state-negative-count": (_edit(document=_bad_service_state), "state"),
    "service-origins-not-offsets": (_edit(document=_bad_origins), "state"),
    "trainer-state-not-an-object": (_edit(document=_state_not_object), "state"),
    "rng-state-truncated": (_edit(tensors=_short_rng), "tensors"),
    "weights-of-another-dtype": (_edit(tensors=_float64_head), "tensors"),
    "unexpected-tensor": (_edit(tensors=_extra_tensor), "tensors"),
    "negative-running-variance": (_edit(tensors=_negative_variance), "tensors"),
    "optimizer-state-of-another-shape": (_edit(tensors=_optimizer_shape), "tensors"),
}


def _rejected(registry: CollectorRegistry, reason: str) -> float | None:
    labels = {"run": "tamper", "model": "mlp", "norm": "ema_batch", "reason": reason}
    return registry.get_sample_value("stream_trainer_checkpoint_rejected_total", labels)


def _assert_verify_fails(stores: Stores, version: int, capsys: pytest.CaptureFixture[str]) -> None:
    if stores.kind == "memory":  # memory:// is per process: the command's own check
        with stores.open() as store:
            result = check_version(store, version)
        assert not result.ok and result.error
        return
    capsys.readouterr()
    args = ["checkpoints", "verify", "--checkpoint", stores.url, "--version", str(version)]
    assert cli_main(args) == 1
    assert f"version {version}: FAILED" in capsys.readouterr().out
    assert cli_main(["checkpoints", "verify", "--checkpoint", stores.url, "--all"]) == 1
    out = capsys.readouterr().out
    assert f"version {version - 1}: ok" in out and f"version {version}: FAILED" in out
    assert cli_main(["checkpoints", "list", "--checkpoint", stores.url, "--json"]) == 0
    rows = {row["version"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[version]["checksum"] == "FAILED" and rows[version]["error"]
    assert rows[version - 1]["checksum"] == "ok"


def _assert_falls_back(
    config: Any,
    stores: Stores,
    newest: int,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    with caplog.at_level(logging.WARNING):
        service = _service(config, stores, registry)
    assert service.restored is not None and service.restored.version == newest - 1
    assert list(service.rejected_versions) == [newest]
    assert any(
        f"skipping checkpoint version {newest} ({reason})" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    samples_before = service.trainer.samples_trained
    assert samples_before == 2 * EVERY
    report = service.run()
    assert _rejected(registry, reason) == 1.0
    assert report["final_checkpoint_ok"] is True
    assert report["records_trained"] == RECORDS - samples_before
    assert report["samples"] == RECORDS and report["checkpoint_version"] > newest
    with stores.open() as store:
        restored = store.load_newest(restore_checkpoint)
    assert restored is not None and restored.rejected == {}
    assert restored.checkpoint.version == report["checkpoint_version"]
    assert restored.value.samples_trained == RECORDS


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HMAC_KEY_ENV, raising=False)


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_tampered_newest_version_falls_back_to_the_previous_one(
    tmp_path: Path,
    csv_source: Path,
    stores: Stores,
    tampering: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    damage, reason = TAMPERINGS[tampering]
    config, newest = _history(tmp_path, csv_source, stores)
    with stores.open() as store:
        damage(stores.tamper(store), newest)
    _assert_verify_fails(stores, newest, capsys)
    _assert_falls_back(config, stores, newest, reason, caplog)


def _unsigned_rewrite(tamper: Tamper, version: int) -> None:
    body = _manifest(tamper, version)
    body["meta"]["samples"] += 0  # content unchanged: only the signature is gone
    tamper.set_manifest(version, _sign(body, None))


def _forged_rewrite(tamper: Tamper, version: int) -> None:
    tamper.set_manifest(version, _sign(_manifest(tamper, version), "attacker-key"))


@pytest.mark.parametrize(
    ("tampering", "reason"),
    [("unsigned", "unsigned"), ("forged-signature", "signature"), ("deep", "manifest")],
)
def test_signed_store_refuses_unsigned_and_forged_versions(
    tmp_path: Path,
    csv_source: Path,
    stores: Stores,
    monkeypatch: pytest.MonkeyPatch,
    tampering: str,
    reason: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, KEY)
    config, newest = _history(tmp_path, csv_source, stores)
    damage = {"unsigned": _unsigned_rewrite, "forged-signature": _forged_rewrite}.get(
        tampering, _deep_manifest
    )
    with stores.open() as store:
        damage(stores.tamper(store), newest)
    _assert_verify_fails(stores, newest, capsys)
    _assert_falls_back(config, stores, newest, reason, caplog)
    with stores.open() as store:
        # Never pruned: the unsigned (or forged) version stays beside the signed ones.
        assert newest in [info.version for info in store.list_versions()]


def test_a_writer_without_the_key_refuses_a_signed_store(
    tmp_path: Path,
    csv_source: Path,
    stores: Stores,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, KEY)
    config, _ = _history(tmp_path, csv_source, stores)
    monkeypatch.delenv(HMAC_KEY_ENV)
    with pytest.raises(UnsignedWriterError, match=r"signed checkpoints \(versions \[1, 2, 3\]\)"):
        _service(config, stores)
    with stores.open() as store:
        assert [info.version for info in store.list_versions()] == [1, 2, 3]
        assert store.current_epoch() == 1, "the refused writer took no epoch"
    if stores.kind != "memory":
        capsys.readouterr()
        assert cli_main(["checkpoints", "list", "--checkpoint", stores.url, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [(row["version"], row["signed"]) for row in rows] == [(v, True) for v in (1, 2, 3)]


def test_every_version_invalid_refuses_to_start_instead_of_a_new_model(
    tmp_path: Path, csv_source: Path, stores: Stores
) -> None:
    config, newest = _history(tmp_path, csv_source, stores)
    with stores.open() as store:
        tamper = stores.tamper(store)
        for version in range(1, newest + 1):
            _edit(tensors=_set("model.head.weight", math.nan))(tamper, version)
    with pytest.raises(CheckpointCorruptError, match="no stored checkpoint passes its checks"):
        _service(config, stores)


def test_a_version_of_another_configuration_stops_the_service_instead_of_falling_back(
    tmp_path: Path, csv_source: Path, stores: Stores
) -> None:
    _history(tmp_path, csv_source, stores)
    settings = {"source": str(csv_source), "checkpoint": stores.url, "metrics_address": "off"}
    other = load_service_config(
        flags={**settings, "progress": False},
        trainer_flags={"target": "label", "task": "classification", "hidden": (16,), "seed": 3},
        environ={},
    )
    with pytest.raises(ConfigError, match=r"v3 was written with another trainer configuration"):
        _service(other, stores)
