"""A corpus of hostile Kafka record values and what the service must do with each.

Each :class:`Hostile` names one kind of bad (or merely odd) record, its bytes, and its outcome:
rejected whole with a reason (dead-lettered), accepted and predicted only (no usable label), or
accepted and trained. The valid records around them follow one learnable concept
(:func:`valid_record`), so a test can check that the hostile ones leave learning intact.

Used by the unit suite (decoder + trainer, no broker) and by the integration suite (real Kafka).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

__all__ = ["CORPUS", "TARGET", "Hostile", "valid_record", "valid_value"]

TARGET = "label"
COLORS = ("red", "green", "blue")


def valid_value(rng: random.Random) -> dict[str, float | str | int]:
    """One record of the concept ``label = [x1 + x2 + (color == 'red') > 1.2]``."""
    x1, x2 = rng.random(), rng.random()
    color = rng.choice(COLORS)
    label = int(x1 + x2 + (0.5 if color == "red" else 0.0) > 1.2)
    return {"x1": round(x1, 6), "x2": round(x2, 6), "color": color, TARGET: label}


def valid_record(rng: random.Random) -> bytes:
    return json.dumps(valid_value(rng)).encode()


@dataclass(frozen=True)
class Hostile:
    """One kind of hostile record. ``outcome`` is ``"reject"``, ``"predict"`` or ``"train"``;
    ``reason`` is the rejection reason (the dead letter's ``x-reason``) for ``"reject"``."""

    name: str
    raw: bytes
    outcome: str
    reason: str | None = None


def _j(value: object) -> bytes:
    return json.dumps(value).encode()


def _deep(depth: int) -> bytes:
    return b'{"x1": 0.5, "x2": ' + b"[" * depth + b"]" * depth + b', "label": 1}'


def _corpus() -> list[Hostile]:
    ok = {"x1": 0.5, "x2": 0.25, "color": "red"}
    many_keys = {f"k{i}": float(i) for i in range(10_000)} | {"x1": 0.1, TARGET: 0}
    r = "reject"
    return [
        # -- bytes that are not a JSON object
        Hostile("invalid utf-8", b'{"x1": "\xff\xfe", "label": 1}', r, "not_utf8"),
        Hostile("overlong utf-8", b'{"x1": 0.5, "c\xc0\xaf": 1, "label": 1}', r, "not_utf8"),
        Hostile("truncated json", b'{"x1": 0.5, "label": ', r, "not_json"),
        Hostile("empty value", b"", r, "not_json"),
        Hostile("whitespace only", b"   \n", r, "not_json"),
        Hostile("trailing garbage", b'{"x1": 0.5, "label": 1} trailing', r, "not_json"),
        Hostile("utf-8 BOM", b'\xef\xbb\xbf{"x1": 0.5, "label": 1}', r, "not_json"),
        Hostile("single quotes", b"{'x1': 0.5, 'label': 1}", r, "not_json"),
        Hostile("json null", b"null", r, "not_object"),
        Hostile("json array", _j([0.5, 0.25, 1]), r, "not_object"),
        Hostile("json string", _j("x1=0.5"), r, "not_object"),
        Hostile("json number", b"42", r, "not_object"),
        Hostile("json true", b"true", r, "not_object"),
        Hostile("nested 200,000 deep", _deep(200_000), r, "too_deep"),
        Hostile("nested 100 deep", _deep(100), r, "too_deep"),
        # -- features of the wrong type
        Hostile("list feature", _j(ok | {"x1": [1, 2], TARGET: 1}), r, "wrong_type"),
        Hostile("object feature", _j(ok | {"x1": {"a": 1}, TARGET: 0}), r, "wrong_type"),
        Hostile("text in a numeric field", _j(ok | {"x1": "oops", TARGET: 1}), r, "wrong_type"),
        Hostile("number in a string", _j(ok | {"x1": "3.5", TARGET: 1}), r, "wrong_type"),
        Hostile("NaN spelt as text", _j(ok | {"x2": "NaN", TARGET: 0}), r, "wrong_type"),
        Hostile("boolean spelt as text", _j(ok | {"x2": "true", TARGET: 1}), r, "wrong_type"),
        Hostile("number in a text field", _j(ok | {"color": 5, TARGET: 1}), r, "wrong_type"),
        Hostile("boolean in a text field", _j(ok | {"color": True, TARGET: 0}), r, "wrong_type"),
        # -- numbers that would overflow the statistics
        Hostile(
            "NaN literal", b'{"x1": NaN, "x2": 0.5, "color": "red", "label": 1}', r, "non_finite"
        ),
        Hostile("Infinity literal", b'{"x1": Infinity, "x2": 0.5, "label": 0}', r, "non_finite"),
        Hostile("-Infinity literal", b'{"x1": 0.5, "x2": -Infinity, "label": 0}', r, "non_finite"),
        Hostile("float overflow literal", b'{"x1": 1e999, "x2": 0.5, "label": 1}', r, "non_finite"),
        Hostile("2**600", _j(ok | {"x1": 2**600, TARGET: 1}), r, "out_of_range"),
        Hostile("1e200", _j(ok | {"x2": 1e200, TARGET: 0}), r, "out_of_range"),
        Hostile("-1e300", _j(ok | {"x2": -1e300, TARGET: 0}), r, "out_of_range"),
        Hostile(
            "5,000-digit integer", b'{"x1": 9' + b"9" * 5000 + b', "label": 0}', r, "out_of_range"
        ),
        # -- labels of every JSON type
        Hostile("list label", _j(ok | {TARGET: [1]}), r, "bad_label"),
        Hostile("object label", _j(ok | {TARGET: {"y": 1}}), r, "bad_label"),
        Hostile("fractional label", _j(ok | {TARGET: 0.5}), r, "bad_label"),
        Hostile("NaN label", b'{"x1": 0.5, "x2": 0.5, "label": NaN}', r, "bad_label"),
        Hostile("huge integer label", _j(ok | {TARGET: 2**600}), "train"),
        Hostile(
            "5,000-digit label", b'{"x1": 0.5, "label": 1' + b"0" * 5000 + b"}", r, "out_of_range"
        ),
        Hostile("null label", _j(ok | {TARGET: None}), "predict"),
        Hostile("empty-string label", _j(ok | {TARGET: ""}), "predict"),
        Hostile("absent label", _j(ok), "predict"),
        Hostile("label as text '1'", _j(ok | {TARGET: "1"}), "train"),
        Hostile("label 1.0", _j(ok | {TARGET: 1.0}), "train"),
        # -- shape and size
        Hostile("empty object", b"{}", r, "no_features"),
        Hostile("label only", _j({TARGET: 1}), r, "no_features"),
        Hostile("10,000 new keys", _j(many_keys), r, "too_many_new_features"),
        Hostile("1.1 MB record", _j(ok | {"pad": "x" * 1_100_000, TARGET: 1}), r, "too_large"),
        Hostile("3 MB record", _j(ok | {"pad": "y" * 3_000_000, TARGET: 0}), r, "too_large"),
        Hostile(
            "100 KB string value", _j(ok | {"color": "z" * 100_000, TARGET: 0}), r, "too_large"
        ),
        Hostile("10,000-character key", _j(ok | {"k" * 10_000: 1.0, TARGET: 0}), r, "too_large"),
        # -- odd but valid: accepted
        Hostile(
            "duplicate keys (last wins)",
            b'{"x1": "dup", "x1": 0.5, "x2": 0.5, "label": 1}',
            "train",
        ),
        Hostile("booleans as numbers", _j(ok | {"x1": True, "x2": False, TARGET: 1}), "train"),
        Hostile(
            "negative zero and subnormal", _j(ok | {"x1": -0.0, "x2": 5e-324, TARGET: 0}), "train"
        ),
        Hostile("null features", _j({"x1": None, "x2": 0.5, "color": None, TARGET: 0}), "train"),
        Hostile(
            "NUL and RTL marks in text", _j(ok | {"color": "re\u0000d\u202e", TARGET: 1}), "train"
        ),
        Hostile("astral-plane text", _j(ok | {"color": "\U0001f525", TARGET: 1}), "train"),
        Hostile("big but finite integer", _j(ok | {"x1": 2**62, TARGET: 1}), "train"),
        Hostile("integer-valued float label", _j(ok | {TARGET: 0.0}), "train"),
        # -- Unicode that JSON can carry but UTF-8 cannot
        Hostile("lone surrogate in text", b'{"x1": 0.5, "color": "\\ud800", "label": 1}', "train"),
        Hostile("lone surrogate in a key", b'{"x1": 0.5, "\\udfff": 1.0, "label": 1}', "train"),
    ]


CORPUS: list[Hostile] = _corpus()
assert len({h.name for h in CORPUS}) == len(CORPUS), "corpus names must be unique"
assert not any(isinstance(h.raw, float) and math.isnan(h.raw) for h in CORPUS)
