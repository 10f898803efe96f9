"""The long-lived service behind ``stream-trainer run`` (:mod:`stream_trainer.service.runner`).

The names below load on first use: the Kafka consumer process imports
:mod:`stream_trainer.service.logs` from here and must not pay for torch, which the runner needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stream_trainer._lazy import lazy_getattr

if TYPE_CHECKING:
    from stream_trainer.service.config import ServiceConfig, load_service_config
    from stream_trainer.service.runner import TrainerService

__all__ = ["ServiceConfig", "TrainerService", "load_service_config"]

_HOMES = {
    "ServiceConfig": "stream_trainer.service.config",
    "load_service_config": "stream_trainer.service.config",
    "TrainerService": "stream_trainer.service.runner",
}


__getattr__ = lazy_getattr(__name__, _HOMES)
