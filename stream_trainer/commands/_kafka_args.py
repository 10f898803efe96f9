"""The Kafka client flags that ``run``, ``record`` and ``replay`` share, and the one way they are
read: the ``[kafka]`` table of ``--config`` < ``STREAM_TRAINER_KAFKA__*`` < ``--kafka-option``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["KAFKA_OPTION_HELP", "add_kafka_arguments", "kafka_client_settings", "kafka_flags"]

KAFKA_OPTION_HELP = (
    "a Kafka setting, repeatable: KEY=VALUE sets [kafka] KEY (source and security settings: "
    "security_protocol, sasl_mechanism, sasl_plain_username, ssl_cafile, "
    "sasl_oauth_token_provider=MODULE:CALLABLE, session_timeout_ms, wait_for_topic_s...); "
    "consumer.KEY=VALUE and producer.KEY=VALUE pass any kafka-python KafkaConsumer / "
    "KafkaProducer setting through ([kafka.consumer] / [kafka.producer]; e.g. "
    "consumer.isolation_level=read_committed, producer.compression_type=gzip); values are "
    "parsed as the setting's type; keys the service sets itself (group_id, enable_auto_commit, "
    "bootstrap_servers, acks...) are refused with the setting that controls them"
)


def add_kafka_arguments(parser: argparse.ArgumentParser, *, config_file: bool) -> None:
    """``--kafka-option`` (and, with ``config_file``, ``--config`` for its ``[kafka]`` table)."""
    if config_file:
        parser.add_argument(
            "--config",
            type=Path,
            help="TOML file of `run`: its [kafka] table (security, [kafka.consumer], "
            "[kafka.producer]) applies here too",
        )
    parser.add_argument(
        "--kafka-option",
        dest="kafka_option",
        action="append",
        metavar="KEY=VALUE",
        help=KAFKA_OPTION_HELP,
    )


def kafka_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ``[kafka]`` keys given as ``--kafka-option``."""
    from stream_trainer.service.config import parse_kafka_options

    return parse_kafka_options(getattr(args, "kafka_option", None) or [])


def kafka_client_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Any:
    """The :class:`consumers.client_options.KafkaClientSettings` of ``record`` / ``replay``: the
    same ``[kafka]`` settings, read the same way, as ``run`` (the whole file and environment are
    validated as ``run`` validates them)."""
    from consumers.client_options import KafkaClientSettings
    from stream_trainer.service import load_service_config

    config = load_service_config(
        config_file=args.config,
        kafka_flags=kafka_flags(args),
        environ=os.environ if environ is None else environ,
    )
    return KafkaClientSettings.from_kafka_table(config.kafka)
