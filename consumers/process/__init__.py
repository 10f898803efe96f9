"""The Kafka consumer in a child process: the transport between it and the service.

- :mod:`consumers.process.source`: :class:`ProcessKafkaSource`, the service's side (a
  :class:`~stream_trainer.sources.protocol.BatchSource`), and :func:`open_kafka_source`;
- :mod:`consumers.process.child`: the child, ``python -m consumers.process.child``;
- :mod:`consumers.process.frames`: the frames on the pipes between them (no pickle).
"""

from __future__ import annotations

from consumers.process.source import ProcessKafkaSource, open_kafka_source

__all__ = ["ProcessKafkaSource", "open_kafka_source"]
