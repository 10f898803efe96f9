"""``stream-trainer run``: the service. Learns from Kafka (``--source kafka://HOST:PORT/TOPIC``) or
from a file, recording or bundled dataset (the embedded default: river's Phishing, local
checkpoints, metrics on 127.0.0.1:9100).

Settings come from ``--config FILE.toml`` < ``STREAM_TRAINER_*`` environment variables < flags.
Each setting below is also a TOML key and an environment variable of the same name
(``--max-wait-ms`` is ``max_wait_ms`` and ``STREAM_TRAINER_MAX_WAIT_MS``); the learner's are in
``[trainer]`` and ``STREAM_TRAINER_TRAINER__<KEY>``, the Kafka clients' in ``[kafka]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stream_trainer.commands._kafka_args import add_kafka_arguments, kafka_flags
from stream_trainer.commands._learner_args import (
    add_learner_arguments,
    add_limit_arguments,
    given_norm_options,
    norm_options_from,
)
from stream_trainer.errors import ConfigError
from stream_trainer.service.config import ServiceConfig
from stream_trainer.service.settings import add_setting_arguments
from stream_trainer.training.config import TrainerConfig, with_members_for_explicit_momentum

__all__ = ["register", "service_config"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="run the training service", description=__doc__)
    p.add_argument("--config", type=Path, help="TOML file with the settings")
    add_setting_arguments(p, ServiceConfig)
    p.add_argument(
        "--wait-for-topic",
        dest="wait_for_topic",
        type=float,
        metavar="SECONDS",
        help="Kafka: wait up to this long for a missing topic to be created, logging every few "
        "seconds, instead of failing at once ([kafka] wait_for_topic_s; default 0)",
    )
    add_kafka_arguments(p, config_file=False)
    add_learner_arguments(p)
    add_limit_arguments(p)
    # Only flags actually given may override the file and the environment.
    for action in p._actions:
        if action.dest not in ("help", "config"):
            action.default = argparse.SUPPRESS
    p.set_defaults(func=run_service)


def _trainer_keys() -> list[str]:
    """The learner flags' destinations: the :class:`TrainerConfig` field each one sets."""
    return [f.name for f in dataclasses.fields(TrainerConfig) if f.name != "target"]


def _split(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    kafka = kafka_flags(args)
    given.pop("kafka_option", None)
    if "wait_for_topic" in given:
        kafka["wait_for_topic_s"] = given.pop("wait_for_topic")
    model = given.pop("model", "mlp")
    if model != "mlp":
        raise ConfigError(f"run trains the MLP; river baselines ({model!r}) are for `evaluate`")
    trainer = {key: given.pop(key) for key in _trainer_keys() if key in given}
    if "norm_options" in trainer:
        items = trainer["norm_options"]
        given_options = {**trainer, "norm_options": given_norm_options(items)}
        trainer = with_members_for_explicit_momentum(given_options)
        trainer["norm_options"] = norm_options_from(items)
    if "features" in trainer and isinstance(trainer["features"], str):
        trainer["features"] = tuple(f.strip() for f in trainer["features"].split(",") if f.strip())
    if trainer.get("grad_clip") == 0:
        trainer["grad_clip"] = None
    if "target" in given:
        trainer["target"] = given["target"]
    return given, trainer, kafka


def service_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Any:
    """The :class:`~stream_trainer.service.ServiceConfig` of parsed ``run`` arguments: the
    ``--config`` file < ``environ`` (default ``os.environ``) < the flags given."""
    from stream_trainer.service import load_service_config

    flags, trainer_flags, kafka = _split(args)
    return load_service_config(
        config_file=args.config,
        flags=flags,
        trainer_flags=trainer_flags,
        kafka_flags=kafka,
        environ=environ,
    )


def run_service(args: argparse.Namespace) -> int:
    from stream_trainer.service import TrainerService
    from stream_trainer.service.logs import configure_logging

    config = service_config(args)
    configure_logging(config.log_format, config.log_level)
    from stream_trainer.distributed import world_from_env

    world = world_from_env()
    if world.distributed:  # torchrun: one replica of a data-parallel group
        from stream_trainer.distributed.service import DistributedTrainerService

        if config.delayed_labels:
            raise ConfigError("delayed labels (--labels-source) run in one process, not torchrun")
        service: TrainerService = DistributedTrainerService.join(config, world)
    else:
        service = TrainerService(config)
    service.install_signal_handlers()
    report = service.run()
    if service.config.report_json:  # a replica's own path under torchrun
        path = Path(service.config.report_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    if config.plot:
        from stream_trainer.plots import plot_history

        plot_history(service.history, config.plot, title=f"{config.source} · norm={report['norm']}")
    keys = [
        k
        for k in ("accuracy", "rolling_accuracy", "log_loss", "kappa", "mae", "rmse", "r2")
        if k in report
    ]
    print(
        f"run {config.run_name}: samples={report['samples']} "
        + " ".join(f"{k}={report[k]:.4f}" for k in keys)
        + f" dead_lettered={report['rejected_total']} checkpoint=v{report['checkpoint_version']}",
        file=sys.stdout,
    )
    logging.getLogger("stream_trainer.service").info("done")
    return 0 if report["final_checkpoint_ok"] else 1
