"""The long-lived service: source -> mini-batches -> trainer -> checkpoint -> commit -> metrics.

The loop
--------
Each turn polls one batch (Kafka: whatever arrived within ``max_wait_ms``, at most
``max_batch_records``; a file: the next batch of the seeded size schedule), runs one prequential
step (predict, score, learn), sends every rejected record to the dead letters, publishes
predictions when asked, remembers the batch's *next* offsets, updates the metrics, and checkpoints
when one is due. The source and the dead letters are whatever implements
:class:`~stream_trainer.sources.protocol.BatchSource` and
:class:`~stream_trainer.sources.protocol.DeadLetterSink` (Kafka, or a file).

With delayed labels (``labels_source`` not ``inline``; :mod:`stream_trainer.service.label_join`)
a turn predicts the batch's records and keeps the unlabelled ones that carry an id, joins the
labels that arrived with the rows they belong to and learns those rows in one step, then expires
what waited too long. The pending store is saved in the checkpoint (step 2 below), and the labels
topic is read by the same consumer as the source, so its offsets are saved and committed with the
others: a restart re-reads exactly the features and labels its checkpoint has not seen.

Checkpoint order (do not change it; it is what makes training exactly-once)
--------------------------------------------------------------------------
1. flush the dead letters, so that no offset moves past a record that is not set aside yet;
2. **save** the checkpoint (model, optimizer, norm statistics, features, metrics, counters, and the
   next offset of every partition owned so far, trained or not, with its origin) to the store;
   the store refuses it if another writer has a newer epoch (then this process stops: it has been
   fenced off);
3. **commit** those same offsets to Kafka, each with the checkpoint's version as its metadata
   (so Kafka's committed offsets are never ahead of a checkpoint; a failed commit is logged and
   retried at the next checkpoint: the checkpoint, not Kafka, is the source of truth);
4. **report** (metrics, logs).

On start the latest checkpoint that verifies is loaded and every assigned partition is sought to its
checkpointed next offset; records trained after that checkpoint by a crashed process are trained
again by the restored (older) model, so each record counts exactly once in the persisted state.
If the store holds no checkpoint but the consumer group has committed offsets, the service refuses
to start unless ``fresh_start`` is set: then a new model starts at the group's committed offsets.

Offsets after a fallback, and rollbacks
---------------------------------------
A checkpoint holds the next offset of every partition the service owns, the ones it has not read
anything from yet too (at their start position, which the source hands out), and each partition's
*origin*, the offset at which this model first started it. Every offset committed to Kafka carries
the checkpoint version and that origin as its metadata, ``{"v": VERSION, "origin": OFFSET}``.
When the version restored is older than the one that committed a partition's offset (the newer
versions failed their checks and were skipped, or ``allow_rollback``), a partition the restored
version holds is sought to its offset there, and one it lacks to its origin (to offset 0 when the
origin is unknown, i.e. the partition's beginning with ``auto_offset_reset = "earliest"``): never
to the newer committed offset, which would skip the records the restored model never learned.
Restoring a version older than the committed one when the newer versions are not present-but-
invalid (the store's history was moved back: its ``latest`` pointer, deleted versions) is refused
with a :class:`~stream_trainer.errors.CheckpointError` (not retriable) unless ``allow_rollback``.

Checkpoints are due every ``checkpoint_every_records`` records or ``checkpoint_every_seconds``,
whichever first, and are also taken after a partition revocation (the rebalance callback only
raises a flag and returns at once; the loop checkpoints right after the poll), at the end of a
finite source, and on SIGTERM/SIGINT.

When the store is down (e.g. Redis restarting) the service **keeps training without committing
offsets**: the checkpoint fails after the store's own retries, the failure is counted,
``/readyz`` turns 503, and the next attempt comes at the next trigger. Nothing is lost: Kafka's
committed offsets stay at the last successful checkpoint. Dead letters that cannot be delivered
yet (the broker away) fail the checkpoint in the same way, before anything is saved; dead letters
the broker refuses for good are sent cut down or counted (:mod:`consumers.dead_letter`) and never
stop the service.

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
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from stream_trainer.checkpoints import Checkpoint, CheckpointStore, open_store
from stream_trainer.errors import (
    CheckpointError,
    ConfigError,
    FencedWriterError,
    SourceError,
    StreamTrainerError,
)
from stream_trainer.evaluation import StreamHistory, scored_samples
from stream_trainer.records import Record, RejectedRecord, RejectReason
from stream_trainer.service.batch_log import BatchLog, segments_of
from stream_trainer.service.config import ServiceConfig
from stream_trainer.service.label_join import Joined, LabelJoin, split_label_tensors
from stream_trainer.service.restore import restore_checkpoint
from stream_trainer.service.serving import LiveModelEndpoint, ModelLock
from stream_trainer.sources import Batch, BatchSizes, BatchSource, DeadLetterSink, default_target
from stream_trainer.sources.dead_letter_file import DeadLetterFile
from stream_trainer.sources.file_batches import FileBatchSource
from stream_trainer.telemetry import HealthState, MetricsServer, ServiceMetrics
from stream_trainer.telemetry.http import Liveness
from stream_trainer.telemetry.metrics import register_loop_age, register_process_collectors
from stream_trainer.threads import pin_threads
from stream_trainer.training import IncrementalTrainer, StepReport
from stream_trainer.training.config import EXECUTION_SETTINGS, SCREENING_SETTINGS
from stream_trainer.training.labels import infer_task, parse_label

__all__ = ["TrainerService"]

log = logging.getLogger("stream_trainer.service")
UNLABELLED_WARN_EVERY = 10_000
"""Records in a row without a label between two warnings that labels are not arriving."""

SERVICE_STATE_VERSION = 1
_LAG_EVERY_SECONDS = 5.0
_LAG_MAX_BACKOFF_SECONDS = 60.0
PREDICT_SWITCH_INTERVAL = 0.0002
"""Seconds between the interpreter's GIL hand-offs while /predict is served (see
:meth:`TrainerService._start_telemetry`)."""


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
        # Held around every use of the model that a /predict request must not overlap: a step,
        # the norm health probe, taking a checkpoint's state (LiveModelEndpoint).
        self.model_lock = ModelLock()
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
        self._source: BatchSource | None = None  # opened by run() (_open_source)
        self._dead_letters: DeadLetterSink | None = None
        self.predictions: Any = None
        self.batch_log: BatchLog | None = None
        self._watchdog: threading.Timer | None = None
        self._dead_unreported: Counter[str] = Counter()  # dead letters before metrics existed
        self._dead_letter_counters: Any = None
        self._lag_failures = 0
        # Versions newer than the restored one that were present but failed their checks, with
        # the reason (filled by _restore_or_create; see _rejected_newer).
        self.rejected_versions: dict[int, str] = {}
        # Per partition, where this model first started reading it (None: not known; module
        # docstring); and where to start the partitions a fallback must not resume at the group's
        # committed offset (_read_committed_versions).
        self.origins: dict[str, int | None] = {}
        self._fallback_starts: dict[str, int] = {}
        # Delayed labels (stream_trainer.service.label_join): the pending store, None when the
        # labels arrive inline. Filled by _restore_or_create (a restored one from the checkpoint).
        self.label_join: LabelJoin | None = None
        self.trainer = self._restore_or_create()
        self._unmatched_reported: Counter[str] = Counter(
            self.label_join.unmatched if self.label_join is not None else ()
        )
        if self.restored is not None:
            self.origins = _restored_origins(self.restored)

    @property
    def source(self) -> BatchSource:
        """The source of batches (Kafka or a file), open while :meth:`run` runs."""
        if self._source is None:
            raise RuntimeError("the source is not open: run() opens it")
        return self._source

    @source.setter
    def source(self, source: BatchSource) -> None:
        self._source = source

    @property
    def dead_letters(self) -> DeadLetterSink:
        """Where rejected records go (a Kafka topic or a file), open while :meth:`run` runs."""
        if self._dead_letters is None:
            raise RuntimeError("the dead-letter sink is not open: run() opens it")
        return self._dead_letters

    @dead_letters.setter
    def dead_letters(self, sink: DeadLetterSink) -> None:
        self._dead_letters = sink

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
        """Take the writer epoch, then restore the newest stored version that passes every check
        (:func:`~stream_trainer.service.restore.restore_checkpoint`: checksum, signature,
        structure, then the trainer rebuilt), falling back over the ones that do not. Each
        rejected version newer than the restored one is in :attr:`rejected_versions` (version ->
        why), logged and counted (``stream_trainer_checkpoint_rejected_total``)."""
        self.epoch = self.store.acquire_epoch(self.writer_id)
        trainer_config = self.config.trainer
        if trainer_config.target is None:
            from dataclasses import replace

            trainer_config = replace(trainer_config, target=self._target())
        self.trainer_config = trainer_config
        self.label_join = self._new_label_join()
        restored = self.store.load_newest(self._restore)
        self.rejected_versions = {} if restored is None else dict(restored.rejected)
        self._rejections_unreported: Counter[str] = (
            Counter() if restored is None else Counter(restored.reasons.values())
        )
        checkpoint = None if restored is None else restored.checkpoint
        self.restored = checkpoint
        if restored is None or checkpoint is None:
            log.info(
                "no checkpoint in %s: starting a new model", self.config.describe()["checkpoint"]
            )
            return IncrementalTrainer(trainer_config)
        self.pending_offsets = dict(checkpoint.offsets)
        self.saved_offsets = dict(checkpoint.offsets)
        self.checkpoint_version = checkpoint.version
        # Counted over the model's whole life, like samples: the checkpoint holds them.
        self.dead_lettered = Counter(checkpoint.state.get("service", {}).get("dead_lettered", {}))
        if self.rejected_versions:
            log.warning(
                "fell back to checkpoint v%d: newer versions rejected: %s",
                checkpoint.version,
                "; ".join(f"v{v} ({restored.reasons[v]})" for v in self.rejected_versions),
            )
        log.info(
            "restored checkpoint v%d: %d samples, step %d, offsets %s",
            checkpoint.version,
            checkpoint.samples,
            checkpoint.step,
            checkpoint.offsets,
        )
        trainer, join = restored.value
        trainer.adopt_limits(trainer_config)  # screening limits: the configured ones
        if join is not None:
            self.label_join = join
        return trainer

    def _new_label_join(self) -> LabelJoin | None:
        c = self.config
        if not c.delayed_labels:
            return None
        assert self.trainer_config.target is not None
        return LabelJoin(
            c.id_field,
            self.trainer_config.target,
            labels_topic=c.labels_topic(),
            max_pending=c.max_pending,
            timeout_seconds=c.label_timeout_seconds,
            check_label=self._check_label,
        )

    def _check_label(self, label: Any) -> tuple[RejectReason, str] | None:
        """A delayed label screened as it arrives, as the trainer will screen it."""
        trainer, c = self.trainer, self.trainer_config
        parsed = parse_label(
            label,
            trainer.task or infer_task(label),
            max_abs_value=c.max_abs_value,
            max_length=c.max_string_length,
        )
        return parsed if isinstance(parsed, tuple) else None

    def _restore(self, checkpoint: Checkpoint) -> tuple[IncrementalTrainer, LabelJoin | None]:
        """One stored version, validated and rebuilt (with its pending store, delayed labels);
        a version written with another trainer configuration, or holding records that wait for
        labels when labels now arrive inline, stops the service (``ConfigError``) rather than
        being skipped."""
        trainer = restore_checkpoint(checkpoint)
        labels = checkpoint.state.get("service", {}).get("labels")
        join = self._new_label_join()
        if labels is not None and join is None:
            waiting = len(labels.get("ids", ()))
            raise ConfigError(
                f"checkpoint v{checkpoint.version} holds {waiting} records waiting for delayed "
                "labels: run with the same --labels-source (or another --checkpoint)"
            )
        if labels is not None and join is not None:
            evicted = join.load(split_label_tensors(checkpoint.tensors)[1], labels)
            if evicted:
                log.warning("max_pending is below the stored pending records: %d expired", evicted)
        if checkpoint.config_fingerprint != self.trainer_config.fingerprint():
            saved = checkpoint.state["trainer"]["config"]
            now = self.trainer_config.to_dict()
            diff = sorted(
                k
                for k in set(saved) | set(now)
                if saved.get(k) != now.get(k)
                and k not in (*SCREENING_SETTINGS, *EXECUTION_SETTINGS)
            )
            raise ConfigError(
                f"checkpoint v{checkpoint.version} was written with another trainer configuration "
                f"(differs in: {', '.join(diff)}); use the same settings or another --checkpoint"
            )
        return trainer, join

    def _open_source(self) -> None:
        c = self.config
        if c.is_kafka:
            from consumers import DeadLetterSink as KafkaDeadLetters
            from consumers import KafkaSourceConfig, open_kafka_source
            from consumers.security import KafkaSecurity

            bootstrap, topic = c.kafka_endpoint()
            labels_topic = c.labels_topic()
            features = self.trainer_config.features
            if features is not None and self.label_join is not None:
                features = (*features, c.id_field)
            options = {
                "bootstrap_servers": bootstrap,
                # One consumer reads the labels topic too: its offsets are checkpointed and
                # committed with the features topic's (exactly-once extends to the labels).
                "topics": topic if labels_topic is None else (topic, labels_topic),
                "group_id": c.group,
                "target": self.trainer_config.target,
                "features": features,
                "max_batch_records": c.max_batch_records,
                "max_wait_ms": c.max_wait_ms,
                **{k: v for k, v in c.kafka.items() if k != "producer"},
            }
            instance_id = self._instance_id()
            if instance_id is not None:
                options["group_instance_id"] = instance_id
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
            try:
                self._read_committed_versions()
            except BaseException:
                self.source.close()
                raise
            security: KafkaSecurity = source_config.security
            producer_options = c.kafka.get("producer", {})
            self.dead_letters = KafkaDeadLetters(
                bootstrap,
                topic=c.dead_letter,
                security=security,
                producer_options=producer_options,
            )
            if c.predictions_topic:
                from consumers.producer import TopicProducer

                self.predictions = TopicProducer(
                    bootstrap,
                    c.predictions_topic,
                    create_missing=True,
                    security=security,
                    producer_options=producer_options,
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

    def _instance_id(self) -> str | None:
        """The Kafka static membership id (``instance_id`` or ``[kafka] group_instance_id``),
        when one is set."""
        return self.config.instance_id or self.config.kafka.get("group_instance_id")

    def _read_committed_versions(self) -> None:
        """Read the checkpoint versions the group's committed offsets carry (module docstring):
        refuse a rollback, and find where each partition the restored version lacks starts."""
        restored = self.checkpoint_version or 0
        newer: dict[int, list[str]] = {}
        for key, (offset, note) in sorted(self.source.committed_metadata().items()):
            version, origin = _parse_commit_metadata(note)
            if origin is not None and self.origins.get(key) is None:
                self.origins[key] = origin
            if version is None or version <= restored or self.restored is None:
                continue
            newer.setdefault(version, []).append(key)
            if key not in self.pending_offsets:
                start = origin if origin is not None else 0
                self._fallback_starts[key] = start
                log.warning(
                    "%s: committed offset %d comes from checkpoint v%d, newer than the restored "
                    "v%d; starting it at its origin %d instead",
                    key,
                    offset,
                    version,
                    restored,
                    start,
                )
        if not newer or self.epoch == 0:  # a replica that does not write does not judge
            return
        rejected = self._rejected_newer()
        missing = sorted(v for v in newer if v not in rejected)
        if not missing:
            log.warning(
                "restored checkpoint v%d although the group committed offsets of v%s: the newer "
                "versions failed their checks (%s)",
                restored,
                ", v".join(map(str, sorted(newer))),
                "; ".join(f"v{v}: {rejected[v]}" for v in sorted(newer)),
            )
            return
        detail = (
            f"the restored checkpoint is v{restored}, but consumer group {self.config.group!r} "
            f"committed offsets of v{max(newer)} (partitions {newer[max(newer)]}), and "
            f"v{', v'.join(map(str, missing))} are not in the store as versions that failed "
            "their checks: its history was moved back (a 'latest' pointer set back, versions "
            "deleted, another store)"
        )
        if not self.config.allow_rollback:
            raise CheckpointError(
                f"refusing to roll back: {detail}. Restore the newer versions, or pass "
                f"--allow-rollback to train again from v{restored} the records the newer "
                "versions had learned",
                retriable=False,
            )
        log.warning("rolling back (allow_rollback): %s", detail)

    def _rejected_newer(self) -> dict[int, str]:
        """Versions newer than the restored one that are in the store but fail its checks, with
        the reason: ``rejected_versions`` when the restore recorded them, else a check of each."""
        if self.rejected_versions:
            return self.rejected_versions
        restored = self.checkpoint_version or 0
        found: dict[int, str] = {}
        for info in self.store.list_versions():
            if info.version <= restored:
                continue
            result = self.store.verify(info.version)
            if not result.ok:
                found[info.version] = result.error or info.error or "invalid"
        self.rejected_versions = found
        return found

    def _offset_for(self, topic: str, partition: int) -> int | None:
        key = f"{topic}:{partition}"
        offset = self.pending_offsets.get(key)
        return offset if offset is not None else self._fallback_starts.get(key)

    def _note_offsets(self, batch: Batch) -> None:
        """Record a batch's next offsets, and the origin of every partition seen first in it
        (the first offset of it in the batch, or its start position when it has none)."""
        for key, offset in batch.next_offsets.items():
            if key not in self.origins:
                self.origins[key] = batch_first_offset(batch, key, offset)
        self.pending_offsets.update(batch.next_offsets)

    def _on_revoke(self, partitions: list[Any]) -> None:
        # Called on kafka-python's IO thread (or, with the consumer in a child process, while that
        # thread waits for the answer): only raise a flag and return at once.
        self._checkpoint_requested = "revoke"

    def _start_telemetry(self) -> None:
        c = self.config
        self._last_poll = self.clock()  # the liveness bound counts from here
        if c.metrics_address.lower() not in ("", "off", "none"):
            register_process_collectors(self.registry)
            register_loop_age(self.registry, run=c.run_name, age=self._loop_age)
            endpoint = LiveModelEndpoint(
                self.trainer,
                self.model_lock,
                settings=c.describe(),
                checkpoint_version=lambda: self.checkpoint_version,
                predict_enabled=c.serve_predictions,
                registry=self.registry,
                run=c.run_name,
            )
            self.server = MetricsServer(
                c.metrics_address,
                self.registry,
                health=self.health,
                liveness=self.liveness,
                model=endpoint,
            ).start()
            log.info("metrics on %s/metrics", self.server.url)
            if c.serve_predictions:
                # A request thread re-takes the GIL after every blocking call (socket reads, each
                # torch op); the training thread holds it up to the switch interval each time
                # (5 ms by default), which would add that much per op to a prediction.
                sys.setswitchinterval(min(sys.getswitchinterval(), PREDICT_SWITCH_INTERVAL))
                log.info("predictions on POST %s/predict", self.server.url)

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
                self.metrics.set_expert_losses(self.trainer.expert_losses())
            if self.restored is not None and self.checkpoint_version is not None:
                # A restarted service serves the restored model: say which one before it saves.
                self.metrics.set_model_version(
                    version=self.checkpoint_version, step=self.restored.step
                )
            for reason, n in self._rejections_unreported.items():
                self.metrics.checkpoint_rejected(reason, n)
            # Records set aside before the task was known (no metrics yet) are counted now.
            for reason, n in self._dead_unreported.items():
                self.metrics.dead_lettered(reason, n)
            self._dead_unreported.clear()
        return self.metrics

    def _loop_age(self) -> float:
        """Seconds since the loop last polled its source, i.e. began an iteration."""
        return max(0.0, self.clock() - self._last_poll)

    def liveness(self) -> Liveness:
        """Alive while the loop has polled within ``liveness_timeout_seconds``: every iteration
        polls, and an idle source still answers each poll (empty, after at most ``max_wait_ms``),
        so only a loop stuck in a step, a checkpoint or a poll goes quiet. A checkpoint counts
        too: the bound must exceed the longest save the store's retries allow."""
        age, bound = self._loop_age(), self.config.liveness_timeout_seconds
        if age <= bound:
            return Liveness(alive=True)
        return Liveness(
            alive=False,
            reason=f"the service loop has not completed an iteration for {age:.1f} s "
            f"(liveness_timeout_seconds {bound:g})",
        )

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
        pin_threads(c.threads)
        self.trainer.warm_up()  # the first batch's one-time imports, before the clock below
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
                elif batch.next_offsets:  # start positions of partitions not read from yet
                    with self._lock:
                        self._note_offsets(batch)
                if self._checkpoint_requested is not None:
                    reason, self._checkpoint_requested = self._checkpoint_requested, None
                    self.checkpoint(reason)
                elif self._due():
                    self.checkpoint("interval")
                self._report_lag()
                if (not c.is_kafka or c.stop_at_end) and self.source.caught_up(end_at_start):
                    if c.is_kafka:
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

    def _handle(self, batch: Batch) -> None:
        if self.label_join is not None:
            self._handle_delayed(batch, self.label_join)
            return
        trainer = self.trainer
        report: StepReport | None = None
        with self._lock:
            if batch.records:
                with self.model_lock.training():
                    report = trainer.step(batch.records)
                if self.batch_log is not None:
                    self.batch_log.append(trainer.steps, segments_of(batch.records))
            rejected: list[RejectedRecord] = list(batch.rejected)
            if report is not None:
                rejected.extend(report.rejected)
            if rejected:
                self.dead_letters.send_many(rejected)
                self.dead_lettered.update(r.reason.value for r in rejected)
            self._note_offsets(batch)
            self._records_since_checkpoint += len(batch.records) + len(batch.rejected)
            self.records_read += len(batch.records) + len(batch.rejected)
            self._dirty = True
        self._after_step(batch, report, rejected)

    def _handle_delayed(self, batch: Batch, join: LabelJoin) -> None:
        """A batch with delayed labels (:mod:`~stream_trainer.service.label_join`): predict the
        features records and keep the unlabelled ones that carry an id, join the labels that
        arrived with their rows and learn those in one step, then expire what is due."""
        trainer = self.trainer
        report: StepReport | None = None
        with self._lock:
            split = join.split(batch.records)
            rejected: list[RejectedRecord] = [*batch.rejected, *split.rejected]
            evicted, ready = 0, list[Any]()
            if split.features:
                report = trainer.step(split.features)
                if self.batch_log is not None:
                    self.batch_log.append(trainer.steps, segments_of(split.features))
                rejected.extend(report.rejected)
                evicted, ready = join.hold(
                    report.accepted, split.ids, report.inputs, _served(report)
                )
            joined, duplicates = join.join(split.labels, ready)
            rejected.extend(duplicates)
            learned, refused, delays = self._learn_joined(join, joined)
            rejected.extend(refused)
            expired, _ = join.expire()
            if rejected:
                self.dead_letters.send_many(rejected)
                self.dead_lettered.update(r.reason.value for r in rejected)
            self._note_offsets(batch)
            self._records_since_checkpoint += len(batch.records) + len(batch.rejected)
            self.records_read += len(batch.records) + len(batch.rejected)
            self._dirty = True
        metrics = self._ensure_metrics()
        if report is not None and self.predictions is not None and report.accepted:
            self._publish_predictions(report, split.ids)
        trained = (report.trained if report else 0) + sum(step.trained for step in learned)
        quality = trainer.metrics() if trained else None
        if quality is not None:
            self.history.add(self.records_read, trained, quality)
        if metrics is not None:
            # Two steps at most: the batch's records predicted (and those labelled inline
            # learned), then the rows its labels joined learned (records of earlier batches).
            for step in ([] if report is None else [report]) + learned:
                metrics.observe_step(
                    batch_size=step.size,
                    trained=step.trained,
                    predicted_only=step.predicted_only,
                    predict_seconds=step.predict_seconds,
                    learn_seconds=step.learn_seconds,
                    loss=step.loss,
                )
            shown = report if report is not None else learned[-1] if learned else None
            if quality is not None and shown is not None:
                metrics.set_records_since_last_label(trainer.records_since_label)
                metrics.set_prequential(quality)
                if (trainer.steps - 1) % self.config.health_every_steps == 0:
                    self._report_norm_health(metrics, shown)
        if metrics is None:
            self._dead_unreported.update(r.reason.value for r in rejected)
            return
        for reason, n in Counter(r.reason.value for r in rejected).items():
            metrics.dead_lettered(reason, n)
        unmatched = Counter(join.unmatched)
        fresh = unmatched - self._unmatched_reported
        self._unmatched_reported = unmatched
        metrics.observe_labels(
            pending=len(join.pending),
            delays=delays,
            expired=expired + evicted,
            unmatched=fresh,
        )

    def _learn_joined(
        self, join: LabelJoin, joined: Joined
    ) -> tuple[list[StepReport], list[RejectedRecord], list[float]]:
        """Learn the joined rows (one step), then, when labels were refused and another label of
        the same id waited, those rows again; returns the steps, the refused labels and the
        delays of the labels learned. Each step learned is a batch-log line listing its ids."""
        trainer = self.trainer
        steps: list[StepReport] = []
        refused: list[RejectedRecord] = []
        delays: list[float] = []
        while joined.ids:
            labels = [join.label_of(r) for r in joined.labels]
            step, problems = trainer.learn_delayed(joined.inputs(), labels, joined.served())
            steps.append(step)
            again, retry = join.settle(joined, problems)
            refused.extend(again)
            ok = [i for i in range(len(joined.ids)) if i not in problems]
            delays.extend(joined.delays[i] for i in ok)
            if self.batch_log is not None:
                ids = [joined.ids[i] for i in ok]
                self.batch_log.append(trainer.steps, segments_of(joined.labels), learned=ids)
            joined, _ = join.join((), retry)
        return steps, refused, delays

    def _after_step(
        self,
        batch: Batch,
        report: StepReport | None,
        rejected: list[RejectedRecord],
    ) -> None:
        """Everything that follows a step outside the lock: history, predictions out, metrics.
        ``report`` is None when no step was taken (only rejected records arrived)."""
        trainer = self.trainer
        metrics = self._ensure_metrics()
        if report is not None:
            self.history.add(
                self.records_read, report.size, trainer.metrics(), scored=scored_samples(trainer)
            )
            if self.predictions is not None and report.accepted:
                self._publish_predictions(report)
            since, every = trainer.records_since_label, UNLABELLED_WARN_EVERY
            delayed = self.label_join is not None  # labels come later by design
            if (
                not delayed
                and not report.trained
                and since // every > (since - report.predicted_only) // every
            ):
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
                metrics.set_expert_losses(trainer.expert_losses())
            # Steps 1, 1 + N, 1 + 2N, ... (``steps % N == 1`` never held for N = 1).
            if (trainer.steps - 1) % self.config.health_every_steps == 0:
                with self.model_lock.training():
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

    def _publish_predictions(
        self, report: StepReport, ids: Mapping[int, tuple[Any, float]] | None = None
    ) -> None:
        """One message per accepted record: the prediction, the model version, the record's
        coordinates and, with delayed labels, its id (``ids``: ``id(record)`` -> join id)."""
        version = {"checkpoint": self.checkpoint_version, "step": self.trainer.steps}
        predictions = report.predictions()
        for i, (record, prediction) in enumerate(zip(report.accepted, predictions, strict=True)):
            body: dict[str, Any] = {"prediction": prediction, "model_version": version}
            if ids is not None and id(record) in ids:
                body["id"] = ids[id(record)][0]
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
        """Refresh the lag metric every few seconds; each query is bounded by the source's
        ``lag_timeout_ms``, and while they fail (the broker away) they come ever less often (up to
        :data:`_LAG_MAX_BACKOFF_SECONDS`), so the loop loses little time to them. The metric keeps
        its last value meanwhile."""
        if not self.config.is_kafka or self.metrics is None:
            return
        now = self.clock()
        every = min(_LAG_EVERY_SECONDS * 2**self._lag_failures, _LAG_MAX_BACKOFF_SECONDS)
        if now - self._last_lag_time >= every:
            self._last_lag_time = now
            try:
                self.metrics.set_consumer_lag(self.source.lag())
            except SourceError as exc:
                self._lag_failures = min(self._lag_failures + 1, 8)
                log.warning("cannot read consumer lag (the metric keeps its last value): %s", exc)
            else:
                self._lag_failures = 0

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
            try:
                self.dead_letters.flush()
            except SourceError as exc:
                if not exc.retriable:
                    raise
                return self._checkpoint_failed(reason, exc)
            finally:
                self._count_dead_letter_refusals()
            # 2. save
            with self.model_lock.training():
                trainer_state = self.trainer.state_json()
                tensors = self.trainer.state_tensors()
            state = {
                "trainer": trainer_state,
                "service": {
                    "version": SERVICE_STATE_VERSION,
                    "run_name": self.config.run_name,
                    "batch_log_lines": self.batch_log.lines if self.batch_log is not None else 0,
                    "dead_lettered": dict(self.dead_lettered),
                    "origins": {k: self.origins.get(k) for k in sorted(offsets)},
                },
            }
            tensors = self.trainer.state_tensors()
            if self.label_join is not None:
                state["service"]["labels"] = self.label_join.state_json()
                tensors.update(self.label_join.state_tensors())
            checkpoint = Checkpoint(
                tensors=tensors,
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
                return self._checkpoint_failed(reason, exc)
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

    def _checkpoint_failed(self, reason: str, exc: StreamTrainerError) -> bool:
        self.checkpoint_failures += 1
        self._last_checkpoint_ok = False
        # The next attempt comes at the next trigger (records or seconds), not after every
        # batch: each attempt spends the store's retries, which would stall training.
        self._records_since_checkpoint = 0
        self._last_checkpoint_time = self.clock()
        if self.metrics is not None:
            self.metrics.checkpoint_failed()
        log.warning("checkpoint (%s) failed, training goes on without committing: %s", reason, exc)
        return False

    def _count_dead_letter_refusals(self) -> None:
        """Export the dead letters the broker refused (sent cut down) and those it refused even
        cut down (dropped) as counters."""
        sink: Any = self.dead_letters  # the Kafka sink counts refusals; a file has none
        if not hasattr(sink, "cut_down"):
            return
        if self._dead_letter_counters is None:
            from prometheus_client import Counter as PromCounter

            self._dead_letter_counters = (
                PromCounter(
                    "stream_trainer_dead_letters_cut_down",
                    "Dead letters the broker refused, sent again cut down (reason, coordinates, "
                    "first bytes, length and SHA-256)",
                    ["run", "reason"],
                    registry=self.registry,
                ),
                PromCounter(
                    "stream_trainer_dead_letters_undeliverable",
                    "Dead letters refused even cut down: dropped and logged",
                    ["run", "reason"],
                    registry=self.registry,
                ),
                Counter[str](),
                Counter[str](),
            )
        cut_metric, lost_metric, cut_seen, lost_seen = self._dead_letter_counters
        run = self.config.run_name
        for counts, seen, metric in ((sink.cut_down, cut_seen, cut_metric),
                                     (sink.undeliverable, lost_seen, lost_metric)):  # fmt: skip
            for reason, n in counts.items():
                if n > seen[reason]:
                    metric.labels(run=run, reason=reason).inc(n - seen[reason])
                    seen[reason] = n

    def _commit_metadata(self, offsets: dict[str, int], version: int) -> dict[str, str]:
        """Per partition, the metadata its committed offset carries (module docstring)."""
        return {
            key: json.dumps({"v": version, "origin": self.origins.get(key)}, separators=(",", ":"))
            for key in offsets
        }

    def _commit(self, offsets: dict[str, int], version: int) -> None:
        try:
            self.source.commit(offsets, self._commit_metadata(offsets, version))
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
            getattr(self._source, "close", None),
            getattr(self._dead_letters, "close", None),
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
        join = self.label_join
        if join is not None:
            report["delayed_labels"] = {
                "learned": join.learned,
                "pending": len(join.pending),
                "waiting_labels": len(join.early),
                "expired": join.expired,
                "unmatched": {k: n for k, n in sorted(join.unmatched.items()) if n},
            }
        return report


_MAX_COMMIT_METADATA = 1024


def _served(report: StepReport) -> list[np.ndarray | None]:
    """What each accepted record of ``report`` was served: its class probabilities, its value (a
    one-element array), or ``None`` before a model existed."""
    n = len(report.accepted)
    if report.proba is not None and report.proba.shape[1]:
        return list(report.proba.astype(np.float32))
    if report.values is not None:
        return list(np.asarray(report.values, dtype=np.float32).reshape(-1, 1))
    return [None] * n


def _parse_commit_metadata(note: str) -> tuple[int | None, int | None]:
    """``(checkpoint version, origin)`` from a committed offset's metadata; ``None`` for what is
    absent or malformed (offsets committed by an older release or another tool carry none)."""
    if not note or len(note) > _MAX_COMMIT_METADATA:
        return None, None
    try:
        data = json.loads(note)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    version, origin = data.get("v"), data.get("origin")
    ok_version = isinstance(version, int) and not isinstance(version, bool) and version > 0
    ok_origin = isinstance(origin, int) and not isinstance(origin, bool) and origin >= 0
    return (version if ok_version else None), (origin if ok_origin else None)


def _restored_origins(checkpoint: Checkpoint) -> dict[str, int | None]:
    """The origins a checkpoint holds; ``None`` for a partition it has an offset of but no origin
    (written before origins were kept)."""
    saved = checkpoint.state.get("service", {}).get("origins", {})
    out: dict[str, int | None] = dict.fromkeys(checkpoint.offsets)
    if isinstance(saved, dict):
        for key, origin in saved.items():
            ok = isinstance(origin, int) and not isinstance(origin, bool) and origin >= 0
            if isinstance(key, str) and ok:
                out[key] = origin
    return out


def batch_first_offset(batch: Batch, key: str, next_offset: int) -> int:
    """The smallest offset of partition ``key`` among the batch's messages; ``next_offset`` when
    it has none (a start position handed out alone)."""
    first = next_offset
    items: list[Record | RejectedRecord] = [*batch.records, *batch.rejected]
    for item in items:
        if item.offset is not None and f"{item.topic}:{item.partition}" == key:
            first = min(first, item.offset)
    return first
