"""The step engine: the fast form of the training step, beside the autograd reference.

:class:`StepEngine` is what the trainer asks of it; :class:`~stream_trainer.engine.compiled.
CompiledEngine` is the one implementation (compiled kernels over ``K`` stacked members), chosen
once from the configuration (``engine = "auto"``: where it covers the model; ``"torch"``: never).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["StepEngine"]


class StepEngine(Protocol):
    """Serve and train the stacked members of a model in a few calls."""

    members: int

    def current(self) -> bool:
        """Whether the models still have the memory layout the engine was built on."""
        ...

    def applies(self, x: np.ndarray) -> bool:
        """Whether the engine can take the input ``x``."""
        ...

    def serve(self, x: np.ndarray) -> np.ndarray:
        """Eval-mode outputs of every member, ``(K, N, C)``; updates nothing."""
        ...

    def learn(
        self, x: np.ndarray, target: np.ndarray, *, regression: bool, max_norm: float | None
    ) -> np.ndarray:
        """One optimizer step of every member; the members' losses ``(K,)``."""
        ...
