"""Retrying an operation with a pluggable backoff (the shape of redis-py's ``Retry``/``Backoff``).

A :class:`Retry` runs an operation up to ``1 + retries`` times. Between two attempts it sleeps
``backoff.compute(failures)`` seconds, where ``failures`` counts the failed attempts so far (1 after
the first failure). Only the exception types it is told about are retried; anything else propagates
at once. The sleeper is injected, so tests need no real sleeps.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

__all__ = [
    "Backoff",
    "ConstantBackoff",
    "ExponentialBackoff",
    "NoBackoff",
    "Retry",
]

T = TypeVar("T")


class Backoff(Protocol):
    """How long to wait after the ``failures``-th failed attempt (``failures >= 1``)."""

    def compute(self, failures: int) -> float: ...


class NoBackoff:
    """Retry at once."""

    def compute(self, failures: int) -> float:
        return 0.0


class ConstantBackoff:
    """Wait ``seconds`` after every failure."""

    def __init__(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        self.seconds = seconds

    def compute(self, failures: int) -> float:
        return self.seconds


class ExponentialBackoff:
    r"""Capped exponential backoff with optional "equal jitter".

    .. math:: d_n = \min(\text{cap}, \text{base} \cdot 2^{n-1})

    and with ``jitter=True`` the wait is drawn uniformly from :math:`[d_n/2, d_n]`, so that many
    clients restarted together do not reconnect in lockstep.
    """

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 10.0,
        *,
        jitter: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"need 0 < base <= cap, got base={base!r}, cap={cap!r}")
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()

    def compute(self, failures: int) -> float:
        delay: float = min(self.cap, self.base * 2 ** max(0, failures - 1))
        if self.jitter:
            return self._rng.uniform(delay / 2, delay)
        return delay


class Retry:
    """Run an operation, retrying the listed exceptions ``retries`` times with ``backoff``.

    Examples
    --------
    >>> calls = []
    >>> def flaky():
    ...     calls.append(1)
    ...     if len(calls) < 3:
    ...         raise ConnectionError("down")
    ...     return "up"
    >>> Retry(NoBackoff(), retries=5).call_with_retry(flaky)
    'up'
    >>> len(calls)
    3
    """

    def __init__(
        self,
        backoff: Backoff,
        retries: int,
        *,
        retry_on: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        self.backoff = backoff
        self.retries = retries
        self.retry_on = retry_on
        self._sleep = sleep

    def call_with_retry(
        self,
        operation: Callable[[], T],
        on_failure: Callable[[BaseException, int, float], None] | None = None,
    ) -> T:
        """Return ``operation()``; re-raise the last error once the retries are spent.

        ``on_failure(error, failures, delay_s)`` is called before each sleep (to log it).
        """
        failures = 0
        while True:
            try:
                return operation()
            except self.retry_on as exc:
                failures += 1
                if failures > self.retries:
                    raise
                delay = self.backoff.compute(failures)
                if on_failure is not None:
                    on_failure(exc, failures, delay)
                self._sleep(delay)
