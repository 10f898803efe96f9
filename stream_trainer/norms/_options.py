"""Validation of norm-layer options: every check raises :class:`ConfigError` quoting the value."""

from __future__ import annotations

from stream_trainer.errors import ConfigError

__all__: list[str] = []


def check_num_features(num_features: object) -> int:
    """Return ``num_features`` if it is a positive ``int`` (``bool`` excluded)."""
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        msg = f"num_features must be a positive int, got {num_features!r}"
        raise ConfigError(msg)
    return num_features


def check_positive(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{name} must be a positive finite number, got {value!r}"
        raise ConfigError(msg)
    if not 0 < value < float("inf"):
        msg = f"{name} must be a positive finite number, got {value!r}"
        raise ConfigError(msg)
    return float(value)


def check_momentum(name: str, value: object) -> float:
    """Return ``value`` as a float if it lies in ``(0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        msg = f"{name} must be in (0, 1], got {value!r}"
        raise ConfigError(msg)
    return float(value)


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool`` (no truthiness: ``"no"`` is refused)."""
    if not isinstance(value, bool):
        msg = f"{name} must be a bool, got {value!r}"
        raise ConfigError(msg)
    return value


def check_non_negative_int(name: str, value: object) -> int:
    """Return ``value`` if it is an ``int`` >= 0 (``bool`` excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        msg = f"{name} must be an int >= 0, got {value!r}"
        raise ConfigError(msg)
    return value
