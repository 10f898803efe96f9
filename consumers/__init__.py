"""Kafka I/O for stream-trainer (kafka-python): record source, dead letters, replay, recording.

- :mod:`consumers.kafka_source`: :class:`KafkaRecordSource`; its settings,
  :class:`KafkaSourceConfig`, in :mod:`consumers.kafka_config`;
- :mod:`consumers.process.source`: :class:`ProcessKafkaSource`, the same source with its consumer
  in a child process (:mod:`consumers.process.child`, frames in :mod:`consumers.process.frames`),
  and :func:`open_kafka_source`, which opens the one a config asks for;
- :mod:`consumers.dead_letter`: :class:`DeadLetterSink`;
- :mod:`consumers.producer`: producing recordings and file sources (``stream-trainer replay``);
- :mod:`consumers.recorder`: capturing a topic (``stream-trainer record``);
- :mod:`consumers.deserializer`, :mod:`consumers.security`, :mod:`consumers.retry`,
  :mod:`consumers.topics`: the pieces they share; :mod:`consumers.kafka_client_fix`: a fix to
  kafka-python's transport, applied on import.
"""

from __future__ import annotations

# First: fixes kafka-python's transport before any client is built (the module says what and why).
from consumers import kafka_client_fix  # noqa: F401
from consumers.dead_letter import DeadLetterSink, dead_letter_topic
from consumers.deserializer import RecordDecoder
from consumers.kafka_config import KafkaSourceConfig
from consumers.kafka_source import (
    KafkaRecordSource,
    SourceBatch,
    parse_partition_key,
    partition_key,
)
from consumers.process.source import ProcessKafkaSource, open_kafka_source
from consumers.retry import ConstantBackoff, ExponentialBackoff, NoBackoff, Retry
from consumers.security import KafkaSecurity

__all__ = [
    "ConstantBackoff",
    "DeadLetterSink",
    "ExponentialBackoff",
    "KafkaRecordSource",
    "KafkaSecurity",
    "KafkaSourceConfig",
    "NoBackoff",
    "ProcessKafkaSource",
    "RecordDecoder",
    "Retry",
    "SourceBatch",
    "dead_letter_topic",
    "open_kafka_source",
    "parse_partition_key",
    "partition_key",
]
