"""Start-up of the ``stream-trainer`` command: ``--help`` and ``--version`` of every command answer
without importing the heavy libraries (torch above all), which load only when a command runs.

Behavioural, not timed: each case runs ``python -X importtime -m stream_trainer ...`` in a fresh
interpreter and reads the modules it imported from the import-time log.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from stream_trainer.cli import COMMANDS

# Libraries a command may use only inside its run function.
HEAVY = ("torch", "numpy", "scipy", "river", "kafka", "redis", "prometheus_client", "safetensors")


def _imported(*argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime -m stream_trainer *argv``; its result and the top-level names of
    every module it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "stream_trainer", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                names.add(name.split(".")[0])
    return done, names


@pytest.mark.parametrize(
    "argv",
    [("--help",), ("--version",), *((name, "--help") for name in COMMANDS)],
    ids=lambda argv: " ".join(argv),
)
def test_help_and_version_import_no_heavy_library(argv):
    done, names = _imported(*argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stream_trainer" in names  # the log was read
    assert done.stdout.strip()
    assert sorted(names.intersection(HEAVY)) == []


def test_a_command_that_runs_still_loads_what_it_needs():
    """The check above can fail: a run of ``evaluate`` imports torch (lazily, inside the run)."""
    done, names = _imported(
        "evaluate", "--source", "synth:agrawal?n=40", "--hidden", "4", "--no-progress"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"torch", "numpy"} <= names


def test_version_prints_the_installed_distribution_version():
    done, _ = _imported("--version")
    assert done.stdout.strip() == f"stream-trainer {version('stream-trainer')}"


@pytest.mark.parametrize("package", ["stream_trainer.training", "stream_trainer.checkpoints"])
def test_every_lazy_export_resolves(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        module.nothing  # noqa: B018


_FIRST_STEP = """
import sys
from stream_trainer.records import Record
from stream_trainer.training import IncrementalTrainer, TrainerConfig

trainer = IncrementalTrainer(TrainerConfig(target="y", hidden=(8,), seed=0))
trainer.warm_up()
assert trainer.steps == 0 and trainer.model is None and trainer.optimizer is None
before = set(sys.modules)
trainer.step([Record({"x": float(i % 3), "c": "abc"[i % 3], "y": i % 2}) for i in range(8)])
assert trainer.steps == 1 and trainer.optimizer is not None
print(sorted(set(sys.modules) - before))
"""


def test_warm_up_leaves_no_import_to_the_first_step():
    """What ``evaluate`` calls before its clock: the first step then imports nothing (a torch
    optimizer's first use imports torch._dynamo), so samples_per_second counts no import."""
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_STEP], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
