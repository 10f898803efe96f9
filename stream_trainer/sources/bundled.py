"""Datasets bundled with installed packages, named ``river:NAME`` or ``synth:NAME?key=value&...``.

``river:`` names the fixed datasets river ships (Phishing, Bananas, ImageSegments, ...). ``synth:``
names river's seeded generators; ``n`` (default 10,000) bounds the stream, ``seed`` (default 1)
seeds it. Drift streams: ``synth:agrawal_drift`` switches Agrawal's classification function
0 -> 2 at ``position`` over ``width`` samples; ``synth:sea_drift`` switches SEA variant 0 -> 3 the
same way. Nothing is downloaded.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

from stream_trainer.errors import DataError
from stream_trainer.records import Record

__all__ = ["BUNDLED_TARGETS", "iter_bundled"]

# The label field a bundled dataset's records carry unless the caller names another.
BUNDLED_TARGETS = {
    "Phishing": "is_phishing",
    "Bananas": "label",
    "ImageSegments": "shape",
    "CreditCard": "is_fraud",
    "Elec2": "up",
    "TrumpApproval": "approval",
    "ChickWeights": "weight",
}
_RIVER_FIXED = ("Phishing", "Bananas", "ImageSegments", "TrumpApproval", "ChickWeights")


def _int(params: dict[str, str], key: str, default: int) -> int:
    try:
        return int(params.pop(key, default))
    except ValueError as exc:
        raise DataError(f"synth parameter {key!r} must be an integer: {exc}") from None


def _synth_builders() -> dict[str, Callable[[dict[str, str], int], Any]]:
    from river.datasets import synth

    def agrawal(p: dict[str, str], seed: int) -> Any:
        return synth.Agrawal(classification_function=_int(p, "function", 0), seed=seed)

    def agrawal_drift(p: dict[str, str], seed: int) -> Any:
        return synth.ConceptDriftStream(
            stream=synth.Agrawal(classification_function=0, seed=seed),
            drift_stream=synth.Agrawal(classification_function=2, seed=seed + 1),
            position=_int(p, "position", 5000),
            width=_int(p, "width", 1000),
            seed=seed,
        )

    def sea(p: dict[str, str], seed: int) -> Any:
        return synth.SEA(variant=_int(p, "variant", 0), seed=seed)

    def sea_drift(p: dict[str, str], seed: int) -> Any:
        return synth.ConceptDriftStream(
            stream=synth.SEA(variant=0, seed=seed),
            drift_stream=synth.SEA(variant=3, seed=seed + 1),
            position=_int(p, "position", 5000),
            width=_int(p, "width", 1000),
            seed=seed,
        )

    def hyperplane(p: dict[str, str], seed: int) -> Any:
        return synth.Hyperplane(seed=seed, n_features=_int(p, "n_features", 10))

    def rbf_drift(p: dict[str, str], seed: int) -> Any:
        return synth.RandomRBFDrift(seed_model=seed, seed_sample=seed, change_speed=0.001)

    def led_drift(p: dict[str, str], seed: int) -> Any:
        return synth.LEDDrift(seed=seed, noise_percentage=0.1, n_drift_features=_int(p, "drift", 4))

    return {
        "agrawal": agrawal,
        "agrawal_drift": agrawal_drift,
        "sea": sea,
        "sea_drift": sea_drift,
        "hyperplane": hyperplane,
        "rbf_drift": rbf_drift,
        "led_drift": led_drift,
    }


def _as_records(pairs: Any, target: str) -> Iterator[Record]:
    for i, (x, y) in enumerate(pairs):
        value = {str(k): v for k, v in x.items()}  # JSON objects have string keys
        value[target] = y
        yield Record(value=value, offset=i)


def iter_bundled(spec: str, *, target: str | None = None) -> Iterator[Record]:
    """Yield the records of ``river:NAME`` or ``synth:NAME?params``; the label goes in
    ``target``."""
    scheme, _, rest = spec.partition(":")
    name, _, query = rest.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    if scheme == "river":
        from river import datasets

        if name not in _RIVER_FIXED:
            msg = f"unknown river dataset {name!r}; bundled ones: {', '.join(_RIVER_FIXED)}"
            raise DataError(msg)
        return _as_records(getattr(datasets, name)(), target or BUNDLED_TARGETS.get(name, "target"))
    if scheme == "synth":
        builders = _synth_builders()
        if name not in builders:
            raise DataError(f"unknown synth stream {name!r}; known: {', '.join(sorted(builders))}")
        seed = _int(params, "seed", 1)
        n = _int(params, "n", 10_000)
        dataset = builders[name](params, seed)
        if params:
            raise DataError(f"unknown parameters for synth:{name}: {', '.join(sorted(params))}")
        return _as_records(itertools.islice(iter(dataset), n), target or "class")
    raise DataError(f"not a bundled dataset spec: {spec!r} (expected river:NAME or synth:NAME)")
