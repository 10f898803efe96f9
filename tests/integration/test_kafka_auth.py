"""Kafka credentials against a real broker with a SASL/PLAIN listener: a wrong password fails at
once with its own, non-retriable error (not as an unreachable broker, retried), and the right one
reads the topic.

The broker answers a failed authentication with an error response and closes the connection;
kafka-python 3.0 lost that answer (:mod:`consumers.kafka_client_fix`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from consumers import KafkaRecordSource, KafkaSecurity, KafkaSourceConfig, ProcessKafkaSource
from stream_trainer.errors import SourceError
from tests.fixtures import service_unavailable
from tests.fixtures.kafka import create_topic, load_broker, produce_messages

pytestmark = pytest.mark.integration

USER, PASSWORD = "trainer", "right-password"


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A broker of this module's own with a PLAINTEXT and a SASL_PLAINTEXT listener."""
    broker_mod = load_broker()
    if broker_mod.missing_tools():
        service_unavailable("kafka", "java or mvn missing")
    broker = broker_mod.KafkaBroker(
        tmp_path_factory.mktemp("kafka-sasl"), sasl_users={USER: PASSWORD}
    )
    try:
        broker.start()
    except broker_mod.BrokerError as exc:
        service_unavailable("kafka", f"{exc}\n{exc.log_tail}")
    try:
        yield broker
    finally:
        broker.stop(timeout_s=5.0)


def _config(broker: Any, topic: str, password: str, *, child: bool) -> KafkaSourceConfig:
    return KafkaSourceConfig(
        bootstrap_servers=broker.sasl_bootstrap,
        topics=topic,
        group_id=f"{topic}-{password}-{child}",
        max_wait_ms=50,
        consumer_process=child,
        security=KafkaSecurity(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",
            sasl_plain_username=USER,
            sasl_plain_password=password,
        ),
    )


@pytest.mark.parametrize("source_class", [KafkaRecordSource, ProcessKafkaSource])
def test_a_wrong_password_fails_at_once_and_is_not_retriable(
    sasl_broker: Any, source_class: type
) -> None:
    topic = create_topic(sasl_broker.bootstrap, f"auth-wrong-{source_class.__name__}")
    started = time.monotonic()
    with pytest.raises(SourceError, match="Authentication failed") as failed:
        source_class(_config(sasl_broker, topic, "wrong-password", child=True))
    elapsed = time.monotonic() - started
    print(f"wrong password refused in {elapsed:.2f} s ({source_class.__name__})")
    assert failed.value.retriable is False
    assert "not reachable" not in str(failed.value)
    assert "wrong-password" not in str(failed.value)  # the secret stays out of the message
    # One attempt, no back-off: the connect retries alone would take seconds (and the
    # bootstrap, retried until its deadline, the connect timeout each).
    assert elapsed < 4.0, elapsed


def test_the_right_password_reads_the_topic(sasl_broker: Any) -> None:
    topic = create_topic(sasl_broker.bootstrap, "auth-right")
    values = [json.dumps({"x": float(i), "y": i % 2}).encode() for i in range(20)]
    produce_messages(sasl_broker.bootstrap, topic, ((0, None, v) for v in values))
    source = KafkaRecordSource(_config(sasl_broker, topic, PASSWORD, child=False))
    try:
        read = 0
        deadline = time.monotonic() + 30
        while read < len(values):
            assert time.monotonic() < deadline, f"read {read} of {len(values)}"
            read += len(source.poll_batch().records)
    finally:
        source.close()
