"""Redis-specific behaviour against a real redis-server: restarts, retries, TTLs, prefixes, the
zero-copy write of the parts (manifest last), corrupted parts, and refused credentials (a wrong
password, an untrusted TLS certificate) failing at once instead of being retried."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy
import pytest
import redis
import safetensors.torch
import torch

from stream_trainer.checkpoints import (
    Checkpoint,
    CheckpointCodec,
    ExponentialBackoff,
    RedisCheckpointStore,
    RetryPolicy,
    StoreAccessError,
    open_store,
)
from stream_trainer.cli import main as cli_main
from stream_trainer.errors import CheckpointCorruptError, StoreUnavailableError
from tests.fixtures import service_unavailable
from tests.fixtures.redis import RedisServer, _free_port
from tests.fixtures.redis import _binary as _redis_binary

pytestmark = pytest.mark.integration


def make(seed: int) -> Checkpoint:
    return Checkpoint(
        tensors={"w": torch.full((64,), float(seed))},
        state={"seed": seed},
        offsets={"t:0": seed},
        samples=seed,
        step=seed,
        config_fingerprint="c",
        writer_id="w",
        epoch=0,
    )


def store_for(url: str, retry: RetryPolicy, **kw: object) -> RedisCheckpointStore:
    return RedisCheckpointStore.from_url(
        url, retry=retry, codec=CheckpointCodec(chunk_size=100), connect_timeout_s=1.0, **kw
    )


def test_save_rides_out_a_redis_restart(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    delays: list[float] = []

    def sleep(delay: float) -> None:  # the server comes back during the third backoff
        delays.append(delay)
        if len(delays) == 3:
            server.start()

    retry = RetryPolicy(retries=6, backoff=ExponentialBackoff(0.01, 1.0, jitter=False), sleep=sleep)
    with store_for(server.url, retry) as store:
        assert store.save(make(1)) == 1
        server.stop()  # SHUTDOWN SAVE: the data comes back with the server
        assert store.save(make(2)) == 2
        assert delays == [0.01, 0.02, 0.04]
        loaded = store.load_latest()
        assert loaded is not None and loaded.state == {"seed": 2}
        assert [info.version for info in store.list_versions()] == [1, 2]


def test_redis_down_past_the_retry_budget_is_retriable(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    delays: list[float] = []
    retry = RetryPolicy(
        retries=3, backoff=ExponentialBackoff(0.5, 1.0, jitter=False), sleep=delays.append
    )
    with store_for(server.url, retry) as store:
        store.save(make(1))
        server.stop()
        with pytest.raises(StoreUnavailableError, match="after 4 attempts") as info:
            store.save(make(2))
        assert info.value.retriable is True
        assert delays == [0.5, 1.0, 1.0]
        with pytest.raises(StoreUnavailableError):
            store.acquire_epoch("w")
        server.start()
        assert store.save(make(2)) == 2  # the same store works again once Redis is back


def test_unpublished_parts_expire_and_published_ones_do_not(redis_url: str) -> None:
    with store_for(redis_url, RetryPolicy(), pending_ttl_s=120, prefix="ttl") as store:
        store.save(make(1))
        version, _ = store._stage(make(2))
        client = store.client
        assert 0 < client.ttl(f"ttl:v:{version}:part:0") <= 120
        assert 0 < client.ttl(f"ttl:v:{version}:manifest") <= 120
        assert client.ttl("ttl:v:1:part:0") == -1 and client.ttl("ttl:v:1:manifest") == -1


def test_prefixes_are_independent(redis_url: str) -> None:
    with (
        store_for(redis_url, RetryPolicy(), prefix="one") as one,
        store_for(redis_url, RetryPolicy(), prefix="two") as two,
    ):
        one.save(make(1))
        one.acquire_epoch("x")
        assert two.load_latest() is None and two.current_epoch() == 0
        assert two.save(make(5)) == 1
        loaded = one.load_latest()
        assert loaded is not None and loaded.state == {"seed": 1}


def three_tensors(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return {
        "model.weight": torch.randn(n, generator=gen),
        "optim.step": torch.arange(n // 4, dtype=torch.int64),
        "model.mask": torch.rand(n, generator=gen) > 0.5,
    }


def test_parts_go_out_uncopied_and_the_manifest_last(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = three_tensors(300_000)
    sent: list[bytes | memoryview] = []
    real_send = redis.connection.Connection.send_packed_command

    def spy(self: redis.connection.Connection, command: Any, check_health: bool = True) -> None:
        sent.extend([command] if isinstance(command, bytes | str) else command)
        real_send(self, command, check_health)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", spy)
    with store_for(redis_url, RetryPolicy(), prefix="zc") as store:
        store.codec = CheckpointCodec(chunk_size=2**20)  # parts straddle the tensors
        client = store.client
        seen: list[tuple[bool, bool]] = []
        real_manifest = store._write_manifest

        def manifest_last(version: int, manifest: bytes) -> None:
            parts = json.loads(manifest)["manifest"]["parts"]
            keys = [f"zc:v:{version}:part:{i}" for i in range(len(parts))]
            seen.append(
                (client.exists(*keys) == len(keys), bool(client.exists(f"zc:v:{version}:manifest")))
            )
            real_manifest(version, manifest)

        monkeypatch.setattr(store, "_write_manifest", manifest_last)
        ck = Checkpoint(tensors=tensors, state={}, offsets={}, samples=0, step=0,
                        config_fingerprint="c", writer_id="w", epoch=0)  # fmt: skip
        assert store.save(ck) == 1
        assert seen == [(True, False)], "every part is written before the manifest"
        big = [b for b in sent if len(b) >= 64 * 1024]
        payload = sum(t.numel() * t.element_size() for t in tensors.values())
        # Only framing and the slivers of a tensor cut at a part boundary (< 64 KiB) are merged.
        assert sum(len(b) for b in sent if not isinstance(b, memoryview)) < 4 * 64 * 1024
        assert sum(map(len, big)) > payload - 4 * 64 * 1024
        memories = [t.view(-1).view(torch.uint8).numpy() for t in tensors.values()]
        for buffer in big:
            assert isinstance(buffer, memoryview), "a large buffer was copied before sending"
            view = numpy.frombuffer(buffer, dtype=numpy.uint8)
            assert any(numpy.shares_memory(view, memory) for memory in memories)
        manifest = json.loads(client.get("zc:v:1:manifest"))["manifest"]
        stored = b"".join(client.get(f"zc:v:1:part:{i}") for i in range(manifest["tensor_parts"]))
        assert stored == safetensors.torch.save(tensors)
        loaded = store.load_latest()
        assert loaded is not None
        for name, tensor in tensors.items():
            assert torch.equal(loaded.tensors[name], tensor)


def test_a_corrupted_part_is_detected_and_refused(redis_url: str) -> None:
    with store_for(redis_url, RetryPolicy(), prefix="bad") as store:
        store.codec = CheckpointCodec(chunk_size=1000)
        good = Checkpoint(tensors=three_tensors(700), state={"n": 1}, offsets={}, samples=1,
                          step=1, config_fingerprint="c", writer_id="w", epoch=0)  # fmt: skip
        store.save(good)
        store.save(replace(good, tensors=three_tensors(701), state={"n": 2}))
        # Payload: header 0-224, int64 224-1624, float32 1624-4428, bool. Part 1 (bytes
        # 1000-2000) straddles the int64 and float32 tensors; flip a bit of the int64 end.
        layout = store.codec.layout(replace(good, tensors=three_tensors(701), version=2))
        assert [len(segment) for segment in layout.parts[1]] == [624, 376]
        key = "bad:v:2:part:1"
        byte = store.client.getrange(key, 620, 620)
        store.client.setrange(key, 620, bytes([byte[0] ^ 0x20]))
        result = store.verify(2)
        assert not result.ok and "SHA-256" in (result.error or "")
        with pytest.raises(CheckpointCorruptError, match="SHA-256"):
            store.load(2)
        loaded = store.load_latest()
        assert loaded is not None and loaded.version == 1 and loaded.state == {"n": 1}
        assert store.corrupt_loads == 1


def test_bytes_that_differ_from_the_hashed_ones_are_refused(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part that reaches Redis other than it was hashed (torn write, tensor changed during
    the save) publishes a version that no reader accepts."""
    with store_for(redis_url, RetryPolicy(), prefix="torn") as store:
        store.save(make(1))
        real_send = store._send_parts

        def torn(version: int, parts: Any) -> None:
            first = bytearray(b"".join(parts[0]))
            first[-1] ^= 0xFF
            real_send(version, [(memoryview(bytes(first)),), *parts[1:]])

        monkeypatch.setattr(store, "_send_parts", torn)
        assert store.save(make(2)) == 2
        monkeypatch.undo()
        assert not store.verify(2).ok
        loaded = store.load_latest()
        assert loaded is not None and loaded.version == 1 and store.corrupt_loads == 1


def test_a_failed_part_write_publishes_nothing_and_writes_no_manifest(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    retry = RetryPolicy(
        retries=1, backoff=ExponentialBackoff(0.01, 1.0, jitter=False), sleep=lambda _: None
    )
    with store_for(redis_url, retry, prefix="fail") as store:
        store.save(make(1))

        def down(version: int, parts: Any) -> None:
            raise redis.ConnectionError("connection reset")

        monkeypatch.setattr(store, "_send_parts", down)
        with pytest.raises(StoreUnavailableError, match="write version 2"):
            store.save(make(2))
        assert store.client.get("fail:v:2:manifest") is None
        assert store.latest_version() == 1
        assert not any(t.name == "checkpoint-write" for t in threading.enumerate())


# ------------------------------------------------------------------ refused credentials


class _Private:
    """A redis-server started with extra arguments (a password, TLS), stopped after the test."""

    def __init__(self, directory: Path, *args: str, port_flag: str = "--port") -> None:
        self.port = _free_port()
        command = [_redis_binary(), "--port", "0", "--save", "", "--appendonly", "no"]
        if port_flag == "--port":
            command[2] = str(self.port)
        else:
            command += [port_flag, str(self.port)]
        command += ["--bind", "127.0.0.1", "--dir", str(directory), *args]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"redis-server {' '.join(args)} did not start")
                time.sleep(0.02)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., _Private]]:
    started: list[_Private] = []

    def start(*args: str, port_flag: str = "--port") -> _Private:
        server = _Private(tmp_path, *args, port_flag=port_flag)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _no_retry_sleeps() -> tuple[RetryPolicy, list[float]]:
    sleeps: list[float] = []
    return RetryPolicy(retries=8, sleep=sleeps.append), sleeps


@pytest.mark.parametrize("password", ["wrong", None])
def test_a_wrong_or_missing_password_fails_at_once_with_its_own_error(
    private_redis: Callable[..., _Private], password: str | None
) -> None:
    server = private_redis("--requirepass", "s3cret")
    retry, sleeps = _no_retry_sleeps()
    auth = f":{password}@" if password else ""
    with store_for(f"redis://{auth}127.0.0.1:{server.port}/0", retry) as store:
        started = time.monotonic()
        with pytest.raises(StoreAccessError, match="authentication failed") as info:
            store.acquire_epoch("w")
        assert time.monotonic() - started < 2.0
    assert info.value.retriable is False and sleeps == [], "a refused password is never retried"
    assert "unreachable" not in str(info.value) and "s3cret" not in str(info.value)
    with store_for(f"redis://:s3cret@127.0.0.1:{server.port}/0", retry) as store:
        assert store.acquire_epoch("w") == 1  # the right password works against the same server


def test_a_wrong_password_stops_the_cli_with_a_clear_message(
    private_redis: Callable[..., _Private], capsys: pytest.CaptureFixture[str]
) -> None:
    server = private_redis("--requirepass", "s3cret")
    url = f"redis://:wrong@127.0.0.1:{server.port}/0"
    assert cli_main(["checkpoints", "list", "--checkpoint", url]) == 2
    err = capsys.readouterr().err
    assert "authentication failed" in err and "unreachable" not in err


def test_an_untrusted_tls_certificate_fails_at_once_with_its_own_error(
    private_redis: Callable[..., _Private], tmp_path: Path
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        service_unavailable("openssl", "needed to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [openssl, *request, "-keyout", str(key), "-out", str(cert), *subject],
        check=True,
        capture_output=True,
    )
    server = private_redis(
        "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-auth-clients", "no",
        port_flag="--tls-port",
    )  # fmt: skip
    retry, sleeps = _no_retry_sleeps()
    url = f"rediss://127.0.0.1:{server.port}/0"
    refused = pytest.raises(StoreAccessError, match="TLS certificate verification failed")
    with store_for(url, retry) as store, refused as info:
        store.acquire_epoch("w")
    assert info.value.retriable is False and sleeps == []
    # The same server with its certificate trusted: the store works.
    client = redis.Redis(
        host="127.0.0.1", port=server.port, ssl=True, ssl_ca_certs=str(cert), socket_timeout=5
    )
    with RedisCheckpointStore(client, owns_client=True, retry=retry) as store:
        assert store.acquire_epoch("w") == 1
        assert store.save(replace(make(1), epoch=1)) == 1


def _signed(openssl: str, ca: tuple[Path, Path], name: str, directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 named ``name``, signed by ``ca`` (cert, key)."""
    cert, key, csr = (directory / f"{name}.{ext}" for ext in ("pem", "key", "csr"))
    subject = ["-subj", f"/CN={name}"]
    run = {"check": True, "capture_output": True}
    subprocess.run([openssl, "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(csr), *subject], **run)  # fmt: skip
    extensions = directory / f"{name}.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    subprocess.run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey",
                    str(ca[1]), "-CAcreateserial", "-days", "1", "-out", str(cert),
                    "-extfile", str(extensions)], **run)  # fmt: skip
    return cert, key


def test_rediss_with_a_private_ca_and_a_client_certificate(
    private_redis: Callable[..., _Private], tmp_path: Path
) -> None:
    """A server that verifies its clients (``--tls-auth-clients yes``), certificates from a
    private CA: the URL naming the CA, the client certificate and its key saves and loads; without
    the client certificate the server refuses the connection."""
    openssl = shutil.which("openssl")
    if openssl is None:
        service_unavailable("openssl", "needed to make a private CA")
    ca = (tmp_path / "ca.pem", tmp_path / "ca.key")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(ca[1]), "-out", str(ca[0]), "-subj", "/CN=test-ca"],
        check=True, capture_output=True,
    )  # fmt: skip
    server_cert, server_key = _signed(openssl, ca, "server", tmp_path)
    client_cert, client_key = _signed(openssl, ca, "client", tmp_path)
    server = private_redis(
        "--tls-cert-file", str(server_cert), "--tls-key-file", str(server_key),
        "--tls-ca-cert-file", str(ca[0]), "--tls-auth-clients", "yes",
        port_flag="--tls-port",
    )  # fmt: skip
    base = f"rediss://127.0.0.1:{server.port}/0?prefix=tls&ssl_ca_certs={ca[0]}"
    with open_store(f"{base}&ssl_certfile={client_cert}&ssl_keyfile={client_key}") as store:
        assert store.acquire_epoch("w") == 1
        assert store.save(replace(make(7), epoch=1)) == 1
        loaded = store.load_latest()
        assert loaded is not None and loaded.samples == 7
    # Under TLS 1.3 the server's refusal comes after the handshake: depending on the redis-py
    # version it reaches the client as the server's alert (refused: not retried) or as the
    # connection closed, like any dropped connection (retried, then unreachable).
    retry = RetryPolicy(retries=2, sleep=lambda _delay: None)
    refused = r"TLS handshake refused.*certificate required|store unreachable.*EOF"
    with (
        open_store(base, retry=retry, connect_timeout_s=2.0) as store,
        pytest.raises((StoreAccessError, StoreUnavailableError), match=refused),
    ):
        store.acquire_epoch("w")
