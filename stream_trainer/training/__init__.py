"""The incremental trainer, its configuration and its prequential metrics.

The names below load on first use, so that :mod:`stream_trainer.training.config` (what the command
line needs to build its parser) comes without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stream_trainer._lazy import lazy_getattr

if TYPE_CHECKING:
    from stream_trainer.training.config import TrainerConfig
    from stream_trainer.training.metrics import ClassificationMetrics, RegressionMetrics
    from stream_trainer.training.trainer import IncrementalTrainer, StepReport

__all__ = [
    "ClassificationMetrics",
    "IncrementalTrainer",
    "RegressionMetrics",
    "StepReport",
    "TrainerConfig",
]

_HOMES = {
    "TrainerConfig": "stream_trainer.training.config",
    "ClassificationMetrics": "stream_trainer.training.metrics",
    "RegressionMetrics": "stream_trainer.training.metrics",
    "IncrementalTrainer": "stream_trainer.training.trainer",
    "StepReport": "stream_trainer.training.trainer",
}


__getattr__ = lazy_getattr(__name__, _HOMES)
