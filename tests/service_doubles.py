"""Test stand-ins for a service process dying, being asked to stop or getting stuck, after a given
batch."""

from __future__ import annotations

import threading
from typing import Any

from stream_trainer.service import TrainerService


class Crash(Exception):
    """Stands for the process dying: no final checkpoint, nothing flushed after it."""


class CrashingService(TrainerService):
    """Dies after its ``crash_after``-th batch (a test stand-in for ``kill -9``)."""

    def __init__(self, *args: Any, crash_after: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crash_after = crash_after
        self.batches = 0

    def _handle(self, batch: Any) -> None:
        super()._handle(batch)
        self.batches += 1
        if self.batches == self.crash_after:
            raise Crash


class StoppingService(TrainerService):
    """Asks itself to stop after its ``stop_after``-th batch, as SIGTERM would."""

    def __init__(self, *args: Any, stop_after: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_after = stop_after
        self.batches = 0

    def _handle(self, batch: Any) -> None:
        super()._handle(batch)
        self.batches += 1
        if self.batches == self.stop_after:
            self.request_stop()


class PausingService(TrainerService):
    """Stops inside its ``pause_after``-th batch (after the step, outside the model lock)
    until ``resume`` is set: the model is frozen and the loop makes no progress."""

    def __init__(self, *args: Any, pause_after: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pause_after = pause_after
        self.batches = 0
        self.paused = threading.Event()
        self.resume = threading.Event()

    def _handle(self, batch: Any) -> None:
        super()._handle(batch)
        self.batches += 1
        if self.batches == self.pause_after:
            self.paused.set()
            self.resume.wait(timeout=60)
