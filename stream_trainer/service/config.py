"""The service's configuration: TOML file < environment < command-line flags.

One frozen :class:`ServiceConfig` holds everything ``stream-trainer run`` needs; the trainer's own
settings are a nested :class:`~stream_trainer.training.TrainerConfig` (table ``[trainer]``) and
extra Kafka client settings (security, timeouts: any :class:`consumers.KafkaSourceConfig` field) a
table ``[kafka]``. Sources of settings, later ones winning:

1. the TOML file given with ``--config`` (unknown keys are rejected, with the valid ones listed);
2. environment variables ``STREAM_TRAINER_<KEY>`` for top-level keys,
   ``STREAM_TRAINER_TRAINER__<KEY>`` and ``STREAM_TRAINER_KAFKA__<KEY>`` for the two tables
   (values parsed as the field's type; booleans as true/false/1/0; lists comma-separated). Other
   ``STREAM_TRAINER_*`` variables are rejected, except the few that are not settings
   (:data:`NON_SETTING_ENV`);
3. flags given on the command line.

Secrets (SASL and SSL passwords, passwords in URLs) never appear in :meth:`ServiceConfig.describe`,
which is what gets logged.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream_trainer.errors import ConfigError
from stream_trainer.training import TrainerConfig

__all__ = ["ENV_PREFIX", "NON_SETTING_ENV", "ServiceConfig", "load_service_config"]

ENV_PREFIX = "STREAM_TRAINER_"
# Variables with the prefix that are not settings of `run`.
NON_SETTING_ENV = frozenset(
    {
        "STREAM_TRAINER_CHECKPOINT_HMAC_KEY",
        "STREAM_TRAINER_KAFKA_HOME",
        "STREAM_TRAINER_KAFKA_BOOTSTRAP",
    }
)
LOG_FORMATS = ("text", "json")
_SECRET_KEYS = ("password", "secret", "token")


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
    log_format: str = "text"
    log_level: str = "INFO"
    progress: bool = True
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    kafka: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            (self.checkpoint_every_records >= 1, "checkpoint_every_records must be >= 1"),
            (self.checkpoint_every_seconds > 0, "checkpoint_every_seconds must be > 0"),
            (self.max_batch_records >= 1, "max_batch_records must be >= 1"),
            (self.max_wait_ms >= 0, "max_wait_ms must be >= 0"),
            (self.health_every_steps >= 1, "health_every_steps must be >= 1"),
            (self.shutdown_timeout_seconds > 0, "shutdown_timeout_seconds must be > 0"),
            (self.log_format in LOG_FORMATS, f"log_format must be one of {LOG_FORMATS}"),
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
        data["kafka"] = {
            k: ("***" if any(s in k for s in _SECRET_KEYS) and v is not None else v)
            for k, v in self.kafka.items()
        }
        data["checkpoint"] = re.sub(r"//([^:/@]*):([^@]*)@", r"//\1:***@", self.checkpoint)
        return data


_FIELDS = {f.name: f for f in dataclasses.fields(ServiceConfig)}
_TRAINER_FIELDS = {f.name: f for f in dataclasses.fields(TrainerConfig)}


def _parse_env_value(name: str, text: str, annotation: Any) -> Any:
    kind = str(annotation)
    try:
        if "bool" in kind:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if "tuple" in kind:
            parts = [p.strip() for p in text.split(",") if p.strip()]
            return tuple(int(p) for p in parts) if "int" in kind else tuple(parts)
        if kind.startswith("int") or kind == "int | None":
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not a valid {kind}") from None
    if "None" in kind and text == "":
        return None
    return text


def _from_env(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    top: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    kafka: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NON_SETTING_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key.startswith("trainer__"):
            sub = key[len("trainer__") :]
            if sub not in _TRAINER_FIELDS:
                raise ConfigError(
                    f"unknown environment variable {name}: no trainer setting {sub!r}"
                )
            trainer[sub] = _parse_env_value(name, text, _TRAINER_FIELDS[sub].type)
        elif key.startswith("kafka__"):
            kafka[key[len("kafka__") :]] = text
        elif key in _FIELDS and key not in ("trainer", "kafka"):
            top[key] = _parse_env_value(name, text, _FIELDS[key].type)
        else:
            valid = ", ".join(
                ENV_PREFIX + k.upper() for k in _FIELDS if k not in ("trainer", "kafka")
            )
            raise ConfigError(f"unknown environment variable {name}; settings are {valid}")
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
    unknown = sorted(set(top) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(unknown)}")
    target = top.get("target")
    if target is not None and trainer.get("target") is None:
        trainer["target"] = target
    trainer_config = TrainerConfig.from_dict(trainer)
    return ServiceConfig(**top, trainer=trainer_config, kafka=kafka)
