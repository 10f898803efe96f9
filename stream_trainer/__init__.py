"""stream-trainer: online learning from streams with normalization that is safe at batch size 1."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stream-trainer")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"
__all__ = ["__version__"]
