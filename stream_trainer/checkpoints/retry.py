"""Retrying a store operation with exponential backoff (a small cousin of ``redis.retry.Retry``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from stream_trainer.errors import ConfigError, StoreUnavailableError

__all__ = ["ExponentialBackoff", "RetryPolicy"]

T = TypeVar("T")
logger = logging.getLogger("stream_trainer.checkpoints")


@dataclass(frozen=True)
class ExponentialBackoff:
    """Delay before retry ``n`` (1-based): ``min(cap_s, base_s * 2 ** (n - 1))`` seconds."""

    base_s: float = 0.05
    cap_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.base_s <= self.cap_s:
            msg = f"backoff needs 0 <= base_s <= cap_s, got {self.base_s!r} and {self.cap_s!r}"
            raise ConfigError(msg)

    def delay(self, failures: int) -> float:
        return min(self.cap_s, self.base_s * 2 ** (failures - 1))


class RetryPolicy:
    """Call an operation; on one of ``errors`` wait and try again, up to ``retries`` times.

    When the retries are spent, :class:`StoreUnavailableError` (retriable) is raised from the last
    error. With the defaults (8 retries, 0.05 s doubling, capped at 2 s) a store rides out about
    7 s of unavailability, e.g. a Redis restart. ``sleep`` is injected so tests need not wait.
    """

    def __init__(
        self,
        *,
        retries: int = 8,
        backoff: ExponentialBackoff | None = None,
        errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            msg = f"retries must be an int >= 0, got {retries!r}"
            raise ConfigError(msg)
        self.retries = retries
        self.backoff = ExponentialBackoff() if backoff is None else backoff
        self.errors = errors
        self._sleep = sleep

    def with_errors(self, errors: tuple[type[BaseException], ...]) -> RetryPolicy:
        """The same policy retrying on ``errors`` instead."""
        return RetryPolicy(
            retries=self.retries, backoff=self.backoff, errors=errors, sleep=self._sleep
        )

    def call(self, operation: Callable[[], T], *, what: str) -> T:
        failures = 0
        while True:
            try:
                return operation()
            except self.errors as exc:
                failures += 1
                if failures > self.retries:
                    msg = f"{what}: store unreachable after {failures} attempts ({exc})"
                    raise StoreUnavailableError(msg, retriable=True) from exc
                delay = self.backoff.delay(failures)
                logger.warning("%s failed (%s); retry %d in %.2f s", what, exc, failures, delay)
                self._sleep(delay)
