"""Open Kafka settings: any kafka-python consumer/producer key passes through, checked against
kafka-python's own keys, parsed to its type; the keys the service manages and the shared security
settings are refused in the pass-through tables; OAUTHBEARER needs a token provider."""

from __future__ import annotations

import argparse

import pytest
from kafka.consumer import KafkaConsumer
from kafka.producer import KafkaProducer

from consumers import KafkaSourceConfig
from consumers.client_options import (
    MANAGED_CONSUMER_KEYS,
    MANAGED_PRODUCER_KEYS,
    KafkaClientSettings,
)
from consumers.producer import looped
from consumers.security import KafkaSecurity, load_token_provider
from stream_trainer.cli import build_parser
from stream_trainer.commands._kafka_args import kafka_client_settings
from stream_trainer.commands.run import service_config
from stream_trainer.errors import ConfigError
from stream_trainer.service.config import load_service_config, parse_kafka_options
from stream_trainer.sources.recording import RecordingEntry
from tests.kafka_token_provider import UnsecuredTokenProvider

PROVIDER = "tests.kafka_token_provider:UnsecuredTokenProvider"


# -- pass-through keys ---------------------------------------------------------------------------


def test_text_values_become_the_type_kafka_python_expects():
    parsed = parse_kafka_options(
        [
            "consumer.fetch_max_bytes=1048576",
            "consumer.isolation_level=read_committed",
            "consumer.enable_incremental_fetch_sessions=false",
            "consumer.client_rack=rack-1",
            "producer.compression_type=gzip",
            "producer.retries=5",
            "producer.enable_idempotence=true",
            "session_timeout_ms=12000",
            "wait_for_topic_s=2.5",
        ]
    )
    assert parsed == {
        "consumer": {
            "fetch_max_bytes": 1048576,
            "isolation_level": "read_committed",
            "enable_incremental_fetch_sessions": False,
            "client_rack": "rack-1",
        },
        "producer": {"compression_type": "gzip", "retries": 5.0, "enable_idempotence": True},
        "session_timeout_ms": 12000,
        "wait_for_topic_s": 2.5,
    }


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("consumer.fetch_max_byte=1", r"consumer setting; did you mean fetch_max_bytes"),
        ("producer.lingerms=1", r"not a kafka-python producer setting; did you mean linger_ms"),
        ("consumer.fetch_max_bytes=lots", r"fetch_max_bytes must be int, got 'lots'"),
        ("consumer.check_crcs=yes", r"check_crcs cannot be set there; it comes from \[kafka\]"),
        ("consumer.group_id=other", r"group_id cannot be set there; it comes from group"),
        ("consumer.enable_auto_commit=true", r"enable_auto_commit cannot be set there"),
        ("consumer.value_deserializer=x", r"value_deserializer cannot be set there"),
        ("producer.acks=1", r"acks cannot be set there; .*never lost"),
        ("consumer.sasl_mechanism=PLAIN", r"set it in \[kafka\]"),
        ("producer.ssl_cafile=/ca.pem", r"set it in \[kafka\]"),
        ("producer.partitioner=x", r"partitioner takes a Python object"),
        ("consumer.socket_options=x", r"socket_options takes a Python object"),
        ("isolation_level=read_committed", r"kafka-python setting: consumer.isolation_level"),
        ("sesion_timeout_ms=1", r"did you mean session_timeout_ms"),
        ("group_id=g", r"group_id cannot be set there \(group_id comes from group\)"),
        ("consumer", r"takes KEY=VALUE"),
        ("consumer=1", r"consumer.KEY / producer.KEY"),
    ],
)  # fmt: skip
def test_wrong_options_are_refused_with_a_reason(option, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_kafka_options([option])


def test_managed_keys_are_real_kafka_python_keys():
    """A managed key that kafka-python renamed would silently stop being guarded."""
    assert set(MANAGED_CONSUMER_KEYS) <= set(KafkaConsumer.DEFAULT_CONFIG)
    assert set(MANAGED_PRODUCER_KEYS) <= set(KafkaProducer.DEFAULT_CONFIG)


def test_every_key_the_source_sets_is_managed_or_security():
    configs = KafkaSourceConfig(bootstrap_servers="h:1", topics="t").consumer_configs()
    for key in configs:
        assert key in MANAGED_CONSUMER_KEYS or key.startswith(("security_", "sasl_", "ssl_")), key


def test_typed_toml_values_are_checked(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[kafka.consumer]\nfetch_max_bytes = "1"\n')
    with pytest.raises(ConfigError, match=r"\[kafka\] of .* consumer: fetch_max_bytes must be int"):
        load_service_config(config_file=path, environ={})
    path.write_text("[kafka.producer]\nlinger_ms = 1.5\n")
    with pytest.raises(ConfigError, match=r"linger_ms must be int, got 1.5"):
        load_service_config(config_file=path, environ={})


def test_toml_environment_and_flags_merge_key_by_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        "source = 'kafka://127.0.0.1:9092/t'\n"
        "[kafka.consumer]\nfetch_max_bytes = 1000\nisolation_level = 'read_uncommitted'\n"
        "[kafka.producer]\nlinger_ms = 20\n"
    )
    environ = {"STREAM_TRAINER_KAFKA__CONSUMER": '{"isolation_level": "read_committed"}'}
    args = build_parser().parse_args(
        ["run", "--config", str(path), "--kafka-option", "consumer.fetch_min_bytes=10"]
    )
    config = service_config(args, environ=environ)
    assert config.kafka["consumer"] == {
        "fetch_max_bytes": 1000,
        "isolation_level": "read_committed",
        "fetch_min_bytes": 10,
    }
    assert config.kafka["producer"] == {"linger_ms": 20}
    source = KafkaSourceConfig.from_mapping(
        {"bootstrap_servers": "h:1", "topics": "t", "consumer": config.kafka["consumer"]}
    )
    built = source.consumer_configs()
    assert (built["fetch_max_bytes"], built["fetch_min_bytes"]) == (1000, 10)
    assert built["isolation_level"] == "read_committed"
    # The child consumer process gets the settings through to_mapping/from_mapping.
    assert KafkaSourceConfig.from_mapping(source.to_mapping()) == source


def test_wait_for_topic_flag_is_a_kafka_setting():
    args = build_parser().parse_args(
        ["run", "--source", "kafka://127.0.0.1:9092/t", "--wait-for-topic", "30"]
    )
    assert service_config(args, environ={}).kafka == {"wait_for_topic_s": 30.0}
    with pytest.raises(ConfigError, match="wait_for_topic_s must be a number >= 0"):
        KafkaSourceConfig(bootstrap_servers="h:1", topics="t", wait_for_topic_s=-1)


# -- one security configuration for run, record and replay --------------------------------------


def test_record_and_replay_read_the_security_settings_as_run_does(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        "[kafka]\nsecurity_protocol = 'SASL_PLAINTEXT'\nsasl_mechanism = 'PLAIN'\n"
        "sasl_plain_username = 'trainer'\n[kafka.producer]\ncompression_type = 'gzip'\n"
    )
    environ = {"STREAM_TRAINER_KAFKA__SASL_PLAIN_PASSWORD": "s3cret"}
    for command in (
        ["record", "--bootstrap", "h:1", "--topic", "t", "--out", "o.jsonl"],
        ["replay", "river:Phishing", "--bootstrap", "h:1", "--topic", "t"],
    ):
        argv = [*command, "--config", str(path), "--kafka-option", "consumer.check_crcs=true"]
        with pytest.raises(ConfigError, match="check_crcs cannot be set there"):
            kafka_client_settings(build_parser().parse_args(argv), environ)
        argv[-1] = "consumer.isolation_level=read_committed"
        settings = kafka_client_settings(build_parser().parse_args(argv), environ)
        assert settings.security == KafkaSecurity(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",
            sasl_plain_username="trainer",
            sasl_plain_password="s3cret",
        )
        assert settings.consumer == {"isolation_level": "read_committed"}
        assert settings.producer == {"compression_type": "gzip"}
    with pytest.raises(ConfigError, match="needs sasl_plain_username and sasl_plain_password"):
        kafka_client_settings(argparse.Namespace(config=path, kafka_option=None), {})


def test_nested_security_table_is_read_like_flat_keys():
    nested = KafkaClientSettings.from_kafka_table(
        {"security": {"security_protocol": "SSL", "ssl_cafile": "/ca.pem"}}
    )
    flat = KafkaClientSettings.from_kafka_table(
        {"security_protocol": "SSL", "ssl_cafile": "/ca.pem"}
    )
    assert nested == flat
    assert nested.security.client_configs()["ssl_cafile"] == "/ca.pem"


def test_kerberos_settings_reach_only_gssapi_clients():
    gssapi = KafkaSecurity(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="GSSAPI",
        sasl_kerberos_service_name="kafka-prod",
        sasl_kerberos_domain_name="example.org",
    )
    configs = gssapi.client_configs()
    assert configs["sasl_kerberos_service_name"] == "kafka-prod"
    assert configs["sasl_kerberos_domain_name"] == "example.org"
    assert "sasl_kerberos_service_name" not in KafkaSecurity().client_configs()


# -- OAUTHBEARER -------------------------------------------------------------------------------


def test_oauthbearer_without_a_token_provider_is_refused_at_config_time():
    with pytest.raises(ConfigError, match="OAUTHBEARER' needs sasl_oauth_token_provider"):
        KafkaSecurity(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER")
    with pytest.raises(ConfigError, match="OAUTHBEARER' needs sasl_oauth_token_provider"):
        load_service_config(
            kafka_flags=parse_kafka_options(
                ["security_protocol=SASL_SSL", "sasl_mechanism=OAUTHBEARER"]
            ),
            environ={},
        )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tests.kafka_token_provider", r"must look like 'package.module:callable'"),
        ("tests.no_such_module:P", r"cannot import"),
        ("tests.kafka_token_provider:Missing", r"has no 'Missing'"),
        ("tests.kafka_token_provider:SUBJECT", r"is not callable"),
    ],
)
def test_a_token_provider_that_cannot_be_loaded_is_refused_at_config_time(spec, expected):
    with pytest.raises(ConfigError, match=expected):
        KafkaSecurity(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="OAUTHBEARER",
            sasl_oauth_token_provider=spec,
        )


def test_a_token_provider_reaches_the_clients_as_an_object():
    security = KafkaSecurity(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="OAUTHBEARER",
        sasl_oauth_token_provider=PROVIDER,
    )
    provider = security.client_configs()["sasl_oauth_token_provider"]
    assert isinstance(provider, UnsecuredTokenProvider)
    assert provider.token().count(".") == 2
    with pytest.raises(ConfigError, match=r"returned a object, not a kafka\.net\.sasl\.oauth"):
        load_token_provider("tests.kafka_token_provider:NotAProvider")
    with pytest.raises(ConfigError, match="is for sasl_mechanism='OAUTHBEARER'"):
        KafkaSecurity(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",
            sasl_plain_username="u",
            sasl_plain_password="p",
            sasl_oauth_token_provider=PROVIDER,
        )


# -- replay --loop --------------------------------------------------------------------------------


def _entry(offset: int, ts: int) -> RecordingEntry:
    return RecordingEntry("t", 0, offset, ts, None, b"{}")


def test_looped_recordings_keep_moving_forward_in_time():
    entries = [_entry(0, 1000), _entry(1, 1100), _entry(2, 1300)]
    out = list(looped(lambda: entries, passes=3))
    # period = span (300) + mean gap (150)
    assert [e.timestamp_ms for e in out] == [1000, 1100, 1300, 1450, 1550, 1750, 1900, 2000, 2200]
    assert [e.offset for e in out] == [0, 1, 2] * 3


def test_looped_stops_on_an_empty_pass_and_refuses_zero_passes():
    assert list(looped(lambda: [], passes=None)) == []
    with pytest.raises(ConfigError, match="passes must be >= 1"):
        list(looped(lambda: [1], passes=0))
    calls = iter(range(100))
    stream = looped(lambda: [next(calls)])
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]


def test_replay_loop_refuses_to_flood(capsys):
    from stream_trainer.cli import main

    argv = ["replay", "river:Phishing", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--loop"]
    assert main(argv) != 0
    assert "--loop needs a steady pace" in capsys.readouterr().err
