"""Separate virtual environments for baselines whose pins clash with ours.

deep-river 0.3.4 declares ``torch<2.6`` and ``river<0.26``; we run torch 2.15 and river 0.26. Its
code only needs the public ``torch.nn``/``torch.optim`` API, so the bench installs it with
``--no-deps`` into ``.bench-venvs/deep-river`` (git-ignored) next to **our** torch version and a
river 0.25 it accepts, and runs the measurement there as a subprocess (:mod:`bench.deep_river_job`)
that prints one JSON object. Nothing else of the bench imports deep-river.

    python -m bench envs            # create or check the environment
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

from bench._common import ROOT

__all__ = ["DEEP_RIVER_VENV", "deep_river_python", "ensure_deep_river"]

DEEP_RIVER_VENV = ROOT / ".bench-venvs" / "deep-river"
DEEP_RIVER_VERSION = "0.3.4"
# deep-river's own requirements minus the two it pins too low (torch, river), which we pin here.
_EXTRA = ["pandas", "scikit-learn", "sortedcontainers", "pytest", "torchviz", "tqdm", "numpy"]


def deep_river_python() -> Path:
    return DEEP_RIVER_VENV / "bin" / "python"


def _probe(python: Path) -> dict[str, str] | None:
    code = (
        "import json, torch, river, deep_river, importlib.metadata as m;"
        "print(json.dumps({'torch': torch.__version__, 'river': river.__version__,"
        "'deep_river': m.version('deep-river')}))"
    )
    try:
        out = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, check=True, timeout=120
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_deep_river(*, quiet: bool = False) -> dict[str, str]:
    """Create the deep-river venv if it is missing or broken; return its package versions."""
    python = deep_river_python()
    if python.exists():
        versions = _probe(python)
        if versions is not None:
            return versions
    import torch

    torch_version = torch.__version__.split("+")[0]
    if not python.exists():
        DEEP_RIVER_VENV.parent.mkdir(parents=True, exist_ok=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(DEEP_RIVER_VENV)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    if quiet:
        pip.append("-q")
    steps = [
        [*pip, f"torch=={torch_version}", *_EXTRA],
        [*pip, "--no-deps", f"deep-river=={DEEP_RIVER_VERSION}", "river==0.25.*"],
        # river 0.25's own requirements (numpy, scipy, pandas) without letting it move torch.
        [*pip, "scipy"],
    ]
    for cmd in steps:
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
    versions = _probe(python)
    if versions is None:
        raise RuntimeError(f"deep-river environment at {DEEP_RIVER_VENV} does not import")
    return versions


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(ensure_deep_river(), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
