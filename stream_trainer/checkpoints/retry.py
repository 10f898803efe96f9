"""Retrying a store operation: :class:`stream_trainer.retry.Retry` plus the store's error contract.

When the retries are spent, :class:`StoreUnavailableError` (retriable) is raised from the last
error. With the defaults (8 retries, 0.05 s doubling, capped at 2 s, no jitter) a store rides out
about 7 s of unavailability, e.g. a Redis restart. ``sleep`` is injected so tests need not wait.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from stream_trainer.errors import ConfigError, StoreUnavailableError
from stream_trainer.retry import Backoff, ExponentialBackoff, Retry

__all__ = ["ExponentialBackoff", "RetryPolicy"]

T = TypeVar("T")
logger = logging.getLogger("stream_trainer.checkpoints")


class RetryPolicy:
    """Call an operation; on one of ``errors`` wait and try again, up to ``retries`` times."""

    def __init__(
        self,
        *,
        retries: int = 8,
        backoff: Backoff | None = None,
        errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            msg = f"retries must be an int >= 0, got {retries!r}"
            raise ConfigError(msg)
        self.retries = retries
        self.backoff = ExponentialBackoff(0.05, 2.0, jitter=False) if backoff is None else backoff
        self.errors = errors
        self._sleep = sleep
        self._retry = Retry(self.backoff, retries, retry_on=errors, sleep=sleep)

    def with_errors(self, errors: tuple[type[BaseException], ...]) -> RetryPolicy:
        """The same policy retrying on ``errors`` instead."""
        return RetryPolicy(
            retries=self.retries, backoff=self.backoff, errors=errors, sleep=self._sleep
        )

    def call(self, operation: Callable[[], T], *, what: str) -> T:
        def on_failure(exc: BaseException, failures: int, delay: float) -> None:
            logger.warning("%s failed (%s); retry %d in %.2f s", what, exc, failures, delay)

        try:
            return self._retry.call_with_retry(operation, on_failure)
        except self.errors as exc:
            msg = f"{what}: store unreachable after {self.retries + 1} attempts ({exc})"
            raise StoreUnavailableError(msg, retriable=True) from exc
