"""Shared pytest configuration.

Fixtures for the real services live in ``tests/fixtures`` (one module each) and are loaded here.
With ``CI=true`` an integration fixture that cannot start its service fails instead of skipping.
"""

from __future__ import annotations

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
