"""Redis-specific behaviour against a real redis-server: restarts, retries, TTLs, prefixes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from stream_trainer.checkpoints import (
    Checkpoint,
    CheckpointCodec,
    ExponentialBackoff,
    RedisCheckpointStore,
    RetryPolicy,
)
from stream_trainer.errors import StoreUnavailableError
from tests.fixtures.redis import RedisServer

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
            store.load_latest()
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
