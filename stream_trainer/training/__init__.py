"""The incremental trainer, its configuration and its prequential metrics."""

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
