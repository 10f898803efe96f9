"""Re-export of :mod:`stream_trainer.retry` (the one retry implementation), for Kafka callers."""

from stream_trainer.retry import Backoff, ConstantBackoff, ExponentialBackoff, NoBackoff, Retry

__all__ = ["Backoff", "ConstantBackoff", "ExponentialBackoff", "NoBackoff", "Retry"]
