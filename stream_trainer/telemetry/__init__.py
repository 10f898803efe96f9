"""Telemetry: Prometheus metrics on an injected registry, and the HTTP endpoint that serves them."""

from __future__ import annotations

from stream_trainer.telemetry.http import (
    DEFAULT_METRICS_ADDRESS,
    HealthState,
    MetricsServer,
    parse_metrics_address,
)
from stream_trainer.telemetry.metrics import DEAD_LETTER_REASONS, TASKS, ServiceMetrics

__all__ = [
    "DEAD_LETTER_REASONS",
    "DEFAULT_METRICS_ADDRESS",
    "TASKS",
    "HealthState",
    "MetricsServer",
    "ServiceMetrics",
    "parse_metrics_address",
]
