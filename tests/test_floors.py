"""The dependency floors that are tested: constraints/lowest.txt pins each runtime dependency of
pyproject.toml (but torch) at its floor, and in the floors run (``scripts/test.sh``, which sets
``FLOORS_RUN=1``) those are the versions actually imported."""

from __future__ import annotations

import os
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"torch"}  # not pinned: the floors run takes it from .venv (pyproject.toml says why)


def _floors() -> dict[str, str]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for spec in dependencies:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(,.*)?", spec)
        assert match, f"dependency {spec!r} has no >= floor"
        floors[match.group(1).lower()] = match.group(2)
    return floors


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / "lowest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            pins[name.lower()] = pinned
    return pins


def test_the_constraints_pin_every_floor_of_pyproject():
    floors = _floors()
    expected = {name: floor for name, floor in floors.items() if name not in SHARED}
    pins = _pins()

    # A floor "1.26" is pinned as "1.26.0"; compare release tuples padded with zeros.
    def release(text: str) -> tuple[int, ...]:
        parts = [int(p) for p in text.split(".")]
        return tuple(parts + [0] * (3 - len(parts)))

    assert set(pins) == set(expected)
    assert {n: release(v) for n, v in pins.items()} == {n: release(v) for n, v in expected.items()}


@pytest.mark.skipif(os.environ.get("FLOORS_RUN") != "1", reason="only in the floors run")
def test_the_floors_run_imports_the_pinned_versions():
    assert {name: version(name) for name in _pins()} == _pins()
