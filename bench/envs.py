"""Separate virtual environments for baselines whose pins clash with ours.

deep-river 0.3.4 declares ``torch<2.6`` and ``river<0.26``; we run torch 2.15 and river 0.26. Its
code only needs the public ``torch.nn``/``torch.optim`` API, so the bench installs it with
``--no-deps`` into ``.bench-venvs/deep-river`` (git-ignored) with a river 0.25 it accepts, in a
virtual environment layered over **this** interpreter's packages (a ``.pth`` file names its
site-packages): the same torch, numpy and pandas binaries as ours, nothing large downloaded. The
environment's own river shadows ours, its site-packages coming first. The measurement runs there
as a subprocess (:mod:`bench.deep_river_job`); nothing else of the bench imports deep-river.

    python -m bench envs            # create or check the environment
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
import venv
from pathlib import Path

from bench._common import ROOT

__all__ = ["DEEP_RIVER_VENV", "deep_river_python", "ensure_deep_river"]

DEEP_RIVER_VENV = ROOT / ".bench-venvs" / "deep-river"
DEEP_RIVER_VERSION = "0.3.4"
RIVER_FOR_DEEP_RIVER = "river==0.25.*"
_BASE_PTH = "_stream_trainer_base.pth"


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
    venv.EnvBuilder(with_pip=True, clear=True).create(DEEP_RIVER_VENV)
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(own, _BASE_PTH).write_text("\n".join(site.getsitepackages()) + "\n")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-deps"]
    if quiet:
        pip.append("-q")
    cmd = [*pip, f"deep-river=={DEEP_RIVER_VERSION}", RIVER_FOR_DEEP_RIVER]
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
