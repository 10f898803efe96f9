"""The long-lived service: source -> mini-batches -> trainer -> checkpoint -> commit -> metrics.

The loop
--------
Each turn polls one batch (Kafka: whatever arrived within ``max_wait_ms``, at most
``max_batch_records``; a file: the next batch of the seeded size schedule), runs one prequential
step (predict, score, learn), sends every rejected record to the dead letters, publishes
predictions when asked, remembers the batch's *next* offsets, updates the metrics, and checkpoints
when one is due.

Checkpoint order (do not change it; it is what makes training exactly-once)
--------------------------------------------------------------------------
1. flush the dead letters, so that no offset moves past a record that is not set aside yet;
2. **save** the checkpoint (model, optimizer, norm statistics, features, metrics, counters, and the
   next offset of every partition trained so far) to the store; the store refuses it if another
   writer has a newer epoch (then this process stops: it has been fenced off);
3. **commit** those same offsets to Kafka (so Kafka's committed offsets are never ahead of a
   checkpoint; a failed commit is logged and retried at the next checkpoint: the checkpoint, not
   Kafka, is the source of truth);
4. **report** (metrics, logs).

On start the latest checkpoint that verifies is loaded and every assigned partition is sought to its
checkpointed next offset; records trained after that checkpoint by a crashed process are trained
again by the restored (older) model, so each record counts exactly once in the persisted state.
If the store holds no checkpoint but the consumer group has committed offsets, the service refuses
to start unless ``fresh_start`` is set: then a new model starts at the group's committed offsets.

Checkpoints are due every ``checkpoint_every_records`` records or ``checkpoint_every_seconds``,
whichever first, and are also taken after a partition revocation (the rebalance callback only
raises a flag and returns at once; the loop checkpoints right after the poll), at the end of a
finite source, and on SIGTERM/SIGINT.

When the store is down (e.g. Redis restarting) the service **keeps training without committing
offsets**: the checkpoint fails after the store's own retries, the failure is counted,
``/readyz`` turns 503, and the next attempt comes at the next trigger. Nothing is lost: Kafka's
committed offsets stay at the last successful checkpoint.

Shutdown: SIGTERM/SIGINT set a flag; the batch in flight finishes, a final checkpoint is saved and
committed, and the process exits 0. A watchdog exits with status 3 if that takes longer than
``shutdown_timeout_seconds`` (the last good checkpoint and Kafka's offsets stay consistent).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from stream_trainer.checkpoints import Checkpoint, CheckpointStore, open_store
from stream_trainer.errors import ConfigError, FencedWriterError, SourceError, StreamTrainerError
from stream_trainer.evaluation import StreamHistory
from stream_trainer.records import RejectedRecord
from stream_trainer.service.batch_log import BatchLog, segments_of
from stream_trainer.service.config import ServiceConfig
from stream_trainer.service.dead_letter_file import DeadLetterFile
from stream_trainer.service.file_source import FileBatchSource
from stream_trainer.sources import BatchSizes, default_target
from stream_trainer.telemetry import HealthState, MetricsServer, ServiceMetrics
from stream_trainer.training import IncrementalTrainer, StepReport

__all__ = ["TrainerService"]

log = logging.getLogger("stream_trainer.service")
UNLABELLED_WARN_EVERY = 10_000
"""Records in a row without a label between two warnings that labels are not arriving."""

SERVICE_STATE_VERSION = 1
_LAG_EVERY_SECONDS = 5.0


class TrainerService:
    """One trainer process (see the module docstring for the loop and the checkpoint order).

    ``store`` and ``registry`` are injected by tests; production opens ``config.checkpoint`` and
    uses a fresh registry served on ``config.metrics_address``.
    """

    def __init__(
        self,
        config: ServiceConfig,
        *,
        store: CheckpointStore | None = None,
        registry: CollectorRegistry | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        self.store = store if store is not None else open_store(config.checkpoint)
        self.writer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stop_event = threading.Event()
        self._checkpoint_requested: str | None = None
        self._lock = threading.RLock()
        self.pending_offsets: dict[str, int] = {}
        self.saved_offsets: dict[str, int] = {}
        # Offsets of a saved checkpoint whose commit failed (e.g. during a rebalance): retried at
        # the next checkpoint trigger even when nothing new was trained.
        self._uncommitted: dict[str, int] | None = None
        self.checkpoint_version: int | None = None
        self.checkpoint_failures = 0
        self._last_checkpoint_ok = True
        self._last_poll = self.clock()
        self._records_since_checkpoint = 0
        self._last_checkpoint_time = self.clock()
        self._last_lag_time = 0.0
        self._dirty = False
        self.dead_lettered: Counter[str] = Counter()
        self.history = StreamHistory()
        self.records_read = 0
        self._norm_snapshot: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.metrics: ServiceMetrics | None = None
        self.server: MetricsServer | None = None
        self.source: Any = None
        self.dead_letters: Any = None
        self.predictions: Any = None
        self.batch_log: BatchLog | None = None
        self._watchdog: threading.Timer | None = None
        self._dead_unreported: Counter[str] = Counter()  # dead letters before metrics existed
        self.trainer = self._restore_or_create()

    # ------------------------------------------------------------------ start
    def _target(self) -> str:
        target = (
            self.config.trainer.target or self.config.target or default_target(self.config.source)
        )
        if target is None:
            raise ConfigError(
                "the label field is unknown: set --target (or target in the config file)"
            )
        return target

    def _restore_or_create(self) -> IncrementalTrainer:
        self.epoch = self.store.acquire_epoch(self.writer_id)
        checkpoint = self.store.load_latest()
        trainer_config = self.config.trainer
        if trainer_config.target is None:
            from dataclasses import replace

            trainer_config = replace(trainer_config, target=self._target())
        self.trainer_config = trainer_config
        self.restored = checkpoint
        if checkpoint is None:
            log.info(
                "no checkpoint in %s: starting a new model", self.config.describe()["checkpoint"]
            )
            return IncrementalTrainer(trainer_config)
        if checkpoint.config_fingerprint != trainer_config.fingerprint():
            saved = checkpoint.state["trainer"]["config"]
            now = trainer_config.to_dict()
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ConfigError(
                "the latest checkpoint was written with another trainer configuration "
                f"(differs in: {', '.join(diff)}); use the same settings or another --checkpoint"
            )
        trainer = IncrementalTrainer.from_state(checkpoint.tensors, checkpoint.state["trainer"])
        trainer.adopt_limits(trainer_config)  # screening limits: the configured ones
        self.pending_offsets = dict(checkpoint.offsets)
        self.saved_offsets = dict(checkpoint.offsets)
        self.checkpoint_version = checkpoint.version
        # Counted over the model's whole life, like samples: the checkpoint holds them.
        self.dead_lettered = Counter(checkpoint.state.get("service", {}).get("dead_lettered", {}))
        log.info(
            "restored checkpoint v%d: %d samples, step %d, offsets %s",
            checkpoint.version,
            checkpoint.samples,
            checkpoint.step,
            checkpoint.offsets,
        )
        return trainer

    def _open_source(self) -> None:
        c = self.config
        if c.is_kafka:
            from consumers import DeadLetterSink, KafkaSourceConfig, open_kafka_source
            from consumers.security import KafkaSecurity

            bootstrap, topic = c.kafka_endpoint()
            options = {
                "bootstrap_servers": bootstrap,
                "topics": topic,
                "group_id": c.group,
                "target": self.trainer_config.target,
                "features": self.trainer_config.features,
                "max_batch_records": c.max_batch_records,
                "max_wait_ms": c.max_wait_ms,
                **c.kafka,
            }
            source_config = KafkaSourceConfig.from_mapping(options)
            self.source = open_kafka_source(
                source_config, offset_provider=self._offset_for, on_revoke=self._on_revoke
            )
            if self.restored is None:
                committed = self.source.committed_offsets()
                if committed and not c.fresh_start:
                    self.source.close()
                    raise ConfigError(
                        f"the checkpoint store holds no checkpoint, but consumer group {c.group!r} "
                        f"has committed offsets {committed}: refusing to train a new model from "
                        "the middle of the topic. Restore the checkpoints, or pass --fresh-start "
                        "to start "
                        "a new model at those offsets"
                    )
            security: KafkaSecurity = source_config.security
            self.dead_letters = DeadLetterSink(bootstrap, topic=c.dead_letter, security=security)
            if c.predictions_topic:
                from consumers.producer import TopicProducer

                self.predictions = TopicProducer(
                    bootstrap, c.predictions_topic, create_missing=True, security=security
                )
        else:
            if c.predictions_topic:
                raise ConfigError("--predictions-topic needs a kafka:// source")
            self.source = FileBatchSource(
                c.source,
                target=self.trainer_config.target,
                batch_sizes=BatchSizes.parse(c.batch_sizes),
                seed=self.trainer_config.seed,
                start_offsets=self.pending_offsets,
                replay_batches=c.replay_batches,
            )
            path = c.dead_letter or str(Path("runs") / c.run_name / "dead-letter.jsonl")
            self.dead_letters = DeadLetterFile(path)

    def _offset_for(self, topic: str, partition: int) -> int | None:
        return self.pending_offsets.get(f"{topic}:{partition}")

    def _on_revoke(self, partitions: list[Any]) -> None:
        # Called on kafka-python's IO thread (or, with the consumer in a child process, while that
        # thread waits for the answer): only raise a flag and return at once.
        self._checkpoint_requested = "revoke"

    def _start_telemetry(self) -> None:
        c = self.config
        if c.metrics_address.lower() not in ("", "off", "none"):
            self.server = MetricsServer(
                c.metrics_address, self.registry, health=self.health
            ).start()
            log.info("metrics on %s/metrics", self.server.url)

    def _ensure_metrics(self) -> ServiceMetrics | None:
        if self.metrics is None and self.trainer.task is not None:
            norm = self.trainer_config.norm
            self.metrics = ServiceMetrics(
                self.registry,
                run=self.config.run_name,
                model="mlp",
                norm=norm if isinstance(norm, str) else ",".join(norm),
                task=self.trainer.task,
            )
            if self.trainer.samples_trained:
                self.metrics.set_prequential(self.trainer.metrics())
                self.metrics.set_expert_weights(self.trainer.expert_weights())
            if self.restored is not None and self.checkpoint_version is not None:
                # A restarted service serves the restored model: say which one before it saves.
                self.metrics.set_model_version(
                    version=self.checkpoint_version, step=self.restored.step
                )
            # Records set aside before the task was known (no metrics yet) are counted now.
            for reason, n in self._dead_unreported.items():
                self.metrics.dead_lettered(reason, n)
            self._dead_unreported.clear()
        return self.metrics

    def health(self) -> HealthState:
        reasons = []
        consuming = self.clock() - self._last_poll < max(10.0, 5 * self.config.max_wait_ms / 1000)
        if not consuming:
            reasons.append("no poll in the last 10 s")
        if not self._last_checkpoint_ok:
            reasons.append(f"last checkpoint failed ({self.checkpoint_failures} failures so far)")
        return HealthState(
            consuming=consuming, checkpointing=self._last_checkpoint_ok, reasons=tuple(reasons)
        )

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        """Run until the source ends (a file, or Kafka with ``stop_at_end``) or a stop request."""
        c = self.config
        torch.set_num_threads(c.torch_threads)
        log.info(
            "starting run %r as writer %s (epoch %d): %s",
            c.run_name,
            self.writer_id,
            self.epoch,
            json.dumps(c.describe()),
        )
        # The source first: when it refuses to start (no checkpoint, committed offsets), the batch
        # log of the lost model must still be there, untouched.
        self._open_source()
        keep = None
        if self.restored is not None:
            keep = int(self.restored.state.get("service", {}).get("batch_log_lines", 0))
        elif c.batch_log:
            keep = 0
        if c.batch_log:
            self.batch_log = BatchLog(c.batch_log, keep_lines=keep)
        self._start_telemetry()
        self._ensure_metrics()
        end_at_start = self.source.end_offsets() if (c.is_kafka and c.stop_at_end) else {}
        started = time.perf_counter()
        samples_at_start = self.trainer.samples_trained
        bar = None
        if c.progress and not c.is_kafka:
            from tqdm import tqdm

            bar = tqdm(unit="rec", desc="training", mininterval=0.5)
        try:
            while not self.stop_event.is_set():
                batch = self.source.poll_batch()
                self._last_poll = self.clock()
                if batch.records or batch.rejected:
                    self._handle(batch)
                    if bar is not None:
                        bar.update(len(batch.records) + len(batch.rejected))
                if self._checkpoint_requested is not None:
                    reason, self._checkpoint_requested = self._checkpoint_requested, None
                    self.checkpoint(reason)
                elif self._due():
                    self.checkpoint("interval")
                self._report_lag()
                if not c.is_kafka and self.source.exhausted:
                    break
                if c.is_kafka and c.stop_at_end and self.source.caught_up(end_at_start):
                    log.info("caught up with the end offsets seen at start: stopping")
                    break
            ok = self.checkpoint("shutdown" if self.stop_event.is_set() else "end")
        finally:
            if bar is not None:
                bar.close()
            self._close()
            # The shutdown finished in time: the watchdog must not kill the process later on.
            if self._watchdog is not None:
                self._watchdog.cancel()
        elapsed = time.perf_counter() - started
        report = self._report(elapsed, self.trainer.samples_trained - samples_at_start)
        report["final_checkpoint_ok"] = ok
        return report

    def _handle(self, batch: Any) -> None:
        trainer = self.trainer
        report: StepReport | None = None
        with self._lock:
            if batch.records:
                report = trainer.step(batch.records)
                if self.batch_log is not None:
                    self.batch_log.append(trainer.steps, segments_of(batch.records))
            rejected: list[RejectedRecord] = list(batch.rejected)
            if report is not None:
                rejected.extend(report.rejected)
            if rejected:
                self.dead_letters.send_many(rejected)
                self.dead_lettered.update(r.reason.value for r in rejected)
            self.pending_offsets.update(batch.next_offsets)
            self._records_since_checkpoint += len(batch.records) + len(batch.rejected)
            self.records_read += len(batch.records) + len(batch.rejected)
            self._dirty = True
        self._after_step(batch, report, rejected)

    def _after_step(
        self, batch: Any, report: StepReport | None, rejected: list[RejectedRecord]
    ) -> None:
        """Everything that follows a step outside the lock: history, predictions out, metrics.
        ``report`` is None when no step was taken (only rejected records arrived)."""
        trainer = self.trainer
        metrics = self._ensure_metrics()
        if report is not None:
            self.history.add(self.records_read, report.size, trainer.metrics())
            if self.predictions is not None and report.accepted:
                self._publish_predictions(report)
            since, every = trainer.records_since_label, UNLABELLED_WARN_EVERY
            if not report.trained and since // every > (since - report.predicted_only) // every:
                log.warning(
                    "%d records in a row without a value for the target field %r: they are "
                    "predicted, never learned (is the target right?)",
                    since,
                    trainer.target,
                )
        if metrics is None:
            self._dead_unreported.update(r.reason.value for r in rejected)
            return
        if report is not None:
            metrics.observe_step(
                batch_size=report.size + len(batch.rejected),
                trained=report.trained,
                predicted_only=report.predicted_only,
                predict_seconds=report.predict_seconds,
                learn_seconds=report.learn_seconds,
                loss=report.loss,
            )
            metrics.set_records_since_last_label(trainer.records_since_label)
            if trainer.samples_trained:
                metrics.set_prequential(trainer.metrics())
                metrics.set_expert_weights(trainer.expert_weights())
            # Steps 1, 1 + N, 1 + 2N, ... (``steps % N == 1`` never held for N = 1).
            if (trainer.steps - 1) % self.config.health_every_steps == 0:
                self._report_norm_health(metrics, report)
        for reason, n in Counter(r.reason.value for r in rejected).items():
            metrics.dead_lettered(reason, n)

    def _report_norm_health(self, metrics: ServiceMetrics, report: StepReport) -> None:
        snapshot = self.trainer.norm_snapshot()
        gaps = self.trainer.train_serve_gap(report.accepted[:256]) if report.accepted else {}
        for layer, (mean, var) in snapshot.items():
            drift = 0.0
            if layer in self._norm_snapshot:
                old_mean, old_var = self._norm_snapshot[layer]
                scale = float(np.linalg.norm(old_mean) + np.linalg.norm(old_var)) + 1e-12
                drift = (
                    float(np.linalg.norm(mean - old_mean) + np.linalg.norm(var - old_var)) / scale
                )
            metrics.set_norm_health(layer, drift=drift, train_serve_gap=gaps.get(layer, 0.0))
        for layer, gap in gaps.items():
            if layer not in snapshot:
                metrics.set_norm_health(layer, drift=0.0, train_serve_gap=gap)
        self._norm_snapshot = snapshot

    def _publish_predictions(self, report: StepReport) -> None:
        version = {"checkpoint": self.checkpoint_version, "step": self.trainer.steps}
        predictions = report.predictions()
        for i, (record, prediction) in enumerate(zip(report.accepted, predictions, strict=True)):
            body: dict[str, Any] = {"prediction": prediction, "model_version": version}
            if report.proba is not None:
                body["proba"] = dict(zip(report.classes, map(float, report.proba[i]), strict=False))
            body["source"] = {
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
            }
            self.predictions.send(json.dumps(body).encode(), key=record.key)

    def _due(self) -> bool:
        if not self._dirty:
            return False
        c = self.config
        return (
            self._records_since_checkpoint >= c.checkpoint_every_records
            or self.clock() - self._last_checkpoint_time >= c.checkpoint_every_seconds
        )

    def _report_lag(self) -> None:
        if not self.config.is_kafka or self.metrics is None:
            return
        now = self.clock()
        if now - self._last_lag_time >= _LAG_EVERY_SECONDS:
            self._last_lag_time = now
            try:
                self.metrics.set_consumer_lag(self.source.lag())
            except SourceError as exc:
                log.warning("cannot read consumer lag: %s", exc)

    # ------------------------------------------------------------------ checkpoint
    def checkpoint(self, reason: str) -> bool:
        """Save, then commit, then report (module docstring). Returns False if the save failed."""
        with self._lock:
            if not self._dirty and self.saved_offsets == self.pending_offsets:
                if self._uncommitted is not None and self.checkpoint_version is not None:
                    self._commit(self._uncommitted, self.checkpoint_version)
                return self._last_checkpoint_ok
            offsets = dict(self.pending_offsets)
            t0 = time.perf_counter()
            # 1. dead letters durable before any offset moves past them
            self.dead_letters.flush()
            # 2. save
            state = {
                "trainer": self.trainer.state_json(),
                "service": {
                    "version": SERVICE_STATE_VERSION,
                    "run_name": self.config.run_name,
                    "batch_log_lines": self.batch_log.lines if self.batch_log is not None else 0,
                    "dead_lettered": dict(self.dead_lettered),
                },
            }
            checkpoint = Checkpoint(
                tensors=self.trainer.state_tensors(),
                state=state,
                offsets=offsets,
                samples=self.trainer.samples_trained,
                step=self.trainer.steps,
                config_fingerprint=self.trainer_config.fingerprint(),
                writer_id=self.writer_id,
                epoch=self.epoch,
            )
            try:
                version = self.store.save(checkpoint)
            except FencedWriterError:
                log.error(
                    "a newer writer owns the checkpoints: this trainer is fenced off; stopping"
                )
                self.stop_event.set()
                raise
            except StreamTrainerError as exc:
                if not exc.retriable:
                    raise
                self.checkpoint_failures += 1
                self._last_checkpoint_ok = False
                # The next attempt comes at the next trigger (records or seconds), not after every
                # batch: each attempt spends the store's retries, which would stall training.
                self._records_since_checkpoint = 0
                self._last_checkpoint_time = self.clock()
                if self.metrics is not None:
                    self.metrics.checkpoint_failed()
                log.warning(
                    "checkpoint (%s) failed, training goes on without committing: %s", reason, exc
                )
                return False
            duration = time.perf_counter() - t0
            self.checkpoint_version = version
            self.saved_offsets = offsets
            self._records_since_checkpoint = 0
            self._last_checkpoint_time = self.clock()
            self._last_checkpoint_ok = True
            self._dirty = False
            # 3. commit the offsets the checkpoint holds
            self._commit(offsets, version)
        # 4. report
        if self.metrics is not None:
            size = sum(t.numel() * t.element_size() for t in checkpoint.tensors.values())
            self.metrics.checkpoint_saved(
                duration_seconds=duration, size_bytes=size, version=version, step=self.trainer.steps
            )
        log.info(
            "checkpoint v%d (%s): %d samples, offsets %s, %.3f s",
            version,
            reason,
            self.trainer.samples_trained,
            offsets,
            duration,
        )
        return True

    def _commit(self, offsets: dict[str, int], version: int) -> None:
        try:
            self.source.commit(offsets)
        except SourceError as exc:
            self._uncommitted = offsets
            log.warning("checkpoint v%d saved but the offset commit failed (%s)", version, exc)
        else:
            self._uncommitted = None

    # ------------------------------------------------------------------ stop
    def request_stop(self, *_: Any) -> None:
        """Signal handler: finish the batch in flight, checkpoint, commit, exit (bounded)."""
        if self.stop_event.is_set():
            return
        log.info("stop requested: finishing the batch in flight, then checkpointing")
        self.stop_event.set()
        timer = threading.Timer(self.config.shutdown_timeout_seconds, self._shutdown_overdue)
        timer.daemon = True
        self._watchdog = timer
        timer.start()

    def _shutdown_overdue(self) -> None:
        log.error("shutdown took longer than %.0f s: exiting", self.config.shutdown_timeout_seconds)
        os._exit(3)

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def _close(self) -> None:
        for closer in (
            getattr(self.source, "close", None),
            getattr(self.dead_letters, "close", None),
            getattr(self.predictions, "close", None),
            getattr(self.batch_log, "close", None),
            getattr(self.server, "close", None),
            getattr(self.store, "close", None),
        ):
            if closer is None:
                continue
            try:
                closer()
            except Exception as exc:  # closing must not hide the run's outcome
                log.warning("error while closing: %s", exc)

    def _report(self, elapsed: float, trained_now: int) -> dict[str, Any]:
        t = self.trainer
        report: dict[str, Any] = {
            "samples": t.samples_trained,
            **t.metrics(),
            "samples_per_second": trained_now / elapsed if elapsed > 0 else 0.0,
            "elapsed_seconds": elapsed,
            "records_trained": trained_now,
            "predicted_only": t.predicted_only,
            "unscored": t.unscored,
            "dead_lettered": dict(sorted(self.dead_lettered.items())),
            "rejected": dict(sorted(self.dead_lettered.items())),
            "rejected_total": sum(self.dead_lettered.values()),
            "next_offsets": dict(sorted(self.saved_offsets.items())),
            "checkpoint_version": self.checkpoint_version,
            "checkpoint_failures": self.checkpoint_failures,
            "steps": t.steps,
            "task": t.task,
            "classes": list(t.classes),
            "norm": self.trainer_config.norm
            if isinstance(self.trainer_config.norm, str)
            else ",".join(self.trainer_config.norm),
            "batch_size": f"max {self.config.max_batch_records}"
            if self.config.is_kafka
            else self.config.batch_sizes,
            "model": "mlp",
            "source": self.config.source,
            "run_name": self.config.run_name,
        }
        return report
