"""Datasets bundled with installed packages, named ``river:NAME`` or ``synth:NAME?key=value&...``.

``river:`` names the fixed datasets river ships (Phishing, Bananas, ImageSegments, ...). ``synth:``
names river's seeded generators; ``n`` (default 10,000) bounds the stream, ``seed`` (default 1)
seeds it; a parameter a stream does not take is an error. Per stream:

- ``agrawal`` (``function``, default 0), ``sea`` (``variant``, ``noise``: the fraction of flipped
  labels), ``hyperplane`` (``n_features``, ``mag_change``: the drift per sample, ``noise``: the
  fraction of flipped labels, default 0.05), ``rbf_drift`` (``change_speed`` of the centroids,
  default 0.001; 0 is a stationary RandomRBF), ``led_drift`` (``drift``: drifting features).
- ``agrawal_drift`` switches Agrawal's classification function 0 -> 2 at ``position`` over
  ``width`` samples; ``sea_drift`` switches SEA variant 0 -> 3 the same way (and takes ``noise``).
- ``agrawal_switch``, ``sea_switch``, ``sine_switch``, ``mixed_switch``, ``stagger_switch``: a
  sequence of concepts, ``concepts=A-B-A-B`` (Agrawal functions, SEA variants, Sine, Mixed or
  STAGGER classification functions), each taking over from the one before after ``period`` of
  its own samples over ``width`` samples (``width=1``: abrupt); a repeated concept makes the
  drift recurring. Concept ``i`` is seeded ``seed + i``; ``sea_switch`` takes ``noise``.

A switch follows river's ``ConceptDriftStream``: sample ``t`` (1-based) comes from the next
concept with probability ``1 / (1 + exp(-4 (t - position) / width))``, else from the current one,
each concept advancing only when drawn; concepts are nested, so each switch counts in the samples
of the rest of the sequence. Unlike river's class it evaluates the logistic without overflow, so
an abrupt switch (``width=1``) late in the stream works; elsewhere it yields river's samples.
Nothing is downloaded.
"""

from __future__ import annotations

import itertools
import math
import random
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


def _fraction(params: dict[str, str], key: str, default: float) -> float:
    """A float parameter in [0, 1] (a noise level, a drift speed)."""
    text = params.pop(key, None)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError as exc:
        raise DataError(f"synth parameter {key!r} must be a number: {exc}") from None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise DataError(f"synth parameter {key!r} must be in [0, 1], got {text!r}")
    return value


def _positive(params: dict[str, str], key: str, default: int) -> int:
    value = _int(params, key, default)
    if value < 1:
        raise DataError(f"synth parameter {key!r} must be at least 1, got {value}")
    return value


def _concepts(params: dict[str, str], default: str) -> list[int]:
    """``concepts=A-B-...``: the concept of each segment of a switching stream."""
    text = params.pop("concepts", default)
    try:
        concepts = [int(part) for part in text.split("-")]
    except ValueError:
        msg = f"synth parameter 'concepts' must be integers joined by '-', got {text!r}"
        raise DataError(msg) from None
    return concepts


def _switch(first: Any, then: Any, position: int, width: int, seed: int) -> Iterator[Any]:
    """River's ``ConceptDriftStream`` draw (see the module docstring) with the logistic kept in
    range: ``exp`` of more than about 709 overflows, where the probability of ``then`` is 0."""
    rng = random.Random(seed)
    current, following = iter(first), iter(then)
    t = 0
    while True:
        t += 1
        v = -4.0 * float(t - position) / float(width)
        p_then = 0.0 if v > 700.0 else 1.0 / (1.0 + math.exp(v))
        try:
            yield next(current) if rng.random() > p_then else next(following)
        except StopIteration:
            return


def _sequence(
    make: Callable[[int, int], Any], p: dict[str, str], seed: int, default: str
) -> Iterator[Any]:
    """Concepts ``make(concept, seed + i)`` in the order of ``concepts``, nested switches."""
    concepts = _concepts(p, default)
    period, width = _positive(p, "period", 1000), _positive(p, "width", 1)
    streams = [make(c, seed + i) for i, c in enumerate(concepts)]
    stream: Any = streams[-1]
    for i in range(len(streams) - 2, -1, -1):
        stream = _IterableOf(_switch, streams[i], stream, period, width, seed + i)
    return iter(stream)


class _IterableOf:
    """A re-iterable call: nested switches iterate their inner stream afresh, as river's do."""

    def __init__(self, function: Callable[..., Iterator[Any]], *args: Any) -> None:
        self.function, self.args = function, args

    def __iter__(self) -> Iterator[Any]:
        return self.function(*self.args)


def _synth_builders() -> dict[str, Callable[[dict[str, str], int], Any]]:
    from river.datasets import synth

    def agrawal(p: dict[str, str], seed: int) -> Any:
        return synth.Agrawal(classification_function=_int(p, "function", 0), seed=seed)

    def agrawal_drift(p: dict[str, str], seed: int) -> Any:
        return _switch(
            synth.Agrawal(classification_function=0, seed=seed),
            synth.Agrawal(classification_function=2, seed=seed + 1),
            _int(p, "position", 5000),
            _positive(p, "width", 1000),
            seed,
        )

    def sea(p: dict[str, str], seed: int) -> Any:
        return synth.SEA(variant=_int(p, "variant", 0), noise=_fraction(p, "noise", 0.0), seed=seed)

    def sea_drift(p: dict[str, str], seed: int) -> Any:
        noise = _fraction(p, "noise", 0.0)
        return _switch(
            synth.SEA(variant=0, noise=noise, seed=seed),
            synth.SEA(variant=3, noise=noise, seed=seed + 1),
            _int(p, "position", 5000),
            _positive(p, "width", 1000),
            seed,
        )

    def hyperplane(p: dict[str, str], seed: int) -> Any:
        return synth.Hyperplane(
            seed=seed,
            n_features=_positive(p, "n_features", 10),
            mag_change=_fraction(p, "mag_change", 0.0),
            noise_percentage=_fraction(p, "noise", 0.05),
        )

    def rbf_drift(p: dict[str, str], seed: int) -> Any:
        speed = _fraction(p, "change_speed", 0.001)
        return synth.RandomRBFDrift(seed_model=seed, seed_sample=seed, change_speed=speed)

    def led_drift(p: dict[str, str], seed: int) -> Any:
        return synth.LEDDrift(seed=seed, noise_percentage=0.1, n_drift_features=_int(p, "drift", 4))

    def agrawal_switch(p: dict[str, str], seed: int) -> Any:
        def make(c: int, s: int) -> Any:
            return synth.Agrawal(classification_function=c, seed=s)

        return _sequence(make, p, seed, "0-2-4-6")

    def sea_switch(p: dict[str, str], seed: int) -> Any:
        noise = _fraction(p, "noise", 0.0)

        def make(c: int, s: int) -> Any:
            return synth.SEA(variant=c, noise=noise, seed=s)

        return _sequence(make, p, seed, "0-3-0-3")

    def sine_switch(p: dict[str, str], seed: int) -> Any:
        def make(c: int, s: int) -> Any:
            return synth.Sine(classification_function=c, seed=s)

        return _sequence(make, p, seed, "0-2")

    def mixed_switch(p: dict[str, str], seed: int) -> Any:
        def make(c: int, s: int) -> Any:
            return synth.Mixed(classification_function=c, seed=s)

        return _sequence(make, p, seed, "0-1")

    def stagger_switch(p: dict[str, str], seed: int) -> Any:
        def make(c: int, s: int) -> Any:
            return synth.STAGGER(classification_function=c, seed=s)

        return _sequence(make, p, seed, "0-1-2")

    return {
        "agrawal": agrawal,
        "agrawal_drift": agrawal_drift,
        "agrawal_switch": agrawal_switch,
        "sea": sea,
        "sea_drift": sea_drift,
        "sea_switch": sea_switch,
        "hyperplane": hyperplane,
        "rbf_drift": rbf_drift,
        "led_drift": led_drift,
        "sine_switch": sine_switch,
        "mixed_switch": mixed_switch,
        "stagger_switch": stagger_switch,
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
        try:
            dataset = builders[name](params, seed)
        except DataError:
            raise
        except ValueError as exc:  # river's own check of a function / variant number
            raise DataError(f"synth:{name}: {exc}") from None
        if params:
            raise DataError(f"unknown parameters for synth:{name}: {', '.join(sorted(params))}")
        return _as_records(itertools.islice(iter(dataset), n), target or "class")
    raise DataError(f"not a bundled dataset spec: {spec!r} (expected river:NAME or synth:NAME)")
