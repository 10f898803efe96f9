"""Settings declared once: a dataclass field with :func:`setting` is a TOML key, an environment
variable and a command-line flag, all derived from the field's name, type, default and help.

For a field ``name`` of :class:`~stream_trainer.service.ServiceConfig`:

- TOML key ``name`` (a value of the field's type; checked by :func:`check_value`);
- environment variable ``STREAM_TRAINER_<NAME>`` (text parsed by :func:`parse_text`);
- flag ``--name`` with ``_`` as ``-`` (text parsed by :func:`parse_text`); a ``bool`` defaulting to
  false is ``--name`` (sets true), one defaulting to true is ``--no-name`` (sets false).

Text parsing follows the annotation: ``bool`` takes true/false/1/0/yes/no/on/off, ``int`` and
``float`` the numbers, ``str`` anything, ``X | None`` also the empty string for ``None``,
``tuple[int, ...]`` / ``tuple[str, ...]`` comma-separated items, ``Mapping`` a JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from stream_trainer.errors import ConfigError
from stream_trainer.redaction import MASK

__all__ = ["add_setting_arguments", "check_value", "flag_of", "parse_text", "setting"]

_SECRET_WORDS = ("password", "secret", "token")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a flag, a TOML key and an environment variable (module
    docstring); ``help`` is the flag's help (the default is appended), ``choices`` restrict it."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "metavar": metavar}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _kinds(annotation: Any) -> list[str]:
    return [a.strip() for a in str(annotation).split("|")]


def _is_secret(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_WORDS)


def _parse_one(kind: str, text: str) -> Any:
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "str":
        return text
    if kind.startswith("tuple["):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        item = {"tuple[int": int, "tuple[float": float}.get(kind.split(",")[0], str)
        return tuple(item(p) for p in parts)
    if kind.startswith("Mapping"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(text)
        return value
    raise ValueError(f"cannot parse {kind}")


def parse_text(where: str, text: str, annotation: Any) -> Any:
    """``text`` as the first of the annotation's types that parses it (``""`` is None when
    allowed). ``str | tuple[str, ...]`` (``norm``) is one name, or a tuple when comma-separated.
    A :class:`ConfigError` naming ``where`` otherwise (a secret's value is not shown)."""
    kinds = _kinds(annotation)
    if "None" in kinds and text == "":
        return None
    if kinds[:2] == ["str", "tuple[str, ...]"]:
        parts = tuple(p.strip() for p in text.split(",") if p.strip())
        return parts[0] if len(parts) == 1 else parts
    # Try the specific types before str, which accepts anything.
    for kind in sorted((k for k in kinds if k != "None"), key=lambda k: k == "str"):
        try:
            return _parse_one(kind, text)
        except ValueError:
            continue
    shown = MASK if _is_secret(where) else repr(text)
    raise ConfigError(f"{where}={shown} is not a valid {annotation}")


def _matches(value: Any, kind: str) -> bool:
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("tuple["):
        item = kind[len("tuple[") :].split(",")[0]
        return isinstance(value, list | tuple) and all(_matches(v, item) for v in value)
    if kind.startswith("Mapping"):
        return isinstance(value, Mapping)
    return True


def check_value(where: str, value: Any, annotation: Any, *, secret: bool = False) -> None:
    """A :class:`ConfigError` unless ``value`` (from TOML or JSON) has the annotation's type."""
    if not any(_matches(value, kind) for kind in _kinds(annotation)):
        shown = MASK if secret else repr(value)
        raise ConfigError(f"{where} must be {annotation}, got {shown}")


def flag_of(field: dataclasses.Field[Any]) -> str:
    """The flag of a setting: ``--name``, or ``--no-name`` for a bool that defaults to true."""
    name = field.name.replace("_", "-")
    return f"--no-{name}" if field.default is True else f"--{name}"


def add_setting_arguments(parser: argparse.ArgumentParser | Any, config_class: type) -> None:
    """One flag per :func:`setting` field of ``config_class`` (module docstring). Flags default
    to :data:`argparse.SUPPRESS`: only the flags given reach the namespace, so that they override
    the file and the environment and nothing else does."""
    for field in dataclasses.fields(config_class):
        if "help" not in field.metadata:
            continue
        kinds = _kinds(field.type)
        help_text = field.metadata["help"]
        if field.default not in (None, False, True, dataclasses.MISSING, ""):
            help_text += f" (default {field.default})"
        options: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS}
        if kinds == ["bool"]:
            options["action"] = "store_false" if field.default is True else "store_true"
        else:
            where = flag_of(field)

            def convert(text: str, where: str = where, annotation: Any = field.type) -> Any:
                try:
                    return parse_text(where, text, annotation)
                except ConfigError as exc:
                    raise argparse.ArgumentTypeError(str(exc)) from None

            convert.__name__ = field.type if isinstance(field.type, str) else "value"
            options["type"] = convert
            if field.metadata.get("choices"):
                options["choices"] = field.metadata["choices"]
            if field.metadata.get("metavar"):
                options["metavar"] = field.metadata["metavar"]
        parser.add_argument(flag_of(field), help=help_text, **options)
