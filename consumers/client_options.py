"""Any kafka-python consumer or producer setting, passed through to the clients we build.

The ``[kafka.consumer]`` and ``[kafka.producer]`` tables of the service's TOML file (and
``--kafka-option consumer.KEY=VALUE`` / ``producer.KEY=VALUE``) hold settings that go to every
``KafkaConsumer`` (the service's source, ``stream-trainer record``) or every ``KafkaProducer``
(dead letters, predictions, ``stream-trainer replay``) unchanged. They are checked against
kafka-python's own keys (``KafkaConsumer.DEFAULT_CONFIG`` / ``KafkaProducer.DEFAULT_CONFIG``), so a
typo fails at start with the closest valid names, not at the first poll.

Three kinds of keys are refused:

- keys the project sets itself (:data:`MANAGED_CONSUMER_KEYS`, :data:`MANAGED_PRODUCER_KEYS`):
  bootstrap servers, group, offsets and commits, deserializers, ``acks`` (dead letters must not be
  lost)...; the error names the setting that controls each;
- connection security (``security_protocol``, ``sasl_*``, ``ssl_*``): it is one configuration shared
  by every client (:class:`consumers.security.KafkaSecurity`, the ``[kafka]`` table);
- keys whose value is a Python object (``partitioner``, ``ssl_context``, ``metric_reporters``,
  ``socket_options``, ...), which a text setting cannot express.

A value is the type of kafka-python's default for the key (a float key also takes an integer); a
key whose default is ``None`` takes a boolean, integer, float or string. Text values (flags,
environment) are parsed to that type: ``true``/``false``, integers, floats.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from kafka.consumer import KafkaConsumer
from kafka.producer import KafkaProducer

from consumers.security import KafkaSecurity
from stream_trainer.errors import ConfigError

__all__ = [
    "MANAGED_CONSUMER_KEYS",
    "MANAGED_PRODUCER_KEYS",
    "ClientKind",
    "KafkaClientSettings",
    "check_client_options",
    "parse_option_value",
]

ClientKind = Literal["consumer", "producer"]

_DEFAULTS: dict[str, Mapping[str, Any]] = {
    "consumer": KafkaConsumer.DEFAULT_CONFIG,
    "producer": KafkaProducer.DEFAULT_CONFIG,
}
_WHERE_SECURITY = "[kafka] (one security configuration for every client)"
# key -> where the project sets it from
MANAGED_CONSUMER_KEYS: dict[str, str] = {
    "bootstrap_servers": "the source URL (kafka://HOST:PORT/TOPIC) or --bootstrap",
    "client_id": "[kafka] client_id",
    "group_id": "group",
    "group_instance_id": "instance_id or [kafka] group_instance_id",
    "enable_auto_commit": "the service (offsets are committed after each checkpoint)",
    "auto_commit_interval_ms": "the service (auto-commit is off)",
    "auto_offset_reset": "[kafka] auto_offset_reset",
    "max_poll_records": "max_batch_records",
    "fetch_max_wait_ms": "max_wait_ms",
    "max_poll_interval_ms": "[kafka] max_poll_interval_ms",
    "session_timeout_ms": "[kafka] session_timeout_ms",
    "heartbeat_interval_ms": "[kafka] heartbeat_interval_ms",
    "request_timeout_ms": "[kafka] request_timeout_ms",
    "check_crcs": "[kafka] check_crcs",
    "bootstrap_timeout_ms": "[kafka] connect_timeout_ms",
    "allow_auto_create_topics": "[kafka] create_topic (topics are created explicitly)",
    "consumer_timeout_ms": "the service (polls are bounded by max_wait_ms)",
    "key_deserializer": "the service (keys and values are decoded by consumers.deserializer)",
    "value_deserializer": "the service (keys and values are decoded by consumers.deserializer)",
    "api_version": "the client (it negotiates the version with the broker)",
}
MANAGED_PRODUCER_KEYS: dict[str, str] = {
    "bootstrap_servers": "the source URL (kafka://HOST:PORT/TOPIC) or --bootstrap",
    "client_id": "the service (one id per producer: dead letters, predictions, replay)",
    "acks": "the service (acks='all': a dead letter or a replayed record is never lost)",
    "allow_auto_create_topics": "the service (topics are created explicitly)",
    "key_serializer": "the service (it sends bytes)",
    "value_serializer": "the service (it sends bytes)",
    "transactional_id": "the service (it does not produce in transactions)",
    "api_version": "the client (it negotiates the version with the broker)",
}


def _is_security(key: str) -> bool:
    return key == "security_protocol" or key.startswith(("sasl_", "ssl_"))


def _takes_object(default: Any) -> bool:
    """True for settings whose value is a Python object (callable, class, list...)."""
    return default is not None and not isinstance(default, bool | int | float | str)


def parse_option_value(text: str, default: Any) -> Any:
    """``text`` as the type kafka-python expects, judged by the key's ``default``.

    >>> parse_option_value("1048576", 52428800), parse_option_value("false", True)
    (1048576, False)
    >>> parse_option_value("gzip", None), parse_option_value("2.5", None)
    ('gzip', 2.5)
    """
    lowered = text.strip().lower()
    if isinstance(default, bool) or default is None:
        if lowered in ("true", "false"):
            return lowered == "true"
        if isinstance(default, bool):
            raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if default is None:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                continue
    return text


def _type_ok(value: Any, default: Any) -> bool:
    if default is None:
        return isinstance(value, bool | int | float | str)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return type(value) is type(default)


def check_client_options(
    kind: ClientKind, options: Mapping[str, Any], *, where: str | None = None, text: bool = False
) -> dict[str, Any]:
    """``options`` checked (and, with ``text``, parsed); a :class:`ConfigError` otherwise.

    Parameters
    ----------
    kind
        ``"consumer"`` or ``"producer"``: whose kafka-python keys are valid.
    options
        Setting name -> value (typed, or text to parse).
    where
        Where the settings came from, for the error messages (default ``[kafka.<kind>]``).
    text
        The values are text (a flag): parse each with :func:`parse_option_value`. Otherwise they
        are typed (TOML, JSON) and must already be of the expected type.
    """
    where = where or f"[kafka.{kind}]"
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where} must be a table of settings, got {type(options).__name__}")
    defaults = _DEFAULTS[kind]
    managed = MANAGED_CONSUMER_KEYS if kind == "consumer" else MANAGED_PRODUCER_KEYS
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in defaults:
            close = difflib.get_close_matches(str(key), list(defaults), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            msg = f"{where}: {key!r} is not a kafka-python {kind} setting{hint}"
            raise ConfigError(msg)
        if key in managed:
            raise ConfigError(f"{where}: {key} cannot be set there; it comes from {managed[key]}")
        if _is_security(key):
            raise ConfigError(f"{where}: {key} cannot be set there; set it in {_WHERE_SECURITY}")
        default = defaults[key]
        if _takes_object(default):
            msg = f"{where}: {key} takes a Python object ({type(default).__name__}), not a setting"
            raise ConfigError(msg)
        if text and isinstance(value, str) and not isinstance(default, str):
            try:
                value = parse_option_value(value, default)
            except ValueError:
                expected = "a value" if default is None else type(default).__name__
                raise ConfigError(f"{where}: {key} must be {expected}, got {value!r}") from None
        if not _type_ok(value, default):
            expected = "a boolean, number or string" if default is None else type(default).__name__
            raise ConfigError(f"{where}: {key} must be {expected}, got {value!r}")
        out[str(key)] = value
    return out


@dataclass(frozen=True, slots=True)
class KafkaClientSettings:
    """What every client built for one cluster shares: the security configuration and the
    pass-through consumer and producer settings (see the module docstring)."""

    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    consumer: Mapping[str, Any] = field(default_factory=dict)
    producer: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_kafka_table(cls, table: Mapping[str, Any]) -> KafkaClientSettings:
        """From the service's ``[kafka]`` table (security keys flat or as ``security``, the
        ``consumer`` and ``producer`` sub-tables); its source settings are ignored here."""
        names = {f.name for f in fields(KafkaSecurity)}
        flat = {k: v for k, v in table.items() if k in names}
        nested = table.get("security")
        if nested is not None and flat:
            raise ConfigError(f"security settings given twice: {sorted(flat)} and 'security'")
        security = KafkaSecurity.from_mapping(nested if isinstance(nested, Mapping) else flat)
        return cls(
            security=security,
            consumer=check_client_options("consumer", table.get("consumer", {})),
            producer=check_client_options("producer", table.get("producer", {})),
        )
