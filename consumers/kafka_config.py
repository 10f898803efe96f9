"""Settings of the Kafka record source: :class:`KafkaSourceConfig`, validated on construction.

Kept apart from the source (:mod:`consumers.kafka_source`) so that the service's configuration and
the consumer process read and check the settings without the consumer's machinery; the source
module re-exports the names below.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from kafka.record import util as _record_util

from consumers.client_options import check_client_options
from consumers.security import KafkaSecurity
from stream_trainer.errors import ConfigError
from stream_trainer.records import DEFAULT_MAX_RECORD_BYTES

__all__ = ["KafkaSourceConfig", "fast_crc32c"]

_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_INSTANCE_ID_RE = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9._-]{1,249}$")
_OFFSET_RESETS = ("earliest", "latest")


def fast_crc32c() -> bool:
    """True when kafka-python computes CRC-32C with the ``crc32c`` C extension."""
    return getattr(_record_util, "crc32c_c", None) is not None


@dataclass(frozen=True, slots=True)
class KafkaSourceConfig:
    """Settings of one :class:`KafkaRecordSource`, validated on construction.

    Parameters
    ----------
    bootstrap_servers
        ``"host:port"`` or several, comma-separated or as a tuple.
    topics
        One topic name or several.
    group_id
        Consumer group; members of one group share the partitions.
    target
        Label field: kept by the feature subset and skipped by the value checks.
    features
        Feature subset to keep (plus ``target``); ``None`` keeps every field.
    max_batch_records
        Upper bound on the messages (records + rejected) in one batch.
    max_wait_ms
        Longest :meth:`KafkaRecordSource.poll_batch` waits when nothing is buffered.
    max_record_bytes
        Larger values are rejected (``too_large``) without being decoded.
    max_poll_interval_ms
        Longest allowed time between two polls (see the module note on how to size it).
    session_timeout_ms, heartbeat_interval_ms
        Group liveness: the coordinator drops a member whose heartbeats stop for
        ``session_timeout_ms``; heartbeats are sent every ``heartbeat_interval_ms`` from a
        background thread.
    request_timeout_ms
        Per-request timeout of the client.
    auto_offset_reset
        Where to start a partition that has neither a provided nor a committed offset.
    create_topic, create_topic_partitions
        Create a missing topic (else a missing topic is a :class:`SourceError`).
    connect_timeout_ms, connect_retries
        One connection attempt's bound, and how many more attempts follow a failed one.
    commit_timeout_ms, close_timeout_ms
        Bounds on a synchronous commit and on :meth:`KafkaRecordSource.close`.
    check_crcs
        Verify the CRC-32C of every record batch fetched. ``None`` (default): verify when
        kafka-python has the ``crc32c`` C extension (a dependency of this package, so normally
        always), skip otherwise: the pure-Python fallback costs more than a training step per
        record, while the broker has already verified every batch on produce and TCP checksums
        the transfer. ``True`` verifies whatever it costs.
    security
        Passed through to kafka-python; secrets stay out of ``repr`` and logs.
    consumer_process
        Run the consumer in a child process (:class:`~consumers.process.source.ProcessKafkaSource`,
        which :func:`~consumers.process.source.open_kafka_source` and the service open when this
        is true, the default): fetching, kafka-python's record parsing and the decoding then
        overlap the training step on another core. False keeps the consumer in the service's
        process (one core, no child). :class:`KafkaRecordSource` itself ignores it.
    read_ahead_batches
        With ``consumer_process``: how many batches the child reads ahead of the one being
        trained (default 4; 1: the next batch only). More lets the child's own pauses (a fetch
        response parsed, a garbage collection) come out of its lead instead of the trainer's
        time, at the cost of memory (at most this many times ``max_batch_records`` records held)
        and of batches cut earlier under moderate load; at a rebalance, what was read ahead of
        the revoked partitions is dropped and read again (:mod:`consumers.process.source`).
        :class:`KafkaRecordSource` ignores it.
    group_instance_id
        Static membership (KIP-345): a member that restarts with the same id takes its place in
        the group at once, with its partitions, instead of waiting ``session_timeout_ms`` for the
        dead member's session to expire. It must be unique in the group (a second member with it
        fences the first) and stable across restarts (a StatefulSet pod name, a host name). A
        static member does not leave the group when it stops: its partitions wait
        ``session_timeout_ms`` for it to come back. ``None`` (default): a dynamic member, which
        leaves the group on :meth:`KafkaRecordSource.close`.
    lag_timeout_ms
        Bound on one :meth:`KafkaRecordSource.lag` query (its broker requests), so that a lag
        metric never holds the training loop for long while the broker is unreachable.
    consumer_options
        Any other kafka-python consumer setting (``isolation_level``, ``fetch_max_bytes``, ...),
        passed through unchanged; checked by :func:`consumers.client_options.check_client_options`,
        which refuses the keys set above. ``from_mapping`` also takes it as ``consumer`` (the
        ``[kafka.consumer]`` table).
    wait_for_topic_s
        How long to wait for a missing topic to be created by someone else before failing (0, the
        default: fail at once unless ``create_topic``). While waiting, a message is logged every
        few seconds; the metadata is asked again every ``0.5`` s.
    """

    bootstrap_servers: str | tuple[str, ...]
    topics: str | tuple[str, ...]
    group_id: str = "stream-trainer"
    target: str | None = None
    features: tuple[str, ...] | None = None
    max_batch_records: int = 512
    max_wait_ms: int = 100
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_poll_interval_ms: int = 300_000
    session_timeout_ms: int = 45_000
    heartbeat_interval_ms: int = 3_000
    request_timeout_ms: int = 30_000
    auto_offset_reset: str = "earliest"
    client_id: str = "stream-trainer"
    create_topic: bool = False
    create_topic_partitions: int = 1
    connect_timeout_ms: int = 5_000
    connect_retries: int = 3
    commit_timeout_ms: int = 10_000
    close_timeout_ms: int = 5_000
    check_crcs: bool | None = None
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    consumer_process: bool = True
    read_ahead_batches: int = 4
    group_instance_id: str | None = None
    lag_timeout_ms: int = 500
    consumer_options: Mapping[str, Any] = field(default_factory=dict)
    wait_for_topic_s: float = 0.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.topics, str):
            set_(self, "topics", (self.topics,))
        else:
            set_(self, "topics", tuple(self.topics))
        if isinstance(self.bootstrap_servers, str):
            servers = tuple(s.strip() for s in self.bootstrap_servers.split(",") if s.strip())
        else:
            servers = tuple(self.bootstrap_servers)
        if not servers:
            raise ConfigError(f"bootstrap_servers must name a host:port, got {servers!r}")
        set_(self, "bootstrap_servers", servers)
        if self.features is not None:
            set_(self, "features", tuple(dict.fromkeys(self.features)))
        set_(self, "consumer_options", check_client_options("consumer", self.consumer_options))
        self._validate()

    def _validate(self) -> None:
        if not self.topics:
            raise ConfigError("topics must name at least one topic, got ()")
        for topic in self.topics:
            if not isinstance(topic, str) or not _TOPIC_RE.match(topic):
                msg = f"topic names use [A-Za-z0-9._-], 1 to 249 characters, got {topic!r}"
                raise ConfigError(msg)
        if not self.group_id:
            raise ConfigError(f"group_id must be a non-empty string, got {self.group_id!r}")
        if self.features is not None and not self.features:
            raise ConfigError("features must name at least one field, or be None for all")
        positive = (
            "max_batch_records",
            "max_record_bytes",
            "max_poll_interval_ms",
            "session_timeout_ms",
            "heartbeat_interval_ms",
            "request_timeout_ms",
            "create_topic_partitions",
            "connect_timeout_ms",
            "commit_timeout_ms",
            "close_timeout_ms",
            "read_ahead_batches",
            "lag_timeout_ms",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_wait_ms, int) or self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be an integer >= 0, got {self.max_wait_ms!r}")
        if not isinstance(self.connect_retries, int) or self.connect_retries < 0:
            msg = f"connect_retries must be an integer >= 0, got {self.connect_retries!r}"
            raise ConfigError(msg)
        if self.auto_offset_reset not in _OFFSET_RESETS:
            msg = (
                f"auto_offset_reset must be 'earliest' or 'latest', got {self.auto_offset_reset!r}"
            )
            raise ConfigError(msg)
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            msg = (
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be below "
                f"session_timeout_ms ({self.session_timeout_ms}); a third of it is usual"
            )
            raise ConfigError(msg)
        if self.max_wait_ms >= self.request_timeout_ms:
            msg = (
                f"max_wait_ms ({self.max_wait_ms}) must be below "
                f"request_timeout_ms ({self.request_timeout_ms})"
            )
            raise ConfigError(msg)
        if self.max_poll_interval_ms <= self.max_wait_ms:
            msg = (
                f"max_poll_interval_ms ({self.max_poll_interval_ms}) must exceed max_wait_ms "
                f"({self.max_wait_ms}) plus the time of a training step"
            )
            raise ConfigError(msg)
        if self.check_crcs is not None and not isinstance(self.check_crcs, bool):
            msg = f"check_crcs must be true, false or null (auto), got {self.check_crcs!r}"
            raise ConfigError(msg)
        if not isinstance(self.consumer_process, bool):
            msg = f"consumer_process must be true or false, got {self.consumer_process!r}"
            raise ConfigError(msg)
        instance = self.group_instance_id
        if instance is not None and (
            not isinstance(instance, str) or not _INSTANCE_ID_RE.match(instance)
        ):
            msg = (
                "group_instance_id uses [A-Za-z0-9._-], 1 to 249 characters (not '.' or '..'), "
                f"got {instance!r}"
            )
            raise ConfigError(msg)
        wait = self.wait_for_topic_s
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait >= 0:
            raise ConfigError(f"wait_for_topic_s must be a number >= 0, got {wait!r}")
        if not isinstance(self.security, KafkaSecurity):
            msg = f"security must be a KafkaSecurity, got {type(self.security).__name__}"
            raise ConfigError(msg)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> KafkaSourceConfig:
        """Build from a config-file section. Unknown keys are a :class:`ConfigError`.

        ``topic`` is accepted for ``topics``; security settings may be given flat
        (``security_protocol=...``) or as a ``security`` sub-mapping.
        """
        data = dict(mapping)
        if "consumer" in data:
            if "consumer_options" in data:
                raise ConfigError("give either 'consumer' or 'consumer_options', not both")
            data["consumer_options"] = data.pop("consumer")
        if "topic" in data:
            if "topics" in data:
                raise ConfigError("give either 'topic' or 'topics', not both")
            data["topics"] = data.pop("topic")
        security_names = {f.name for f in fields(KafkaSecurity)}
        flat = {k: data.pop(k) for k in list(data) if k in security_names}
        nested = data.pop("security", None)
        if nested is not None and flat:
            raise ConfigError(f"security settings given twice: {sorted(flat)} and 'security'")
        if isinstance(nested, Mapping):
            data["security"] = KafkaSecurity.from_mapping(nested)
        elif nested is not None:
            data["security"] = nested
        elif flat:
            data["security"] = KafkaSecurity.from_mapping(flat)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            msg = f"unknown Kafka source setting(s) {unknown}; known: {sorted(known | {'topic'})}"
            raise ConfigError(msg)
        if "features" in data and data["features"] is not None:
            data["features"] = tuple(data["features"])
        return cls(**data)

    def consumer_configs(self) -> dict[str, Any]:
        """Keyword arguments for ``KafkaConsumer`` (secrets included: never log this)."""
        return {
            "bootstrap_servers": list(self.bootstrap_servers),
            "client_id": self.client_id,
            "group_id": self.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": self.auto_offset_reset,
            "max_poll_records": self.max_batch_records,
            "max_poll_interval_ms": self.max_poll_interval_ms,
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "request_timeout_ms": self.request_timeout_ms,
            # Broker-side long poll of one fetch; poll_batch's own deadline is max_wait_ms.
            "fetch_max_wait_ms": max(1, min(self.max_wait_ms, 500)),
            "check_crcs": self.crc_checked(),
            "bootstrap_timeout_ms": self.connect_timeout_ms,
            "allow_auto_create_topics": False,
            "group_instance_id": self.group_instance_id,
            **self.consumer_options,
            **self.security.client_configs(),
        }

    def crc_checked(self) -> bool:
        """Whether fetched batches are CRC-checked (``check_crcs``, or the ``None`` default
        resolved: checked when kafka-python has a C implementation of CRC-32C)."""
        if self.check_crcs is not None:
            return self.check_crcs
        return fast_crc32c()

    def to_mapping(self) -> dict[str, Any]:
        """Every setting as JSON-able values, secrets included (never log this):
        ``from_mapping(to_mapping())`` gives back an equal config."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["consumer_options"] = dict(self.consumer_options)
        out["security"] = {f.name: getattr(self.security, f.name) for f in fields(KafkaSecurity)}
        return out

    def describe(self) -> dict[str, Any]:
        """The settings with secrets masked, for logs."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "security"}
        out["security"] = self.security.describe()
        return out
