"""Shared pytest configuration.

Fixtures for the real services live in ``tests/fixtures`` (one module each) and are loaded here.
With ``CI=true`` an integration fixture that cannot start its service fails instead of skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.redis",
    "tests.fixtures.prometheus",
]


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the test: tiny tensors, where a second thread only adds wake-up
    latency (badly so on a busy CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_thread_pools() -> Iterator[None]:
    """Undo :func:`stream_trainer.threads.pin_threads` (run by ``evaluate`` and ``run``) after the
    test: torch's thread count, the BLAS/OpenMP pools' limits and the variables it sets."""
    from threadpoolctl import threadpool_limits

    from stream_trainer.threads import THREAD_ENV

    saved = {name: os.environ.get(name) for name in THREAD_ENV}
    threads = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restores every pool's limit on exit
        yield
    torch.set_num_threads(threads)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
