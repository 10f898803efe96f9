"""Flat records -> standardized float tensors, growing as new features appear.

Policy (the same for every source):

- A feature's *kind* is decided by the batch in which it first appears, over all of that batch's
  records before any of them is learned: numbers and booleans count as numeric, strings as
  categorical, and the majority of the non-missing values wins (a tie is numeric), so one stray
  string in a numeric column does not turn it categorical (:meth:`FeatureEncoder.decide_kinds`).
  A value of the other kind, in that batch or later, rejects its record (``wrong_type``); the
  record never reaches the model and the feature keeps its kind.
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
- Growth is bounded: at most ``max_features`` columns. The screen (:class:`SchemaPlan`) rejects a
  record whose new features would pass the bound; a new category of a known feature when the bound
  is reached goes to the feature's ``<other>`` column if it has one, else encodes as no category.
- Numbers beyond ``max_abs_value`` and strings longer than ``max_string_length`` (names too) are
  rejected before anything is learned: the statistics stay finite and the state stays small.

The encoder's whole state is JSON (column order, kinds, categories, running moments), so that it
can be checkpointed without pickling.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np

from stream_trainer.features.standardizer import RunningStandardizer
from stream_trainer.records import (
    DEFAULT_MAX_ABS_VALUE,
    DEFAULT_MAX_STRING_LENGTH,
    RejectReason,
    check_values,
)

__all__ = ["OTHER_CATEGORY", "FeatureEncoder", "SchemaPlan"]

OTHER_CATEGORY = "<other>"
_NUM, _CAT = "num", "cat"
_KIND_NAMES = {_NUM: "a number", _CAT: "a string"}
# The types a known numeric feature's value may have on the batch path (FeatureEncoder.screen):
# exactly those that np.array(..., float64) converts as float() does, None becoming NaN.
_PLAIN_TYPES = frozenset({float, int, bool, type(None)})
# Below this many records, screening record by record costs less than the batch path.
_BATCH_SCREEN_ROWS = 8
DEFAULT_MAX_FEATURES = 10_000


def _float_rows(rows: Sequence[Sequence[Any]], n: int, width: int) -> np.ndarray:
    """``np.array(rows, dtype=np.float64)`` for ``n`` rows of ``width`` values (None becomes NaN),
    converted as one flat iterator."""
    flat = np.fromiter(chain.from_iterable(rows), dtype=np.float64, count=n * width)
    return flat.reshape(n, width)


class FeatureEncoder:
    """Encode flat records into an ``(N, n_columns)`` float32 matrix (see the module docstring)."""

    def __init__(
        self,
        *,
        target: str | None,
        features: Sequence[str] | None = None,
        max_categories: int = 32,
        clip: float = 10.0,
        max_features: int = DEFAULT_MAX_FEATURES,
        max_abs_value: float = DEFAULT_MAX_ABS_VALUE,
        max_string_length: int = DEFAULT_MAX_STRING_LENGTH,
    ) -> None:
        self.target = target
        self.features = tuple(features) if features is not None else None
        self.max_categories = int(max_categories)
        # Screening limits (module docstring); not part of the state: the trainer sets them.
        self.max_features = int(max_features)
        self.max_abs_value = float(max_abs_value)
        self.max_string_length = int(max_string_length)
        self.kinds: dict[str, str] = {}
        # Columns are numbered in order of first appearance, so growth only ever appends.
        # numeric feature -> slot in the standardizer; numeric_columns[slot] -> column
        self.numeric: dict[str, int] = {}
        self.numeric_columns: list[int] = []
        self._numeric_names: list[str] = []  # numeric feature names in slot order
        self._column_index = np.zeros(0, dtype=np.int64)  # numeric_columns as an array
        # categorical feature -> {category -> column}
        self.categories: dict[str, dict[str, int]] = {}
        self.n_columns = 0
        self.scaler = RunningStandardizer(0, clip=clip)
        self._rows_of: tuple[tuple[str, ...], frozenset[Any], Callable[[Any], Any]] | None = None

    def _numeric_rows(self) -> tuple[frozenset[Any], Callable[[Any], Any]]:
        """The numeric feature names (slot order) with the target, and a getter of a record's
        numeric values in slot order (a tuple; ``KeyError`` when one is absent): the batch paths
        of :meth:`screen` and :meth:`_encode`, which run per batch in C what the record paths run
        per field in Python."""
        names = tuple(self._numeric_names)
        cached = self._rows_of
        if cached is None or cached[0] != names:
            getter = itemgetter(*names) if len(names) > 1 else (lambda value: (value[names[0]],))
            cached = self._rows_of = (names, frozenset((*names, self.target)), getter)
        return cached[1], cached[2]

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
        """The checks of one record on its own: :func:`~stream_trainer.records.check_values`
        (names are strings, every field but the target a finite scalar within the limits, at least
        one) then :meth:`check` (kinds seen so far). ``None``: acceptable on its own (a batch may
        still reject it, :class:`SchemaPlan`)."""
        outcome = self.screen_record(value)
        return None if isinstance(outcome, bool) else outcome

    def screen_record(self, value: dict[str, Any]) -> tuple[RejectReason, str] | bool:
        """:meth:`check_record`, and for an acceptable record whether it may add to the schema
        (``True``: a new feature or a new category, to be planned with :class:`SchemaPlan`).

        One pass over the fields for the common record (finite floats and ints within
        ``max_abs_value``, short strings, booleans and ``None``, every feature of a kind already
        seen); any other record goes through the two reference checks, which give the reason, and
        is answered ``True``."""
        kinds, target, features = self.kinds, self.target, self.features
        limit, max_len = self.max_abs_value, self.max_string_length
        categories = self.categories
        fresh = False
        n_features = 0
        for name, v in value.items():
            if name == target:
                continue
            t = type(v)
            if t is float or t is int:
                if not -limit <= v <= limit:  # NaN and infinities too
                    break
                want = _NUM
            elif t is str:
                if len(v) > max_len:
                    break
                want = _CAT
            elif t is bool:
                want = _NUM
            elif v is None:
                n_features += 1
                continue
            else:
                break
            kind = kinds.get(name)
            if kind is None:
                if features is None or name in features:
                    break  # a new feature: its name is checked on the reference path
            elif kind != want:
                break
            elif want is _CAT and not fresh:
                cats = categories[name]
                fresh = v not in cats and OTHER_CATEGORY not in cats
            n_features += 1
        else:
            if n_features:
                return fresh
        problem = check_values(
            value, target, max_abs_value=limit, max_string_length=max_len
        ) or self.check(value)
        return True if problem is None else problem

    def screen(self, values: Sequence[dict[str, Any]]) -> list[tuple[RejectReason, str] | bool]:
        """:meth:`screen_record` of each of ``values``, the same answers.

        A batch whose fields are all known numeric features (or the target), each present in
        every record with a value of a :data:`_PLAIN_TYPES` type, is checked at once: a record
        whose values all lie strictly within ``max_abs_value`` (so finite, and none missing) is
        acceptable and adds nothing; any other record, and any other batch, goes through
        :meth:`screen_record`; so does a batch of fewer than :data:`_BATCH_SCREEN_ROWS` records,
        for which the record path costs less than the batch's setup."""
        if len(values) < _BATCH_SCREEN_ROWS:
            return [self.screen_record(value) for value in values]
        inside = self._inside_limits(values)
        if inside is None:
            return [self.screen_record(value) for value in values]
        return [
            False if ok else self.screen_record(value)
            for ok, value in zip(inside, values, strict=True)
        ]

    def _inside_limits(self, values: Sequence[dict[str, Any]]) -> list[bool] | None:
        """For a batch of known numeric features only, each present with a plain value, whether
        each record's values all lie strictly within ``max_abs_value``; else None."""
        if not (self._numeric_names and values):
            return None
        plain, getter = self._numeric_rows()
        if not set().union(*values) <= plain:
            return None
        try:
            rows = list(map(getter, values))
        except KeyError:  # a feature absent from a record
            return None
        if not set(map(type, chain.from_iterable(rows))) <= _PLAIN_TYPES:
            return None
        try:
            x = _float_rows(rows, len(values), len(self._numeric_names))
        except OverflowError:  # an int beyond float64: the record path says why
            return None
        # float(v) < limit implies v <= limit for an int v too (rounding is monotonic); NaN (a
        # missing value) and the bound itself take the record path
        inside: list[bool] = (np.abs(x) < self.max_abs_value).all(axis=1).tolist()
        return inside

    def decide_kinds(self, values: Sequence[dict[str, Any]]) -> dict[str, str]:
        """The kind of every feature that ``values`` (one batch) bring and the encoder has not
        seen: the majority over the batch's non-missing values, numbers and booleans numeric,
        strings categorical, a tie numeric."""
        kinds, target, features = self.kinds, self.target, self.features
        votes: Counter[str] = Counter()  # +1 per string, -1 per number
        for value in values:
            for name, v in value.items():
                if v is None or name == target or name in kinds:
                    continue
                if features is not None and name not in features:
                    continue
                votes[name] += 1 if isinstance(v, str) else -1
        return {name: _CAT if vote > 0 else _NUM for name, vote in votes.items()}

    def _learn_schema(self, values: Sequence[dict[str, Any]]) -> bool:
        """Register new features and categories, in arrival order, while there are fewer than
        ``max_features`` columns; return True when columns were added. The screen has already
        rejected the records whose new features would not fit (:class:`SchemaPlan`, which follows
        the same rules), so the bound drops categories only."""
        before = self.n_columns
        # known numeric features only (the common batch): nothing to register
        if not (self._numeric_names and set().union(*values) <= self._numeric_rows()[0]):
            self._register(values)
        if len(self.numeric) != self.scaler.n_columns:
            self.scaler.grow(len(self.numeric))
        return self.n_columns > before

    def _register(self, values: Sequence[dict[str, Any]]) -> None:
        """:meth:`_learn_schema`'s pass over the fields, in arrival order."""
        kinds, target, features = self.kinds, self.target, self.features
        cap = self.max_features
        for value in values:
            for name, v in value.items():
                kind = kinds.get(name)
                if kind == _NUM or v is None:
                    continue
                if kind is None:
                    if name == target or (features is not None and name not in features):
                        continue
                    if self.n_columns >= cap:
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
                    if key not in cats and self.n_columns < cap:
                        cats[key] = self.n_columns
                        self.n_columns += 1

    def _encode(self, values: Sequence[dict[str, Any]], *, learn: bool) -> np.ndarray:
        n = len(values)
        out = np.zeros((n, self.n_columns), dtype=np.float32)
        names = self._numeric_names
        if names:
            try:  # every numeric feature present (None, a missing value, becomes NaN)
                rows = list(map(self._numeric_rows()[1], values))
            except KeyError:
                nan = math.nan
                rows = [
                    [nan if (v := value.get(name)) is None else v for name in names]
                    for value in values
                ]
            num = _float_rows(rows, n, len(names))
            columns = self._column_index
            if columns.shape[0] != len(names):
                columns = self._column_index = np.asarray(self.numeric_columns, dtype=np.int64)
            self.scaler.standardize_into(num, out, columns, learn=learn)
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

        ``values`` must already have passed the screen (:meth:`screen_record`, then
        :meth:`decide_kinds` and :class:`SchemaPlan` for a batch with new features). Returns
        ``(len(values), n_columns)`` float32, every entry finite (standardized numbers lie in
        ``[-clip, clip]``).
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


class SchemaPlan:
    """The columns that one batch's records add to ``encoder``, taken record by record in arrival
    order, without changing the encoder: the screen's last word on a record's features.

    ``kinds`` are the batch's decided kinds of its new features
    (:meth:`FeatureEncoder.decide_kinds`).
    :meth:`take` rejects a record with a value of the other kind (``wrong_type``), more than
    ``max_new`` new features (``too_many_new_features``) or new features that would take the
    encoder past ``max_features`` columns (``too_many_features``); otherwise it counts the record's
    new columns, exactly as :meth:`FeatureEncoder._learn_schema` will add them for the accepted
    records (a category that does not fit is dropped there and here)."""

    def __init__(self, encoder: FeatureEncoder, kinds: Mapping[str, str], max_new: int) -> None:
        self._encoder = encoder
        self._kinds = kinds
        self._max_new = max_new
        self.columns = encoder.n_columns
        self._new: set[str] = set()  # new features taken so far
        self._categories: dict[str, set[str]] = {}  # new categories taken so far, by feature

    def _category_count(self, name: str, extra: dict[str, set[str]]) -> tuple[set[str], int]:
        known = self._encoder.categories.get(name, {})
        pending = self._categories.get(name, set()) | extra.get(name, set())
        return pending, len(known) + len(pending)

    def take(self, value: dict[str, Any]) -> tuple[RejectReason, str] | None:
        """Take ``value``'s new columns, or change nothing and say why it is rejected."""
        encoder = self._encoder
        kinds, features, cap = encoder.kinds, encoder.features, encoder.max_features
        columns = self.columns
        new: list[str] = []
        extra: dict[str, set[str]] = {}  # this record's new categories
        for name, v in value.items():
            if v is None or name == encoder.target:
                continue
            kind = kinds.get(name)
            if kind is None:
                if features is not None and name not in features:
                    continue
                kind = self._kinds[name]
                if (kind == _CAT) != isinstance(v, str):
                    detail = f"feature {name!r} is {_KIND_NAMES[kind]} in this batch, got {v!r}"
                    return RejectReason.WRONG_TYPE, detail
                if name not in self._new:
                    new.append(name)
                    if len(new) > self._max_new:  # before the cap: the record's own fault
                        limit = f"max_new_features_per_record {self._max_new}"
                        return RejectReason.TOO_MANY_NEW_FEATURES, f"more new features than {limit}"
                    if columns >= cap:
                        detail = f"the model has {cap} input columns (max_features)"
                        return RejectReason.TOO_MANY_FEATURES, f"{detail}; {name!r} is new"
                    columns += 1
                    if kind == _CAT:
                        extra[name] = {v}
                    continue
            if kind == _NUM:
                continue
            pending, count = self._category_count(name, extra)
            known = encoder.categories.get(name, {})
            key = v if count < encoder.max_categories else OTHER_CATEGORY
            if v in known or v in pending or key in known or key in pending:
                continue
            if columns < cap:
                columns += 1
                extra.setdefault(name, set()).add(key)
        self.columns = columns
        self._new.update(new)
        for name, cats in extra.items():
            self._categories.setdefault(name, set()).update(cats)
        return None
