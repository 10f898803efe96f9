"""stream-trainer: online learning from streams with normalization that is safe at batch size 1."""

from __future__ import annotations

from functools import cache
from typing import Any

__all__ = ["__version__"]


@cache
def _version() -> str:
    """The installed distribution's version (read on first use: importlib.metadata is slow to
    import, and ``stream-trainer --help`` does without it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stream-trainer")
    except PackageNotFoundError:  # a source tree on sys.path, never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
