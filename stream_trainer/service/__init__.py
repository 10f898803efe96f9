"""The long-lived service behind ``stream-trainer run`` (:mod:`stream_trainer.service.runner`)."""

from stream_trainer.service.config import ServiceConfig, load_service_config
from stream_trainer.service.runner import TrainerService

__all__ = ["ServiceConfig", "TrainerService", "load_service_config"]
