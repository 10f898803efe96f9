"""The service's configuration: TOML file < environment < command-line flags.

One frozen :class:`ServiceConfig` holds everything ``stream-trainer run`` needs; the trainer's own
settings are a nested :class:`~stream_trainer.training.TrainerConfig` (table ``[trainer]``) and
extra Kafka client settings (security, timeouts: any :class:`consumers.KafkaSourceConfig` field) a
table ``[kafka]``. Sources of settings, later ones winning:

1. the TOML file given with ``--config`` (unknown keys are rejected, with the valid ones listed);
2. environment variables ``STREAM_TRAINER_<KEY>`` for top-level keys,
   ``STREAM_TRAINER_TRAINER__<KEY>`` and ``STREAM_TRAINER_KAFKA__<KEY>`` for the two tables
   (values parsed as the field's type; booleans as true/false/1/0; lists comma-separated; a
   single ``norm`` stays a name; ``norm_options`` is JSON). Other ``STREAM_TRAINER_*`` variables
   are rejected, except the few that are not settings (:data:`NON_SETTING_ENV`) and those
   Kubernetes injects for a Service named ``stream-trainer`` (:data:`KUBERNETES_SERVICE_ENV`),
   which are ignored with a warning;
3. flags given on the command line.

Every layer is closed to unknown keys (the error lists the valid ones) and typed: a TOML value or an
environment value of the wrong type is a :class:`ConfigError` naming the key and the expected type.
The ``[kafka]`` table takes the :class:`consumers.KafkaSourceConfig` and
:class:`consumers.security.KafkaSecurity` settings except those the service sets itself
(:data:`SERVICE_OWNED_KAFKA_KEYS`: bootstrap servers and topic come from ``source``, the group from
``group``...).

Secrets (SASL and SSL passwords, passwords in URLs) never appear in :meth:`ServiceConfig.describe`
(which is what gets logged), in ``repr`` or in error messages.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream_trainer.errors import ConfigError
from stream_trainer.redaction import MASK as _MASK
from stream_trainer.redaction import mask_url
from stream_trainer.training import TrainerConfig

__all__ = [
    "ENV_PREFIX",
    "KUBERNETES_SERVICE_ENV",
    "NON_SETTING_ENV",
    "SERVICE_OWNED_KAFKA_KEYS",
    "ServiceConfig",
    "load_service_config",
]

log = logging.getLogger(__name__)

ENV_PREFIX = "STREAM_TRAINER_"
# Variables with the prefix that are not settings of `run`.
NON_SETTING_ENV = frozenset(
    {
        "STREAM_TRAINER_CHECKPOINT_HMAC_KEY",
        "STREAM_TRAINER_KAFKA_HOME",
        "STREAM_TRAINER_KAFKA_BOOTSTRAP",
    }
)
# What Kubernetes injects into every pod for a Service named stream-trainer (service links):
# STREAM_TRAINER_SERVICE_HOST, STREAM_TRAINER_SERVICE_PORT[_<PORT NAME>], STREAM_TRAINER_PORT and
# STREAM_TRAINER_PORT_<PORT>_<PROTOCOL>[_PROTO|_PORT|_ADDR]. No setting has these names.
KUBERNETES_SERVICE_ENV = re.compile(
    r"^STREAM_TRAINER_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?"
    r"|PORT(_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)$"
)
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# KafkaSourceConfig fields that `run` derives from its own settings: not accepted in [kafka].
SERVICE_OWNED_KAFKA_KEYS = {
    "bootstrap_servers": "source (kafka://HOST:PORT/TOPIC)",
    "topics": "source (kafka://HOST:PORT/TOPIC)",
    "topic": "source (kafka://HOST:PORT/TOPIC)",
    "group_id": "group",
    "target": "target",
    "features": "[trainer] features",
    "max_batch_records": "max_batch_records",
    "max_wait_ms": "max_wait_ms",
}
_SECRET_KEYS = ("password", "secret", "token")


def _is_secret(key: str) -> bool:
    return any(s in key.lower() for s in _SECRET_KEYS)


def _mask_mapping(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with the value of every secret-looking key masked, at any depth."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out[key] = _mask_mapping(value)
        elif _is_secret(str(key)) and value is not None:
            out[key] = _MASK
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of ``stream-trainer run`` (see ``stream-trainer run --help`` for each one).

    ``source`` is ``kafka://HOST:PORT[,HOST:PORT]/TOPIC`` or anything ``evaluate`` reads (a file, a
    recording, ``river:NAME``, ``synth:NAME``). File sources are cut into batches drawn from
    ``batch_sizes``; Kafka batches are whatever arrived within ``max_wait_ms``, at most
    ``max_batch_records``. A checkpoint is taken every ``checkpoint_every_records`` trained records
    or ``checkpoint_every_seconds``, whichever comes first, and on revoke, at the end and on
    SIGTERM/SIGINT.
    """

    source: str = "river:Phishing"
    target: str | None = None
    group: str = "stream-trainer"
    run_name: str = "default"
    checkpoint: str = "file://checkpoints"
    checkpoint_every_records: int = 1000
    checkpoint_every_seconds: float = 60.0
    fresh_start: bool = False
    allow_rollback: bool = False
    instance_id: str | None = None
    metrics_address: str = "127.0.0.1:9100"
    stop_at_end: bool = False
    report_json: str | None = None
    plot: str | None = None
    batch_sizes: str = "1:64"
    max_batch_records: int = 64
    max_wait_ms: int = 100
    dead_letter: str | None = None
    predictions_topic: str | None = None
    batch_log: str | None = None
    replay_batches: str | None = None
    health_every_steps: int = 50
    shutdown_timeout_seconds: float = 30.0
    # /healthz answers 503 once the loop has not begun an iteration for this long.
    liveness_timeout_seconds: float = 60.0
    # POST /predict on the metrics address (stream_trainer.service.serving).
    serve_predictions: bool = False
    log_format: str = "text"
    log_level: str = "INFO"
    progress: bool = True
    torch_threads: int = 1
    # -- data-parallel replicas (stream_trainer.distributed; used when WORLD_SIZE > 1) ----------
    dist_backend: str = "auto"
    dist_timeout_seconds: float = 120.0
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    kafka: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            (self.checkpoint_every_records >= 1, "checkpoint_every_records must be >= 1"),
            (self.checkpoint_every_seconds > 0, "checkpoint_every_seconds must be > 0"),
            (self.max_batch_records >= 1, "max_batch_records must be >= 1"),
            (self.max_wait_ms >= 0, "max_wait_ms must be >= 0"),
            (self.health_every_steps >= 1, "health_every_steps must be >= 1"),
            (self.torch_threads >= 1, "torch_threads must be >= 1"),
            (self.shutdown_timeout_seconds > 0, "shutdown_timeout_seconds must be > 0"),
            (self.liveness_timeout_seconds > 0, "liveness_timeout_seconds must be > 0"),
            (self.dist_timeout_seconds > 0, "dist_timeout_seconds must be > 0"),
            (
                self.dist_backend in ("auto", "gloo", "nccl"),
                "dist_backend must be one of ('auto', 'gloo', 'nccl')",
            ),
            (self.log_format in LOG_FORMATS, f"log_format must be one of {LOG_FORMATS}"),
            (
                str(self.log_level).upper() in LOG_LEVELS,
                f"log_level must be one of {LOG_LEVELS}",
            ),
            (bool(self.group), "group must not be empty"),
            (bool(self.run_name), "run_name must not be empty"),
        ]
        for ok, msg in checks:
            if not ok:
                field_name = msg.split(" ")[0]
                raise ConfigError(f"{msg}, got {getattr(self, field_name)!r}")
        if self.replay_batches and self.is_kafka:
            raise ConfigError(
                "replay_batches replays a recording: the source must be a file, not Kafka"
            )
        if self.metrics_address.lower() not in ("", "off", "none"):
            from stream_trainer.telemetry import parse_metrics_address

            parse_metrics_address(self.metrics_address)
        if self.serve_predictions and self.metrics_address.lower() in ("", "off", "none"):
            raise ConfigError(
                "serve_predictions answers POST /predict on metrics_address, which is "
                f"{self.metrics_address!r}: give it a HOST:PORT"
            )
        _check_kafka_keys(self.kafka, "[kafka]")
        if self.instance_id is not None and "group_instance_id" in self.kafka:
            raise ConfigError(
                "give the static membership id once: instance_id or [kafka] group_instance_id, "
                f"not both (got {self.instance_id!r} and {self.kafka['group_instance_id']!r})"
            )
        if self.is_kafka:
            self.kafka_endpoint()

    def __repr__(self) -> str:
        """Like the dataclass ``repr``, with secrets masked (see :meth:`describe`)."""
        shown = self.describe()
        inner = ", ".join(f"{name}={shown[name]!r}" for name in _FIELDS if name != "trainer")
        return f"ServiceConfig({inner}, trainer={self.trainer!r})"

    @property
    def is_kafka(self) -> bool:
        return self.source.startswith("kafka://")

    def kafka_endpoint(self) -> tuple[str, str]:
        """``(bootstrap_servers, topic)`` of a ``kafka://`` source."""
        match = re.fullmatch(r"kafka://([^/]+)/([^/?#]+)", self.source)
        if not match:
            raise ConfigError(f"a Kafka source is kafka://HOST:PORT/TOPIC, got {self.source!r}")
        return match.group(1), match.group(2)

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-able data, secrets masked (this is what gets logged)."""
        data = dataclasses.asdict(self)
        data["trainer"] = self.trainer.to_dict()
        data["kafka"] = _mask_mapping(self.kafka)
        for name in ("checkpoint", "source"):
            data[name] = mask_url(data[name])
        return data


_FIELDS = {f.name: f for f in dataclasses.fields(ServiceConfig)}
_TRAINER_FIELDS = {f.name: f for f in dataclasses.fields(TrainerConfig)}
_TABLES = ("trainer", "kafka")
_SETTINGS = [k for k in _FIELDS if k not in _TABLES]


@functools.cache
def _kafka_field_types() -> dict[str, str]:
    """``[kafka]`` key -> annotation: the Kafka source and security settings `run` passes on."""
    from consumers import KafkaSourceConfig
    from consumers.security import KafkaSecurity

    types = {f.name: str(f.type) for f in dataclasses.fields(KafkaSourceConfig)}
    types.pop("security")
    types.update({f.name: str(f.type) for f in dataclasses.fields(KafkaSecurity)})
    for key in SERVICE_OWNED_KAFKA_KEYS:
        types.pop(key, None)
    types["security"] = "Mapping[str, Any]"  # the security settings as a sub-table
    return types


def _check_kafka_keys(kafka: Mapping[str, Any], where: str) -> None:
    owned = sorted(k for k in kafka if k in SERVICE_OWNED_KAFKA_KEYS)
    if owned:
        hints = "; ".join(f"{k} comes from {SERVICE_OWNED_KAFKA_KEYS[k]}" for k in owned)
        raise ConfigError(f"{where}: {', '.join(owned)} cannot be set there ({hints})")
    types = _kafka_field_types()
    unknown = sorted(set(kafka) - set(types))
    if unknown:
        raise ConfigError(
            f"unknown Kafka setting(s) in {where}: {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(types))}"
        )
    for key, value in kafka.items():
        _check_type(f"{where} {key}", value, types[key], secret=_is_secret(key))
    nested = kafka.get("security")
    if isinstance(nested, Mapping):
        security = {k: v for k, v in types.items() if k.startswith(("security_", "sasl_", "ssl_"))}
        unknown = sorted(set(nested) - set(security))
        if unknown:
            raise ConfigError(
                f"unknown Kafka security setting(s) in {where} security: {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(security))}"
            )
        for key, value in nested.items():
            _check_type(f"{where} security.{key}", value, security[key], secret=_is_secret(key))


def _alternatives(annotation: Any) -> list[str]:
    return [a.strip() for a in str(annotation).split("|")]


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


def _check_type(where: str, value: Any, annotation: Any, *, secret: bool = False) -> None:
    if not any(_matches(value, kind) for kind in _alternatives(annotation)):
        shown = _MASK if secret else repr(value)
        raise ConfigError(f"{where} must be {annotation}, got {shown}")


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
        return tuple(int(p) for p in parts) if kind.startswith("tuple[int") else tuple(parts)
    if kind.startswith("Mapping"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(text)
        return value
    raise ValueError(f"cannot parse {kind}")


def _parse_env_value(name: str, text: str, annotation: Any) -> Any:
    """``text`` as the first of the annotation's types that parses it (``""`` is None when
    allowed). ``str | tuple[str, ...]`` (``norm``) is one name, or a tuple when comma-separated."""
    kinds = _alternatives(annotation)
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
    shown = _MASK if _is_secret(name) else repr(text)
    raise ConfigError(f"environment variable {name}={shown} is not a valid {annotation}")


def _from_env(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    top: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    kafka: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NON_SETTING_ENV:
            continue
        if KUBERNETES_SERVICE_ENV.match(name):
            log.warning(
                "ignoring %s: a variable Kubernetes injects for a Service named stream-trainer, "
                "not a setting",
                name,
            )
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key.startswith("trainer__"):
            sub = key[len("trainer__") :]
            if sub not in _TRAINER_FIELDS:
                valid = ", ".join(f"{ENV_PREFIX}TRAINER__{k.upper()}" for k in _TRAINER_FIELDS)
                raise ConfigError(
                    f"unknown environment variable {name}: no trainer setting {sub!r}; "
                    f"trainer settings are {valid}"
                )
            trainer[sub] = _parse_env_value(name, text, _TRAINER_FIELDS[sub].type)
        elif key.startswith("kafka__"):
            sub = key[len("kafka__") :]
            types = _kafka_field_types()
            if sub in SERVICE_OWNED_KAFKA_KEYS or sub not in types or sub == "security":
                _check_kafka_keys({sub: None}, f"environment variable {name}")
                valid = ", ".join(
                    f"{ENV_PREFIX}KAFKA__{k.upper()}" for k in sorted(types) if k != "security"
                )
                raise ConfigError(f"unknown environment variable {name}; Kafka settings: {valid}")
            kafka[sub] = _parse_env_value(name, text, types[sub])
        elif key in _SETTINGS:
            top[key] = _parse_env_value(name, text, _FIELDS[key].type)
        else:
            valid = ", ".join(ENV_PREFIX + k.upper() for k in _SETTINGS)
            also = ", ".join(sorted(NON_SETTING_ENV))
            raise ConfigError(
                f"unknown environment variable {name}; settings are {valid}, "
                f"{ENV_PREFIX}TRAINER__<KEY> and {ENV_PREFIX}KAFKA__<KEY> "
                f"(variables that are not settings: {also})"
            )
    return top, trainer, kafka


def _from_toml(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    trainer = data.pop("trainer", {})
    kafka = data.pop("kafka", {})
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        valid = ", ".join(sorted(set(_FIELDS)))
        raise ConfigError(f"unknown keys in {str(path)!r}: {', '.join(unknown)}; valid: {valid}")
    if not isinstance(trainer, dict) or not isinstance(kafka, dict):
        raise ConfigError(f"[trainer] and [kafka] in {str(path)!r} must be tables")
    unknown = sorted(set(trainer) - set(_TRAINER_FIELDS))
    if unknown:
        valid = ", ".join(sorted(_TRAINER_FIELDS))
        raise ConfigError(
            f"unknown keys in [trainer] of {str(path)!r}: {', '.join(unknown)}; valid: {valid}"
        )
    for key, value in data.items():
        _check_type(f"{key} in {str(path)!r}", value, _FIELDS[key].type, secret=_is_secret(key))
    for key, value in trainer.items():
        _check_type(f"[trainer] {key} in {str(path)!r}", value, _TRAINER_FIELDS[key].type)
    _check_kafka_keys(kafka, f"[kafka] of {str(path)!r}")
    return data, trainer, kafka


def load_service_config(
    *,
    config_file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    trainer_flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServiceConfig:
    """Merge TOML < environment < flags into one validated :class:`ServiceConfig`.

    ``flags`` and ``trainer_flags`` hold only the settings given on the command line.
    """
    top: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    kafka: dict[str, Any] = {}
    layers = []
    if config_file is not None:
        layers.append(_from_toml(Path(config_file)))
    layers.append(_from_env(os.environ if environ is None else environ))
    layers.append((dict(flags or {}), dict(trainer_flags or {}), {}))
    for t, tr, k in layers:
        top.update(t)
        trainer.update(tr)
        kafka.update(k)
    unknown = sorted(set(top) - set(_SETTINGS))
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(unknown)}; valid: {', '.join(_SETTINGS)}")
    target = top.get("target")
    if target is not None and trainer.get("target") is None:
        trainer["target"] = target
    trainer_config = TrainerConfig.from_dict(trainer)
    return ServiceConfig(**top, trainer=trainer_config, kafka=kafka)
