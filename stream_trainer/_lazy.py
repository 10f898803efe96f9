"""Package attributes that load their module on first use (PEP 562 module ``__getattr__``).

Why: the command line builds its parser from configuration modules; a package ``__init__`` that
imported its heavy modules eagerly would load torch for ``--help``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``homes[name]`` (a module path) and
    returns its attribute ``name``; other names raise :class:`AttributeError`."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(home), name)

    return __getattr__
