"""Kafka credentials against a real broker with a SASL listener: a wrong password fails at
once with its own, non-retriable error (not as an unreachable broker, retried), and the right one
reads the topic; ``replay`` and ``record`` reach it with the security settings of ``run``; an
OAUTHBEARER token provider named in the settings authenticates.

The broker answers a failed authentication with an error response and closes the connection;
kafka-python 3.0 lost that answer (:mod:`consumers.kafka_client_fix`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from consumers import KafkaRecordSource, KafkaSecurity, KafkaSourceConfig, ProcessKafkaSource
from stream_trainer.errors import SourceError
from stream_trainer.sources.recording import read_recording
from tests.fixtures.kafka import create_topic, own_broker, produce_messages

pytestmark = pytest.mark.integration

USER, PASSWORD = "trainer", "right-password"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A broker of this module's own with a PLAINTEXT and a SASL_PLAINTEXT listener."""
    with own_broker(tmp_path_factory.mktemp("kafka-sasl"), sasl_users={USER: PASSWORD}) as broker:
        yield broker


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


def _cli(*argv: str, env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_TRAINER_")}
    return subprocess.run(
        [sys.executable, "-m", "stream_trainer", *argv],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_replay_and_record_reach_a_sasl_cluster_with_the_settings_of_run(
    sasl_broker: Any, tmp_path: Path
) -> None:
    """Security from the TOML file's [kafka] table, the password from the environment, a
    pass-through setting from --kafka-option: replay 200 records in, record them back."""
    topic = create_topic(sasl_broker.bootstrap, "auth-replay-record")
    config = tmp_path / "kafka.toml"
    config.write_text(
        "[kafka]\nsecurity_protocol = 'SASL_PLAINTEXT'\nsasl_mechanism = 'PLAIN'\n"
        f"sasl_plain_username = '{USER}'\n[kafka.producer]\ncompression_type = 'gzip'\n"
    )
    secret = {"STREAM_TRAINER_KAFKA__SASL_PLAIN_PASSWORD": PASSWORD}
    common = ["--bootstrap", sasl_broker.sasl_bootstrap, "--topic", topic, "--config", str(config)]
    replayed = _cli(
        "replay", "synth:agrawal?seed=3&n=200", *common, "--max-speed", "--no-progress",
        env=secret,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    assert "replayed 200 message(s)" in replayed.stderr
    out = tmp_path / "back.jsonl"
    recorded = _cli(
        "record", *common, "--out", str(out), "--from-beginning", "--until-end", "--no-progress",
        "--kafka-option", "consumer.isolation_level=read_committed",
        env=secret,
    )  # fmt: skip
    assert recorded.returncode == 0, recorded.stderr[-2000:]
    assert "recorded 200 message(s)" in recorded.stderr
    entries = list(read_recording(out))
    assert [e.offset for e in entries] == list(range(200))
    assert all(json.loads(e.value or b"")["class"] in (0, 1) for e in entries)

    # The same commands with a wrong password fail with the broker's refusal, secret unshown.
    wrong = {"STREAM_TRAINER_KAFKA__SASL_PLAIN_PASSWORD": "wrong-password"}
    failed = _cli("record", *common, "--out", str(tmp_path / "x.jsonl"), "--until-end", env=wrong)
    assert failed.returncode != 0
    assert "Authentication failed" in failed.stderr, failed.stderr[-2000:]
    assert "wrong-password" not in failed.stderr


def _oauth_security(provider: str) -> KafkaSecurity:
    return KafkaSecurity(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="OAUTHBEARER",
        sasl_oauth_token_provider=f"tests.kafka_token_provider:{provider}",
    )


def test_oauthbearer_refuses_an_expired_token(sasl_broker: Any) -> None:
    topic = create_topic(sasl_broker.bootstrap, "auth-oauth-expired")
    config = KafkaSourceConfig(
        bootstrap_servers=sasl_broker.sasl_bootstrap,
        topics=topic,
        group_id=f"{topic}-g",
        consumer_process=False,
        security=_oauth_security("ExpiredTokenProvider"),
    )
    with pytest.raises(SourceError, match=r"SaslAuthenticationFailed.*invalid_token") as failed:
        KafkaRecordSource(config)
    assert failed.value.retriable is False


def test_oauthbearer_with_a_token_provider_reads_the_topic(sasl_broker: Any) -> None:
    topic = create_topic(sasl_broker.bootstrap, "auth-oauth")
    values = [json.dumps({"x": float(i), "y": i % 2}).encode() for i in range(20)]
    produce_messages(sasl_broker.bootstrap, topic, ((0, None, v) for v in values))
    config = KafkaSourceConfig(
        bootstrap_servers=sasl_broker.sasl_bootstrap,
        topics=topic,
        group_id=f"{topic}-g",
        max_wait_ms=50,
        security=_oauth_security("UnsecuredTokenProvider"),
    )
    # The child consumer process builds its own provider from the setting's name.
    with ProcessKafkaSource(config) as source:
        read = 0
        deadline = time.monotonic() + 30
        while read < len(values):
            assert time.monotonic() < deadline, f"read {read} of {len(values)}"
            read += len(source.poll_batch().records)
