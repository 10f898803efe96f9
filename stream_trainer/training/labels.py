"""Targets: the growing list of class labels, or the running scale of a regression target.

Class labels are canonical strings: ``"cat"`` stays ``"cat"``, ``1`` and ``1.0`` become ``"1"``,
``True`` becomes ``"true"``. A label that is missing (absent or ``null``, or an empty CSV cell)
makes the record *unlabelled*: it is predicted, not learned. A label of the wrong kind (a
non-integral number for a classification task, a string for regression, a list, NaN) rejects the
record as ``bad_label``.
"""

from __future__ import annotations

import math
from typing import Any

from stream_trainer.records import RejectReason, is_finite_number

__all__ = ["MISSING", "canonical_class", "infer_task", "parse_regression_target"]

MISSING = object()


def canonical_class(value: Any) -> str | tuple[RejectReason, str]:
    """Canonical string of a class label, or ``(bad_label, detail)``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else (RejectReason.BAD_LABEL, "empty class label")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return RejectReason.BAD_LABEL, f"class label must be a string or an integer, got {value!r}"
    return RejectReason.BAD_LABEL, f"class label has type {type(value).__name__}"


def parse_regression_target(value: Any) -> float | tuple[RejectReason, str]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return RejectReason.BAD_LABEL, f"regression target must be a number, got {value!r}"
    if not is_finite_number(value):
        shown = (
            repr(value) if isinstance(value, float) else f"an integer of {value.bit_length()} bits"
        )
        return RejectReason.BAD_LABEL, f"regression target is {shown}"
    return float(value)


def infer_task(value: Any) -> str:
    """``classification`` or ``regression`` from the first labelled value."""
    if isinstance(value, float) and math.isfinite(value) and not value.is_integer():
        return "regression"
    return "classification"
