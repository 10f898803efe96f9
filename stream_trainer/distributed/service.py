"""One replica of a data-parallel trainer group: :class:`TrainerService` in lock-step.

What changes against the single-process service (:mod:`stream_trainer.service.runner`):

* **Every turn is a collective.** Each replica polls (bounded by ``max_wait_ms``), then runs
  :meth:`DistributedTrainer.step` even with an empty batch. The step's exchange carries this
  replica's next offsets, its record counts and its control flags (stop requested, checkpoint
  wanted, caught up), so every replica takes the same decisions at the same turn: checkpoint if any
  replica wants one, stop if any replica was asked to stop (or, with ``--stop-at-end``, once every
  replica is caught up).
* **Offsets are everyone's.** After every step each replica knows the next offset of every
  partition any replica trained (:attr:`pending_offsets` is the same everywhere). A partition that
  moves to another replica in a Kafka rebalance is therefore sought to the offset after the last
  record trained from it, by whoever trained it: no record is trained twice, none is skipped.
* **One writer.** Rank 0 acquires the writer epoch and, at a checkpoint, saves (model, optimizer,
  statistics, every partition's next offset) and then commits those offsets for the group; the
  order of :mod:`stream_trainer.service.runner` is kept: every replica flushes its dead letters,
  all wait for each other, rank 0 saves, then commits, then the outcome is broadcast. The other
  replicas never acquire an epoch and hold a store that refuses to save (:class:`_ReadOnlyStore`);
  the real store would refuse them too (epoch 0 is never current).
* **Start.** Rank 0 acquires the epoch and loads the latest checkpoint that verifies; it broadcasts
  that version and every other replica loads exactly it, so all start identical.
* **Failure.** A replica that dies makes the others' next collective fail (or time out after
  ``dist_timeout_seconds``): they exit non-zero without saving anything more, and the launcher
  (``torchrun --max-restarts``) restarts the whole group from rank 0's last checkpoint.

Per-replica resources: the metrics server of rank ``r > 0`` listens on ``port + r``; its batch log
is ``<batch_log>.rank<r>`` and its report ``<report_json>.rank<r>`` (every replica logs a line
for every global step, possibly empty, so the line count in the checkpoint fits every log). A Kafka
source is required (a file would be read by every replica).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry

from stream_trainer.checkpoints import Checkpoint, CheckpointStore, Restored, open_store
from stream_trainer.distributed.collectives import Collectives
from stream_trainer.distributed.process_group import World, init_process_group
from stream_trainer.distributed.trainer import DistributedTrainer
from stream_trainer.errors import ConfigError, FencedWriterError
from stream_trainer.records import RejectedRecord
from stream_trainer.service.batch_log import segments_of
from stream_trainer.service.config import ServiceConfig
from stream_trainer.service.runner import TrainerService, batch_first_offset
from stream_trainer.threads import pin_threads

__all__ = ["DistributedTrainerService"]

log = logging.getLogger("stream_trainer.service")
T = TypeVar("T")


class _ReadOnlyStore:
    """The checkpoint store as replicas other than rank 0 see it: no epoch, no save, and
    :meth:`load_newest` restores the version rank 0 restored (received from rank 0)."""

    def __init__(self, store: CheckpointStore, comm: Collectives) -> None:
        self._store = store
        self._comm = comm

    def acquire_epoch(self, writer_id: str) -> int:
        return 0  # never current: the store itself would refuse a save with it

    def load_newest(self, restore: Callable[[Checkpoint], T]) -> Restored[T] | None:
        version = _broadcast_version(self._comm, None)
        if version is None:
            return None
        checkpoint = self._store.load(version)
        return Restored(checkpoint, restore(checkpoint))

    def save(self, checkpoint: Checkpoint) -> int:
        raise FencedWriterError("only rank 0 writes checkpoints")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _broadcast_version(comm: Collectives, version: int | None) -> int | None:
    t = torch.tensor([-1 if version is None else version], dtype=torch.int64)
    value = int(comm.broadcast_(t, src=0).item())
    return None if value < 0 else value


class DistributedTrainerService(TrainerService):
    """A replica of the group of ``comm`` (see the module docstring)."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        comm: Collectives,
        store: CheckpointStore | None = None,
        registry: CollectorRegistry | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        if not config.is_kafka:
            raise ConfigError("data-parallel replicas need a kafka:// source (got a file source)")
        self.comm = comm
        store = store if store is not None else open_store(config.checkpoint)
        if comm.rank != 0:
            store = _ReadOnlyStore(store, comm)
        super().__init__(
            _per_replica(config, comm.rank), store=store, registry=registry, clock=clock
        )
        if comm.rank == 0:
            _broadcast_version(comm, self.restored.version if self.restored is not None else None)
        self.dtrainer = DistributedTrainer(self.trainer, comm)
        self.writer_id = f"{self.writer_id}:rank{comm.rank}"

    @classmethod
    def join(cls, config: ServiceConfig, world: World, **kwargs: Any) -> DistributedTrainerService:
        """Join the process group of ``world`` (``torchrun``'s environment), then start."""
        comm = init_process_group(
            world, backend=config.dist_backend, timeout_seconds=config.dist_timeout_seconds
        )
        log.info("replica %d of %d joined the group", world.rank, world.world_size)
        return cls(config, comm=comm, **kwargs)

    def _instance_id(self) -> str | None:
        """Each replica is a member of the consumer group: ``<instance id>.rank<r>``."""
        base = super()._instance_id()
        return None if base is None else f"{base}.rank{self.comm.rank}"

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        c = self.config
        pin_threads(c.threads)
        log.info("starting replica %d/%d of run %r (epoch %d)", self.comm.rank,
                 self.comm.world_size, c.run_name, self.epoch)  # fmt: skip
        self._open_source()
        keep = None
        if self.restored is not None:
            keep = int(self.restored.state.get("service", {}).get("batch_log_lines", 0))
        elif c.batch_log:
            keep = 0
        if c.batch_log:
            from stream_trainer.service.batch_log import BatchLog

            self.batch_log = BatchLog(c.batch_log, keep_lines=keep)
        self._start_telemetry()
        self._ensure_metrics()
        end_at_start = self.source.end_offsets() if c.stop_at_end else {}
        started = time.perf_counter()
        samples_at_start = self.trainer.samples_trained
        stopping = False
        try:
            while True:
                batch = self.source.poll_batch()
                self._last_poll = self.clock()
                wanted = self._checkpoint_requested or ("interval" if self._due() else None)
                control = {
                    "stop": self.stop_event.is_set(),
                    "checkpoint": wanted,
                    "caught_up": bool(c.stop_at_end and self._caught_up(end_at_start)),
                }
                self._handle_everyone(batch, control)
                controls = [s["control"] for s in self.dtrainer.shared]
                reasons = [x["checkpoint"] for x in controls if x["checkpoint"]]
                if reasons:
                    self._checkpoint_requested = None
                    self.checkpoint(reasons[0])
                self._report_lag()
                if any(x["stop"] for x in controls):
                    stopping = True
                    break
                if c.stop_at_end and all(x["caught_up"] for x in controls):
                    log.info("every replica caught up with the end offsets seen at start: stopping")
                    break
            ok = self.checkpoint("shutdown" if stopping else "end")
        finally:
            self._close()
            if self._watchdog is not None:
                self._watchdog.cancel()
        elapsed = time.perf_counter() - started
        report = self._report(elapsed, self.trainer.samples_trained - samples_at_start)
        report["final_checkpoint_ok"] = ok
        report["rank"] = self.comm.rank
        report["world_size"] = self.comm.world_size
        return report

    def _caught_up(self, ends: dict[str, int]) -> bool:
        """Every partition trained (by any replica) up to the end offsets seen at start."""
        return all(self.pending_offsets.get(k, 0) >= end for k, end in ends.items() if end > 0)

    def _handle_everyone(self, batch: Any, control: dict[str, Any]) -> None:
        trainer = self.trainer
        share = {
            "offsets": batch.next_offsets,
            "starts": {
                key: batch_first_offset(batch, key, offset)
                for key, offset in batch.next_offsets.items()
                if key not in self.origins
            },
            "records": len(batch.records),
            "source_rejected": len(batch.rejected),
            "control": control,
        }
        with self._lock:
            with self.model_lock.training():
                report = self.dtrainer.step(batch.records, share=share)
            shared = self.dtrainer.shared
            stepped = sum(s["records"] for s in shared) > 0
            if stepped and self.batch_log is not None:
                self.batch_log.append(trainer.steps, segments_of(batch.records))
            rejected: list[RejectedRecord] = [*batch.rejected, *report.rejected]
            if rejected:
                self.dead_letters.send_many(rejected)
                self.dead_lettered.update(r.reason.value for r in rejected)
            for s in shared:
                for key, origin in s["starts"].items():
                    self.origins.setdefault(key, origin)
                for key, offset in s["offsets"].items():
                    self.pending_offsets[key] = max(offset, self.pending_offsets.get(key, offset))
            seen = sum(s["records"] + s["source_rejected"] for s in shared)
            self._records_since_checkpoint += seen
            self.records_read += seen
            self._dirty = self._dirty or seen > 0
        self._after_step(batch, report if report.size else None, rejected)

    # ------------------------------------------------------------------ checkpoint
    def checkpoint(self, reason: str) -> bool:
        """Collective: every replica flushes its dead letters; then rank 0 saves and commits
        (:meth:`TrainerService.checkpoint`, with every partition's offsets); then all learn the
        outcome. Returns False if the save failed."""
        self.dead_letters.flush()
        self.comm.all_reduce_(torch.zeros(1))  # every replica's dead letters are durable
        ok, version = False, -1
        if self.comm.rank == 0:
            ok = super().checkpoint(reason)
            version = self.checkpoint_version if self.checkpoint_version is not None else -1
        outcome = self.comm.broadcast_(torch.tensor([int(ok), version], dtype=torch.int64))
        ok, version = bool(outcome[0].item()), int(outcome[1].item())
        if self.comm.rank != 0:
            with self._lock:
                self._records_since_checkpoint = 0
                self._last_checkpoint_time = self.clock()
                self._last_checkpoint_ok = ok
                if ok:
                    self.saved_offsets = dict(self.pending_offsets)
                    self.checkpoint_version = version
                    self._dirty = False
                else:
                    self.checkpoint_failures += 1
        return ok


def _per_replica(config: ServiceConfig, rank: int) -> ServiceConfig:
    """Metrics port ``+ rank``, batch log and report ``.rank<r>`` for replicas other than 0."""
    if rank == 0:
        return config
    changes: dict[str, Any] = {}
    address = config.metrics_address
    if address.lower() not in ("", "off", "none"):
        host, _, port = address.rpartition(":")
        if port.isdigit() and int(port) != 0:
            changes["metrics_address"] = f"{host}:{int(port) + rank}"
    for name in ("batch_log", "report_json"):
        path = getattr(config, name)
        if path:
            changes[name] = f"{path}.rank{rank}"
    return replace(config, **changes) if changes else config
