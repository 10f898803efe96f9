"""``stream-trainer run``: the service. Learns from Kafka (``--source kafka://HOST:PORT/TOPIC``) or
from a file, recording or bundled dataset (the embedded default: river's Phishing, local
checkpoints, metrics on 127.0.0.1:9100).

Settings come from ``--config FILE.toml`` < ``STREAM_TRAINER_*`` environment variables < flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stream_trainer.commands._learner_args import add_learner_arguments, add_limit_arguments
from stream_trainer.errors import ConfigError
from stream_trainer.training.config import SCREENING_SETTINGS

__all__ = ["register", "service_config"]

# learner flag dest -> TrainerConfig field
_TRAINER_FLAGS = {
    "task": "task",
    "features": "features",
    "norm": "norm",
    "hidden": "hidden",
    "activation": "activation",
    "dropout": "dropout",
    "weight_standardization": "weight_standardization",
    "skip": "skip",
    "linear_expert": "linear_expert",
    "lr_scale_min": "lr_scale_min",
    "optimizer": "optimizer",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "grad_clip": "grad_clip",
    "lr_scaling": "lr_scaling",
    "lr_reference_batch": "lr_reference_batch",
    "momentum_in_samples": "momentum_in_samples",
    "max_categories": "max_categories",
    "window": "rolling_window",
    "seed": "seed",
    **{key: key for key in SCREENING_SETTINGS},
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="run the training service", description=__doc__)
    p.add_argument("--config", type=Path, help="TOML file with the settings")
    p.add_argument(
        "--source",
        help="kafka://HOST:PORT/TOPIC, a file or recording, river:NAME or synth:NAME "
        "(default river:Phishing)",
    )
    p.add_argument("--group", help="Kafka consumer group (default stream-trainer)")
    p.add_argument(
        "--run-name", dest="run_name", help="run label on every metric (default 'default')"
    )
    p.add_argument(
        "--checkpoint",
        help="redis://HOST:PORT/DB[?prefix=NAME] or file://DIR (default file://checkpoints)",
    )
    p.add_argument("--checkpoint-every-records", dest="checkpoint_every_records", type=int)
    p.add_argument("--checkpoint-every-seconds", dest="checkpoint_every_seconds", type=float)
    p.add_argument(
        "--fresh-start",
        dest="fresh_start",
        action="store_true",
        help="start a new model even though the group has committed offsets",
    )
    p.add_argument(
        "--allow-rollback",
        dest="allow_rollback",
        action="store_true",
        help="start even when the restored checkpoint is older than the version the group's "
        "committed offsets carry and the newer versions are not in the store as invalid ones "
        "(their records are trained again)",
    )
    p.add_argument(
        "--instance-id",
        dest="instance_id",
        help="Kafka static membership id (group.instance.id), unique in the group and stable "
        "across restarts (e.g. the pod name): a restarted member takes its place at once",
    )
    p.add_argument(
        "--metrics-address",
        dest="metrics_address",
        help="HOST:PORT for /metrics, /healthz, /readyz, /model and /predict ('off' disables; "
        "default 127.0.0.1:9100)",
    )
    p.add_argument(
        "--stop-at-end",
        dest="stop_at_end",
        action="store_true",
        help="stop once caught up with the end offsets that existed at start",
    )
    p.add_argument("--report-json", dest="report_json", help="write the final report as JSON here")
    p.add_argument("--plot", help="write a PNG of rolling accuracy and batch sizes here")
    p.add_argument(
        "--batch-sizes", dest="batch_sizes", help="file sources: N or MIN:MAX (default 1:64)"
    )
    p.add_argument(
        "--max-batch-records",
        dest="max_batch_records",
        type=int,
        help="Kafka: largest batch (default 64)",
    )
    p.add_argument(
        "--max-wait-ms",
        dest="max_wait_ms",
        type=int,
        help="Kafka: longest wait for a batch (default 100)",
    )
    p.add_argument(
        "--dead-letter",
        dest="dead_letter",
        help="dead-letter topic (Kafka; default TOPIC.dead-letter) or file (file sources)",
    )
    p.add_argument(
        "--predictions-topic",
        dest="predictions_topic",
        help="publish every prediction to this topic",
    )
    p.add_argument(
        "--batch-log",
        dest="batch_log",
        help="log each step's offset ranges here (for bit-identical replay)",
    )
    p.add_argument(
        "--replay-batches",
        dest="replay_batches",
        help="replay a recording with the batches of this batch log",
    )
    p.add_argument("--health-every-steps", dest="health_every_steps", type=int)
    p.add_argument("--shutdown-timeout-seconds", dest="shutdown_timeout_seconds", type=float)
    p.add_argument(
        "--dist-backend",
        dest="dist_backend",
        choices=("auto", "gloo", "nccl"),
        help="under torchrun (WORLD_SIZE > 1): collective backend (default auto: gloo on CPU)",
    )
    p.add_argument(
        "--dist-timeout-seconds",
        dest="dist_timeout_seconds",
        type=float,
        help="under torchrun: a collective that waits longer fails and the replica exits"
        " (default 120)",
    )
    p.add_argument(
        "--liveness-timeout-seconds",
        dest="liveness_timeout_seconds",
        type=float,
        help="/healthz answers 503 once the loop has not begun an iteration for this long (an "
        "idle source still polls every --max-wait-ms; default 60)",
    )
    p.add_argument(
        "--serve-predictions",
        dest="serve_predictions",
        action="store_true",
        help="answer POST /predict (JSON records in, predictions out) from the live model on "
        "--metrics-address",
    )
    p.add_argument("--log-format", dest="log_format", choices=("text", "json"))
    p.add_argument("--log-level", dest="log_level")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--torch-threads",
        dest="torch_threads",
        type=int,
        help="torch intra-op threads (default 1: the MLP's tensors are small and a thread pool"
        " costs more than it saves)",
    )
    add_learner_arguments(p)
    add_limit_arguments(p)
    # Only flags actually given may override the file and the environment.
    for action in p._actions:
        if action.dest not in ("help", "config"):
            action.default = argparse.SUPPRESS
    p.set_defaults(func=run_service)


def _split(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    model = given.pop("model", "mlp")
    if model != "mlp":
        raise ConfigError(f"run trains the MLP; river baselines ({model!r}) are for `evaluate`")
    trainer = {}
    for flag, key in _TRAINER_FLAGS.items():
        if flag in given:
            trainer[key] = given.pop(flag)
    if "features" in trainer and isinstance(trainer["features"], str):
        trainer["features"] = tuple(f.strip() for f in trainer["features"].split(",") if f.strip())
    if trainer.get("grad_clip") == 0:
        trainer["grad_clip"] = None
    if "target" in given:
        trainer["target"] = given["target"]
    return given, trainer


def service_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Any:
    """The :class:`~stream_trainer.service.ServiceConfig` of parsed ``run`` arguments: the
    ``--config`` file < ``environ`` (default ``os.environ``) < the flags given."""
    from stream_trainer.service import load_service_config

    flags, trainer_flags = _split(args)
    return load_service_config(
        config_file=args.config, flags=flags, trainer_flags=trainer_flags, environ=environ
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
