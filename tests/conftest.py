"""Shared pytest configuration.

Fixtures for the real services live in ``tests/fixtures`` (one module each) and are loaded here.
With ``CI=true`` an integration fixture that cannot start its service fails instead of skipping.
"""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.redis",
    "tests.fixtures.prometheus",
]
