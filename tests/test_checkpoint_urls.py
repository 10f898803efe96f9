"""``open_store``: each URL form gives the right store with the right settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_trainer.checkpoints import (
    LocalDirCheckpointStore,
    MemoryCheckpointStore,
    RedisCheckpointStore,
    open_store,
)
from stream_trainer.errors import ConfigError


def test_memory_url() -> None:
    store = open_store("memory://?keep=5&chunk_size=10")
    assert isinstance(store, MemoryCheckpointStore)
    assert (store.keep, store.codec.chunk_size) == (5, 10)


@pytest.mark.parametrize("form", ["file://{}", "{}"])
def test_file_url_and_plain_path(tmp_path: Path, form: str) -> None:
    store = open_store(form.format(tmp_path / "ck"), keep=4)
    assert isinstance(store, LocalDirCheckpointStore)
    assert store.directory == tmp_path / "ck" and store.keep == 4
    assert (tmp_path / "ck" / "versions").is_dir()


def test_redis_url_settings_without_connecting() -> None:
    store = open_store("redis://127.0.0.1:1/3?prefix=trainer-7&keep=2", pending_ttl_s=60)
    assert isinstance(store, RedisCheckpointStore)
    assert (store.prefix, store.keep, store.pending_ttl_s) == ("trainer-7", 2, 60)
    assert store.client.connection_pool.connection_kwargs["db"] == 3
    store.close()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/x",
        "redis://host:notaport/0",
        "redis://host:6379/db",
        "redis:///0",
        "memory://?bogus=1",
        "redis://h:1/0?keep=many",
        "",
    ],
)
def test_bad_urls_name_the_accepted_forms(url: str) -> None:
    with pytest.raises(ConfigError, match="accepted forms: redis://HOST:PORT/DB"):
        open_store(url)


def test_unknown_options_and_bad_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['prefix'\]"):
        open_store(str(tmp_path), prefix="x")
    with pytest.raises(ConfigError, match="keep must be an int >= 1, got 0"):
        open_store("memory://?keep=0")


def test_rediss_takes_a_ca_and_a_client_certificate(tmp_path: Path) -> None:
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    query = f"ssl_ca_certs={files['ca']}&ssl_certfile={files['cert']}&ssl_keyfile={files['key']}"
    store = open_store(f"rediss://127.0.0.1:1/0?prefix=p&{query}")
    assert isinstance(store, RedisCheckpointStore)
    kwargs = store.client.connection_pool.connection_kwargs
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (
        str(files["ca"]),
        str(files["cert"]),
        str(files["key"]),
    )
    assert store.prefix == "p"
    store.close()
    # The same as options.
    store = open_store("rediss://127.0.0.1:1/0", ssl_ca_certs=str(files["ca"]))
    assert store.client.connection_pool.connection_kwargs["ssl_ca_certs"] == str(files["ca"])
    store.close()
    with pytest.raises(ConfigError, match=r"ssl_ca_certs need a TLS URL \(rediss://\)"):
        open_store(f"redis://127.0.0.1:1/0?ssl_ca_certs={files['ca']}")
    with pytest.raises(ConfigError, match=r"ssl_ca_certs '/no/ca.pem' .* is not a file"):
        open_store("rediss://127.0.0.1:1/0?ssl_ca_certs=/no/ca.pem")
    with pytest.raises(ConfigError, match="needs both ssl_certfile and ssl_keyfile"):
        open_store(f"rediss://127.0.0.1:1/0?ssl_certfile={files['cert']}")
