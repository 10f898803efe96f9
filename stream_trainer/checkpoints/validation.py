"""Stored checkpoint bytes read as untrusted input: bounded JSON and the rejection of a version.

Every JSON document a store reads (manifest, state document, pointer files) goes through
:func:`load_json`, which bounds it *before* the parser sees it:

* size: the caller checks the byte length against its own limit first;
* nesting: the depth of ``[``/``{`` outside strings is counted in one vectorized pass, and a
  document deeper than ``max_depth`` is refused, so the recursive parser (and every walk over
  the result) stays far from Python's recursion limit;
* numbers: ``NaN``, ``Infinity`` and literals that overflow a float (``1e999``) are refused, so
  every number in a parsed document is finite.

A version that fails any check raises :class:`CheckpointInvalidError`, whose ``reason`` is one
of :data:`REJECT_REASONS` (a metric label: a small, fixed set).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final

import numpy as np

from stream_trainer.errors import CheckpointCorruptError

__all__ = [
    "MAX_MANIFEST_DEPTH",
    "MAX_STATE_DEPTH",
    "REJECT_REASONS",
    "CheckpointInvalidError",
    "json_depth",
    "load_json",
    "rejection_reason",
]

MAX_MANIFEST_DEPTH: Final = 8
"""Deepest nesting a manifest may have (it has 4: envelope, manifest, meta, offsets)."""
MAX_STATE_DEPTH: Final = 64
"""Deepest nesting a state document may have (the trainer's is under 10)."""

REJECT_REASONS: Final = (
    "missing",  # no manifest, a missing part
    "manifest",  # manifest unreadable, too large, too deep, of the wrong shape or sizes
    "unsigned",  # no signature while a key is configured
    "signature",  # signature does not match
    "format",  # a format this code cannot read
    "checksum",  # part sizes or SHA-256 differ from the manifest
    "tensors",  # the tensor section does not parse, or tensors disagree with the state
    "state",  # the state document does not parse or fails the structural validation
    "restore",  # the validated state could not be applied
)
"""Why a stored version was rejected; each is a value of the rejection counter's label."""

# One JSON string: a quote, then runs of plain characters and backslash escapes, then a quote.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_DEPTH_STEP = np.zeros(256, dtype=np.int8)
_DEPTH_STEP[[ord("["), ord("{")]] = 1
_DEPTH_STEP[[ord("]"), ord("}")]] = -1


class CheckpointInvalidError(CheckpointCorruptError):
    """A stored version failed a check; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        if reason not in REJECT_REASONS:
            msg = f"unknown rejection reason {reason!r}; known: {REJECT_REASONS}"
            raise ValueError(msg)
        self.reason = reason


def rejection_reason(error: BaseException) -> str:
    """The :data:`REJECT_REASONS` value of ``error`` (``"state"`` for an error without one)."""
    reason = getattr(error, "reason", None)
    return reason if reason in REJECT_REASONS else "state"


def json_depth(data: bytes | memoryview) -> int:
    """Deepest ``[``/``{`` nesting of ``data`` outside JSON strings, without parsing it.

    Exact for valid JSON; for invalid JSON it never undercounts the depth the parser reaches
    before it finds the error (the parser and this scan agree on strings up to that point).
    """
    stripped = _STRING.sub(b"", bytes(data))
    steps = _DEPTH_STEP[np.frombuffer(stripped, dtype=np.uint8)]
    moves = steps[np.flatnonzero(steps)].astype(np.int64)
    return int(np.cumsum(moves).max()) if moves.size else 0


def load_json(data: bytes | memoryview, *, max_depth: int) -> Any:
    """Parse untrusted JSON bounded in nesting, with finite numbers only.

    Raises ``ValueError`` (with the reason) for a document too deep, not JSON, or with a
    non-finite number. Size limits are the caller's: check ``len(data)`` first.
    """
    depth = json_depth(data)
    if depth > max_depth:
        msg = f"nested {depth} deep, more than the {max_depth} allowed"
        raise ValueError(msg)
    try:
        return json.loads(bytes(data), parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError as exc:  # unreachable after the depth check; never let it out
        raise ValueError("nested too deep") from exc
    except UnicodeDecodeError as exc:
        msg = f"not UTF-8 ({exc.reason})"
        raise ValueError(msg) from exc


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        msg = f"number {text[:40]!r} is not a finite float"
        raise ValueError(msg)
    return value


def _no_constant(text: str) -> float:
    msg = f"{text} is not a finite number"
    raise ValueError(msg)
