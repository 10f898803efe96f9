"""Flat records -> standardized float tensors, growing as new features appear.

Policy (the same for every source):

- A feature's *kind* is fixed by the first non-missing value seen for it: numbers and booleans make
  it numeric, strings make it categorical. A later value of the other kind rejects the record
  (``wrong_type``); the record never reaches the model and the feature keeps its kind.
- Numeric features are standardized online (:class:`RunningStandardizer`: exact running mean and
  biased variance, clipped to +-10). The statistics are updated with the batch *before* it is
  encoded: feature statistics carry no label, so this leaks nothing into the prequential score.
- Categorical features are one-hot encoded; each feature gets at most ``max_categories`` columns,
  later unseen values share one ``<name>=<other>`` column.
- A feature seen for the first time mid-stream adds a column; the model's input layer grows with
  zero weights for it, so what the model computes for earlier records does not change.
- A missing feature (absent key or ``null``) is encoded as 0: the running mean for numeric features,
  no category for categorical ones.
- ``features`` restricts the encoder to a fixed list of names; other fields are ignored.

The encoder's whole state is JSON (column order, kinds, categories, running moments), so that it
can be checkpointed without pickling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from stream_trainer.features.standardizer import RunningStandardizer
from stream_trainer.records import RejectReason, check_values

__all__ = ["OTHER_CATEGORY", "FeatureEncoder"]

OTHER_CATEGORY = "<other>"
_NUM, _CAT = "num", "cat"
_EXACT_INT = 2**53  # ints within this bound are finite floats: no need for the exact check


class FeatureEncoder:
    """Encode flat records into an ``(N, n_columns)`` float32 matrix (see the module docstring)."""

    def __init__(
        self,
        *,
        target: str | None,
        features: Sequence[str] | None = None,
        max_categories: int = 32,
        clip: float = 10.0,
    ) -> None:
        self.target = target
        self.features = tuple(features) if features is not None else None
        self.max_categories = int(max_categories)
        self.kinds: dict[str, str] = {}
        # Columns are numbered in order of first appearance, so growth only ever appends.
        # numeric feature -> slot in the standardizer; numeric_columns[slot] -> column
        self.numeric: dict[str, int] = {}
        self.numeric_columns: list[int] = []
        self._numeric_names: list[str] = []  # numeric feature names in slot order
        # categorical feature -> {category -> column}
        self.categories: dict[str, dict[str, int]] = {}
        self.n_columns = 0
        self.scaler = RunningStandardizer(0, clip=clip)

    def column_names(self) -> list[str]:
        names = [""] * self.n_columns
        for name, slot in self.numeric.items():
            names[self.numeric_columns[slot]] = name
        for name, cats in self.categories.items():
            for cat, j in cats.items():
                names[j] = f"{name}={cat}"
        return names

    def check(self, value: dict[str, Any]) -> tuple[RejectReason, str] | None:
        """Check the kinds of a record's features against what the encoder has seen."""
        kinds = self.kinds  # never holds the target nor, with ``features``, an unlisted name
        for name, v in value.items():
            kind = kinds.get(name)
            if kind is None or v is None:
                continue
            if (kind == _NUM) == isinstance(v, str):
                want = "a number" if kind == _NUM else "a string"
                return RejectReason.WRONG_TYPE, f"feature {name!r} must be {want}, got {v!r}"
        return None

    def check_record(self, value: dict[str, Any]) -> tuple[RejectReason, str] | None:
        """:func:`~stream_trainer.records.check_values` (every field but the target a finite
        scalar, at least one) then :meth:`check` (kinds), with the same answers: one pass over the
        fields for the common record (finite floats, ints, strings and ``None`` of the kinds seen
        so far); any other record goes through the two reference checks, which give the reason."""
        kinds, target = self.kinds, self.target
        n_features = 0
        for name, v in value.items():
            if name == target:
                continue
            t = type(v)
            if t is float:
                if v - v != 0.0 or kinds.get(name) == _CAT:  # NaN/inf give NaN, not 0
                    break
            elif t is str:
                if kinds.get(name) == _NUM:
                    break
            elif t is int:
                if not -_EXACT_INT <= v <= _EXACT_INT or kinds.get(name) == _CAT:
                    break
            elif v is not None:
                break
            n_features += 1
        else:
            if n_features:
                return None
        problem = check_values(value, target)
        return problem if problem is not None else self.check(value)

    def _learn_schema(self, values: Sequence[dict[str, Any]]) -> bool:
        """Register new features and categories; return True when columns were added."""
        before = self.n_columns
        kinds, target, features = self.kinds, self.target, self.features
        for value in values:
            for name, v in value.items():
                kind = kinds.get(name)
                if kind == _NUM or v is None:
                    continue
                if kind is None:
                    if name == target or (features is not None and name not in features):
                        continue
                    kind = kinds[name] = _CAT if isinstance(v, str) else _NUM
                    if kind == _NUM:
                        self.numeric[name] = len(self.numeric)
                        self._numeric_names.append(name)
                        self.numeric_columns.append(self.n_columns)
                        self.n_columns += 1
                        continue
                    self.categories[name] = {}
                cats = self.categories[name]
                if v not in cats:
                    key = v if len(cats) < self.max_categories else OTHER_CATEGORY
                    if key not in cats:
                        cats[key] = self.n_columns
                        self.n_columns += 1
        if len(self.numeric) != self.scaler.n_columns:
            self.scaler.grow(len(self.numeric))
        return self.n_columns > before

    def _encode(self, values: Sequence[dict[str, Any]], *, learn: bool) -> np.ndarray:
        n = len(values)
        out = np.zeros((n, self.n_columns), dtype=np.float32)
        names = self._numeric_names
        if names:
            nan = math.nan
            num = np.array(
                [
                    [nan if (v := value.get(name)) is None else v for name in names]
                    for value in values
                ],
                dtype=np.float64,
            ).reshape(n, len(names))
            if learn:
                self.scaler.update(num)
            out[:, self.numeric_columns] = self.scaler.transform(num)
        if self.categories:
            for i, value in enumerate(values):
                for name, cats in self.categories.items():
                    v = value.get(name)
                    if v is None:
                        continue
                    col = cats.get(v)
                    if col is None:
                        col = cats.get(OTHER_CATEGORY)
                    if col is not None:
                        out[i, col] = 1.0
        return out

    def fit_transform(self, values: Sequence[dict[str, Any]]) -> np.ndarray:
        """Learn the schema and the running statistics from ``values``, then encode them.

        ``values`` must already have passed :meth:`check`. Returns ``(len(values), n_columns)``
        float32, every entry finite (standardized numbers lie in ``[-clip, clip]``).
        """
        self._learn_schema(values)
        return self._encode(values, learn=True)

    def transform(self, values: Sequence[dict[str, Any]]) -> np.ndarray:
        """Encode with the current schema and statistics, changing nothing (for serving only).

        Features not seen yet are ignored; an unseen category goes to the feature's
        ``<other>`` column if it has one, else encodes as no category.
        """
        return self._encode(values, learn=False)

    def state(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "features": list(self.features) if self.features is not None else None,
            "max_categories": self.max_categories,
            "kinds": self.kinds,
            "numeric": self.numeric,
            "numeric_columns": self.numeric_columns,
            "categories": self.categories,
            "n_columns": self.n_columns,
            "scaler": self.scaler.state(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FeatureEncoder:
        obj = cls(
            target=state["target"],
            features=state["features"],
            max_categories=state["max_categories"],
        )
        obj.kinds = dict(state["kinds"])
        obj.numeric = {k: int(v) for k, v in state["numeric"].items()}
        obj.categories = {
            k: {c: int(j) for c, j in v.items()} for k, v in state["categories"].items()
        }
        obj.numeric_columns = [int(j) for j in state["numeric_columns"]]
        obj._numeric_names = sorted(obj.numeric, key=obj.numeric.__getitem__)
        obj.n_columns = int(state["n_columns"])
        obj.scaler = RunningStandardizer.from_state(state["scaler"])
        return obj
