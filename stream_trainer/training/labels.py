"""Targets: the growing list of class labels, or the running scale of a regression target.

Class labels are canonical strings: ``"cat"`` stays ``"cat"``, ``1`` and ``1.0`` become ``"1"``,
``True`` becomes ``"true"``. A label that is missing (absent or ``null``, or an empty CSV cell)
makes the record *unlabelled*: it is predicted, not learned. A label of the wrong kind (a
non-integral number for a classification task, a string for regression, a list, NaN) rejects the
record as ``bad_label``; a class label longer than ``max_length`` characters as ``too_large``; a
regression target beyond ``max_abs_value`` in magnitude as ``out_of_range`` (its square must fit
the running moments, see :data:`~stream_trainer.records.DEFAULT_MAX_ABS_VALUE`).
"""

from __future__ import annotations

import math
from typing import Any

from stream_trainer.records import RejectReason, describe_number, is_finite_number

__all__ = ["MISSING", "canonical_class", "infer_task", "parse_label", "parse_regression_target"]

MISSING = object()
_MAX_LABEL_BITS = 10_000  # about 3,000 digits, under Python's int-to-str limit of 4,300


def canonical_class(value: Any) -> str | tuple[RejectReason, str]:
    """Canonical string of a class label, or ``(bad_label, detail)``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else (RejectReason.BAD_LABEL, "empty class label")
    if isinstance(value, int):
        if value.bit_length() > _MAX_LABEL_BITS:  # str() refuses (and would take long)
            return RejectReason.TOO_LARGE, f"class label is {describe_number(value)}"
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return RejectReason.BAD_LABEL, f"class label must be a string or an integer, got {value!r}"
    return RejectReason.BAD_LABEL, f"class label has type {type(value).__name__}"


def parse_regression_target(
    value: Any, max_abs_value: float | None = None
) -> float | tuple[RejectReason, str]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return RejectReason.BAD_LABEL, f"regression target must be a number, got {value!r}"
    if not is_finite_number(value):
        return RejectReason.BAD_LABEL, f"regression target is {describe_number(value)}"
    if max_abs_value is not None and not -max_abs_value <= value <= max_abs_value:
        detail = f"regression target is {describe_number(value)}, beyond +-{max_abs_value:g}"
        return RejectReason.OUT_OF_RANGE, detail
    return float(value)


def parse_label(
    value: Any, task: str, *, max_abs_value: float, max_length: int
) -> str | float | tuple[RejectReason, str]:
    """The label of ``task`` (a canonical class, or a float target), or ``(reason, detail)``."""
    if task == "regression":
        return parse_regression_target(value, max_abs_value)
    label = canonical_class(value)
    if isinstance(label, str) and len(label) > max_length:
        return (
            RejectReason.TOO_LARGE,
            f"class label of {len(label)} characters > limit {max_length}",
        )
    return label


def infer_task(value: Any) -> str:
    """``classification`` or ``regression`` from the first labelled value."""
    if isinstance(value, float) and math.isfinite(value) and not value.is_integer():
        return "regression"
    return "classification"
