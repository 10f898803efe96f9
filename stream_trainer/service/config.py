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

Each top-level setting is declared once, as a :class:`ServiceConfig` field made with
:func:`~stream_trainer.service.settings.setting` (default, type and help): its flag, environment
variable and TOML key are derived from it (:mod:`stream_trainer.service.settings`).

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
import difflib
import functools
import logging
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream_trainer.errors import ConfigError
from stream_trainer.redaction import MASK as _MASK
from stream_trainer.redaction import mask_url
from stream_trainer.service.settings import check_value, parse_text, setting
from stream_trainer.training import TrainerConfig
from stream_trainer.training.config import with_members_for_explicit_momentum

__all__ = [
    "ENV_PREFIX",
    "KUBERNETES_SERVICE_ENV",
    "NON_SETTING_ENV",
    "SERVICE_OWNED_KAFKA_KEYS",
    "ServiceConfig",
    "load_service_config",
    "parse_kafka_options",
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

    Delayed labels (:mod:`stream_trainer.service.label_join`): ``labels_source`` is ``inline``
    (each record carries its label), ``source`` (labels are later records ``{id, <target>}`` on
    the source) or ``kafka://HOST:PORT/TOPIC`` (another topic on the source's brokers, read by
    the same consumer); ``id_field`` names the id, ``max_pending`` bounds the records waiting for
    a label and ``label_timeout_seconds`` how long, in record time, they wait.
    """

    source: str = setting(
        "river:Phishing",
        help="kafka://HOST:PORT/TOPIC, a file or recording, river:NAME or synth:NAME",
    )
    target: str | None = None  # the learner's --target flag (add_learner_arguments)
    group: str = setting("stream-trainer", help="Kafka consumer group")
    run_name: str = setting("default", help="run label on every metric")
    checkpoint: str = setting(
        "file://checkpoints",
        help="redis://HOST:PORT/DB[?prefix=NAME], rediss://... (TLS) or file://DIR",
    )
    checkpoint_every_records: int = setting(1000, help="checkpoint after this many records")
    checkpoint_every_seconds: float = setting(60.0, help="or after this many seconds")
    fresh_start: bool = setting(
        False, help="start a new model even though the group has committed offsets"
    )
    allow_rollback: bool = setting(
        False,
        help="start even when the restored checkpoint is older than the version the group's "
        "committed offsets carry and the newer versions are not in the store as invalid ones "
        "(their records are trained again)",
    )
    instance_id: str | None = setting(
        None,
        help="Kafka static membership id (group.instance.id), unique in the group and stable "
        "across restarts (e.g. the pod name): a restarted member takes its place at once",
    )
    metrics_address: str = setting(
        "127.0.0.1:9100",
        help="HOST:PORT for /metrics, /healthz, /readyz, /model and /predict ('off' disables)",
    )
    stop_at_end: bool = setting(
        False, help="stop once caught up with the end offsets that existed at start"
    )
    report_json: str | None = setting(None, help="write the final report as JSON here")
    plot: str | None = setting(None, help="write a PNG of rolling accuracy and batch sizes here")
    batch_sizes: str = setting("1:64", help="file sources: N or MIN:MAX")
    max_batch_records: int = setting(64, help="Kafka: largest batch")
    max_wait_ms: int = setting(100, help="Kafka: longest wait for a batch")
    dead_letter: str | None = setting(
        None, help="dead-letter topic (Kafka; default TOPIC.dead-letter) or file (file sources)"
    )
    predictions_topic: str | None = setting(None, help="publish every prediction to this topic")
    batch_log: str | None = setting(
        None, help="log each step's offset ranges here (for bit-identical replay)"
    )
    replay_batches: str | None = setting(
        None, help="replay a recording with the batches of this batch log"
    )
    health_every_steps: int = setting(50, help="compute the health metrics every N steps")
    shutdown_timeout_seconds: float = setting(
        30.0, help="longest a stop (SIGTERM) may take before the process exits anyway"
    )
    liveness_timeout_seconds: float = setting(
        60.0,
        help="/healthz answers 503 once the loop has not begun an iteration for this long (an "
        "idle source still polls every --max-wait-ms)",
    )
    serve_predictions: bool = setting(
        False,
        help="answer POST /predict (JSON records in, predictions out) from the live model on "
        "--metrics-address",
    )
    log_format: str = setting("text", help="log lines as text or JSON", choices=LOG_FORMATS)
    log_level: str = setting("INFO", help="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    progress: bool = setting(True, help="no progress bar on stderr")
    threads: int = setting(
        1,
        help="threads of torch and of numpy's BLAS/OpenMP pools, pinned together (the MLP's "
        "products are small, and waking a thread pool per kernel costs more than it saves, by "
        "far on a busy machine)",
    )
    # -- data-parallel replicas (stream_trainer.distributed; used when WORLD_SIZE > 1) ----------
    dist_backend: str = setting(
        "auto",
        help="under torchrun (WORLD_SIZE > 1): collective backend (auto: gloo on CPU)",
        choices=("auto", "gloo", "nccl"),
    )
    dist_timeout_seconds: float = setting(
        120.0,
        help="under torchrun: a collective that waits longer fails and the replica exits",
    )
    # -- delayed labels (stream_trainer.service.label_join) ---------------------------------
    labels_source: str = setting(
        "inline",
        help="where labels arrive: 'inline' (in the records), 'source' (later records {ID, "
        "TARGET} on the source itself) or kafka://HOST:PORT/TOPIC (another topic on the "
        "source's brokers)",
    )
    id_field: str = setting("id", help="field that carries a record's id, joined with its label")
    max_pending: int = setting(
        100_000, help="most records waiting for their label; past it the oldest expires"
    )
    label_timeout_seconds: float = setting(
        3600.0, help="record time a record waits for its label before it expires"
    )
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    kafka: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            (self.checkpoint_every_records >= 1, "checkpoint_every_records must be >= 1"),
            (self.checkpoint_every_seconds > 0, "checkpoint_every_seconds must be > 0"),
            (self.max_batch_records >= 1, "max_batch_records must be >= 1"),
            (self.max_wait_ms >= 0, "max_wait_ms must be >= 0"),
            (self.health_every_steps >= 1, "health_every_steps must be >= 1"),
            (self.threads >= 1, "threads must be >= 1"),
            (self.shutdown_timeout_seconds > 0, "shutdown_timeout_seconds must be > 0"),
            (self.liveness_timeout_seconds > 0, "liveness_timeout_seconds must be > 0"),
            (self.dist_timeout_seconds > 0, "dist_timeout_seconds must be > 0"),
            (self.max_pending >= 1, "max_pending must be >= 1"),
            (self.label_timeout_seconds > 0, "label_timeout_seconds must be > 0"),
            (bool(self.id_field), "id_field must not be empty"),
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
        if self.kafka:  # the security settings' own checks (OAUTHBEARER's provider...) at start
            from consumers.client_options import KafkaClientSettings

            KafkaClientSettings.from_kafka_table(self.kafka)
        if self.instance_id is not None and "group_instance_id" in self.kafka:
            raise ConfigError(
                "give the static membership id once: instance_id or [kafka] group_instance_id, "
                f"not both (got {self.instance_id!r} and {self.kafka['group_instance_id']!r})"
            )
        if self.is_kafka:
            self.kafka_endpoint()
        self.labels_topic()

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

    @property
    def delayed_labels(self) -> bool:
        """Labels arrive after the features (on the source, or on a labels topic)."""
        return self.labels_source != "inline"

    def labels_topic(self) -> str | None:
        """The topic labels arrive on when it is not the source's; checks ``labels_source``:
        ``inline`` (labels in the records), ``source`` (``{id, <target>}`` records on the source
        itself) or ``kafka://HOST:PORT/TOPIC`` on the source's brokers."""
        if self.labels_source in ("inline", "source"):
            return None
        match = re.fullmatch(r"kafka://([^/]+)/([^/?#]+)", self.labels_source)
        if not match:
            raise ConfigError(
                "labels_source is 'inline', 'source' or kafka://HOST:PORT/TOPIC, got "
                f"{mask_url(self.labels_source)!r}"
            )
        if not self.is_kafka:
            raise ConfigError(
                "a labels topic needs a kafka:// source (files: labels_source = source)"
            )
        bootstrap, topic = self.kafka_endpoint()
        if match.group(1) != bootstrap or match.group(2) == topic:
            raise ConfigError(
                "the labels topic must be another topic on the source's brokers "
                f"({bootstrap}), got {mask_url(self.labels_source)!r}: one consumer reads both, so "
                "their offsets are committed together with the checkpoint"
            )
        return match.group(2)

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-able data, secrets masked (this is what gets logged)."""
        data = dataclasses.asdict(self)
        data["trainer"] = self.trainer.to_dict()
        data["kafka"] = _mask_mapping(self.kafka)
        for name in ("checkpoint", "source", "labels_source"):
            data[name] = mask_url(data[name])
        return data


_FIELDS = {f.name: f for f in dataclasses.fields(ServiceConfig)}
_TRAINER_FIELDS = {f.name: f for f in dataclasses.fields(TrainerConfig)}
_TABLES = ("trainer", "kafka")
_KAFKA_SUBTABLES = ("consumer", "producer", "security")
_SETTINGS = [k for k in _FIELDS if k not in _TABLES]


@functools.cache
def _kafka_field_types() -> dict[str, str]:
    """``[kafka]`` key -> annotation: the Kafka source and security settings `run` passes on."""
    from consumers import KafkaSourceConfig
    from consumers.security import KafkaSecurity

    types = {f.name: str(f.type) for f in dataclasses.fields(KafkaSourceConfig)}
    types.pop("security")
    types.pop("consumer_options")  # the [kafka.consumer] table
    types["consumer"] = types["producer"] = "Mapping[str, Any]"
    types.update({f.name: str(f.type) for f in dataclasses.fields(KafkaSecurity)})
    for key in SERVICE_OWNED_KAFKA_KEYS:
        types.pop(key, None)
    types["security"] = "Mapping[str, Any]"  # the security settings as a sub-table
    return types


def _kafka_hints(unknown: Sequence[str], types: Mapping[str, str]) -> str:
    """Close matches of mistyped ``[kafka]`` keys, and the sub-table of kafka-python client
    settings given at the top of ``[kafka]``."""
    from kafka.consumer import KafkaConsumer
    from kafka.producer import KafkaProducer

    hints = []
    for key in unknown:
        tables = [
            name
            for name, client in (("consumer", KafkaConsumer), ("producer", KafkaProducer))
            if key in client.DEFAULT_CONFIG
        ]
        if tables:
            hints.append(f"{key} is a kafka-python setting: {' / '.join(tables)}.{key}")
            continue
        close = difflib.get_close_matches(key, list(types), n=3, cutoff=0.6)
        if close:
            hints.append(f"{key}: did you mean {', '.join(close)}?")
    return f" ({'; '.join(hints)})" if hints else ""


def _check_kafka_keys(kafka: Mapping[str, Any], where: str) -> None:
    owned = sorted(k for k in kafka if k in SERVICE_OWNED_KAFKA_KEYS)
    if owned:
        hints = "; ".join(f"{k} comes from {SERVICE_OWNED_KAFKA_KEYS[k]}" for k in owned)
        raise ConfigError(f"{where}: {', '.join(owned)} cannot be set there ({hints})")
    types = _kafka_field_types()
    unknown = sorted(set(kafka) - set(types))
    if unknown:
        raise ConfigError(
            f"unknown Kafka setting(s) in {where}: {', '.join(unknown)}"
            f"{_kafka_hints(unknown, types)}; valid: {', '.join(sorted(types))}"
        )
    for key, value in kafka.items():
        check_value(f"{where} {key}", value, types[key], secret=_is_secret(key))
    from consumers.client_options import check_client_options

    for kind in ("consumer", "producer"):
        if kind in kafka:
            check_client_options(kind, kafka[kind], where=f"{where} {kind}")
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
            check_value(f"{where} security.{key}", value, security[key], secret=_is_secret(key))


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
            trainer[sub] = parse_text(
                f"environment variable {name}", text, _TRAINER_FIELDS[sub].type
            )
        elif key.startswith("kafka__"):
            sub = key[len("kafka__") :]
            types = _kafka_field_types()
            if sub in SERVICE_OWNED_KAFKA_KEYS or sub not in types or sub == "security":
                _check_kafka_keys({sub: None}, f"environment variable {name}")
                valid = ", ".join(
                    f"{ENV_PREFIX}KAFKA__{k.upper()}" for k in sorted(types) if k != "security"
                )
                raise ConfigError(f"unknown environment variable {name}; Kafka settings: {valid}")
            kafka[sub] = parse_text(f"environment variable {name}", text, types[sub])
        elif key in _SETTINGS:
            top[key] = parse_text(f"environment variable {name}", text, _FIELDS[key].type)
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
        check_value(f"{key} in {str(path)!r}", value, _FIELDS[key].type, secret=_is_secret(key))
    for key, value in trainer.items():
        check_value(f"[trainer] {key} in {str(path)!r}", value, _TRAINER_FIELDS[key].type)
    _check_kafka_keys(kafka, f"[kafka] of {str(path)!r}")
    return data, trainer, kafka


def load_service_config(
    *,
    config_file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    trainer_flags: Mapping[str, Any] | None = None,
    kafka_flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServiceConfig:
    """Merge TOML < environment < flags into one validated :class:`ServiceConfig`.

    ``flags``, ``trainer_flags`` and ``kafka_flags`` (``[kafka]`` keys, e.g. from
    :func:`parse_kafka_options`) hold only the settings given on the command line. The
    ``consumer``, ``producer`` and ``security`` sub-tables of ``[kafka]`` merge key by key: a
    later layer overrides single settings, not the whole table.
    """
    top: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    kafka: dict[str, Any] = {}
    layers = []
    if config_file is not None:
        layers.append(_from_toml(Path(config_file)))
    layers.append(_from_env(os.environ if environ is None else environ))
    # A momentum written in a file or variable means one member (the flags say it themselves).
    layers = [(t, with_members_for_explicit_momentum(tr), k) for t, tr, k in layers]
    layers.append((dict(flags or {}), dict(trainer_flags or {}), dict(kafka_flags or {})))
    for t, tr, k in layers:
        top.update(t)
        trainer.update(tr)
        for key, value in k.items():
            if key in _KAFKA_SUBTABLES and isinstance(kafka.get(key), Mapping):
                kafka[key] = {**kafka[key], **value} if isinstance(value, Mapping) else value
            else:
                kafka[key] = value
    unknown = sorted(set(top) - set(_SETTINGS))
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(unknown)}; valid: {', '.join(_SETTINGS)}")
    target = top.get("target")
    if target is not None and trainer.get("target") is None:
        trainer["target"] = target
    trainer_config = TrainerConfig.from_dict(trainer)
    return ServiceConfig(**top, trainer=trainer_config, kafka=kafka)


def parse_kafka_options(options: Sequence[str]) -> dict[str, Any]:
    """``--kafka-option`` values as ``[kafka]`` keys: ``KEY=VALUE`` is ``[kafka] KEY`` (a source or
    security setting, parsed as its type), ``consumer.KEY=VALUE`` / ``producer.KEY=VALUE`` a key of
    ``[kafka.consumer]`` / ``[kafka.producer]`` (any kafka-python setting, parsed as the type of
    its kafka-python default); later options win.

    >>> parse_kafka_options(["consumer.fetch_max_bytes=1048576", "wait_for_topic_s=30"])
    {'consumer': {'fetch_max_bytes': 1048576}, 'wait_for_topic_s': 30.0}
    """
    from consumers.client_options import check_client_options

    out: dict[str, Any] = {}
    types = _kafka_field_types()
    for option in options:
        key, sep, text = option.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--kafka-option takes KEY=VALUE, got {option!r}")
        table, dot, sub = key.partition(".")
        where = f"--kafka-option {key}"
        if dot and table in ("consumer", "producer"):
            parsed = check_client_options(
                table,  # type: ignore[arg-type]
                {sub: text},
                where="--kafka-option",
                text=True,
            )
            out.setdefault(table, {}).update(parsed)
            continue
        if dot or key not in types or types[key].startswith("Mapping"):
            if key not in types:
                _check_kafka_keys({key: None}, where)
            raise ConfigError(
                f"{where}: give a [kafka] setting ({', '.join(sorted(types))}) or "
                "consumer.KEY / producer.KEY for a kafka-python client setting"
            )
        out[key] = parse_text(where, text, types[key])
    return out
