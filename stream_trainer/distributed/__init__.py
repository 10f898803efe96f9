"""Scale-out: several trainer processes, one consumer group, one model (data parallel).

Run ``torchrun --nproc-per-node N -m stream_trainer run ...`` (no other change): each worker is a
replica that consumes its share of the partitions, and all replicas train *one* model in
lock-step. The design (details in ``docs/distributed.md``):

* **Lock-step steps** (:class:`DistributedTrainer`): every replica polls a batch with the bounded
  wait (``max_wait_ms``), then all exchange counts, schema, labels and next offsets (one JSON
  all-gather, never pickled); a batch that is empty everywhere is skipped, otherwise every replica
  runs the step, a replica without labelled rows on a placeholder row that weighs nothing.
* **Gradients** are all-reduced weighted by sample count, :math:`\\sum_r n_r g_r / N`
  (:class:`GradientAllReduce`): every replica steps on the same gradient, so the weights stay
  identical after every step.
* **Synchronized normalization** (:class:`SynchronizedMomentReducer`): ``batch``, ``ema_batch``
  and ``batch_renorm`` (and ``online``'s running moments) see the sums of the global batch, forward
  and backward; the feature and target standardizers merge the global batch with Chan's formula
  (:class:`SynchronizedStandardizer`).
* **Membership: fixed world size, restart on failure.** The group is formed once from the
  environment (:func:`world_from_env`, :func:`init_process_group`, with a collective timeout). A
  replica that dies makes the others' next collective fail (or time out): they exit non-zero
  without saving, and the launcher (``torchrun --max-restarts``, or the operator) restarts the
  whole group, which resumes from rank 0's last checkpoint. Kafka rebalances *inside* the fixed
  group (members joining at start, a slow member) are safe: every replica learns every
  partition's next offset at every step, so a newly assigned partition is sought to the offset
  after the last record any replica trained.
* **Checkpoints: one writer.** Rank 0 alone acquires the writer epoch, saves (with every
  partition's next offset) and commits; the others hold a store that refuses to save
  (:class:`~stream_trainer.distributed.service.DistributedTrainerService`).
"""

from __future__ import annotations

from stream_trainer.distributed.collectives import Collectives, LocalCollectives
from stream_trainer.distributed.process_group import World, init_process_group, world_from_env
from stream_trainer.distributed.sync import (
    GradientAllReduce,
    SynchronizedMomentReducer,
    SynchronizedStandardizer,
)
from stream_trainer.distributed.trainer import DistributedTrainer

__all__ = [
    "Collectives",
    "DistributedTrainer",
    "GradientAllReduce",
    "LocalCollectives",
    "SynchronizedMomentReducer",
    "SynchronizedStandardizer",
    "World",
    "init_process_group",
    "world_from_env",
]
