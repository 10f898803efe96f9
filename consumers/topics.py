"""Topic existence checks and creation (kafka-python ``KafkaAdminClient``)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from consumers.security import KafkaSecurity
from stream_trainer.errors import SourceError

__all__ = ["create_topic", "existing_topics"]


def _admin(bootstrap_servers: str | Sequence[str], security: KafkaSecurity) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(
            bootstrap_servers=bootstrap_servers,
            client_id="stream-trainer-admin",
            **security.client_configs(),
        )
    except KafkaError as exc:
        msg = f"cannot reach Kafka at {bootstrap_servers!r} to manage topics: {exc}"
        raise SourceError(msg, retriable=True) from exc


def existing_topics(
    bootstrap_servers: str | Sequence[str], security: KafkaSecurity | None = None
) -> set[str]:
    """Names of the topics the cluster has (internal ones included)."""
    admin = _admin(bootstrap_servers, security or KafkaSecurity())
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def create_topic(
    bootstrap_servers: str | Sequence[str],
    topic: str,
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    security: KafkaSecurity | None = None,
    exist_ok: bool = True,
) -> bool:
    """Create ``topic``; return False when it already existed (and ``exist_ok``).

    Returns once the broker has the topic's metadata, so a producer can send to it at once.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions!r}")
    admin = _admin(bootstrap_servers, security or KafkaSecurity())
    try:
        admin.create_topics(
            {topic: {"num_partitions": partitions, "replication_factor": replication_factor}},
            wait_for_metadata=True,
        )
        return True
    except TopicAlreadyExistsError:
        if not exist_ok:
            raise SourceError(f"topic {topic!r} already exists") from None
        return False
    except KafkaError as exc:
        raise SourceError(
            f"cannot create topic {topic!r} ({partitions} partitions): {exc}",
            retriable=exc.retriable,
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            admin.close()
