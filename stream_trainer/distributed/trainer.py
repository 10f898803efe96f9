"""Lock-step, data-parallel prequential steps over an :class:`IncrementalTrainer` per replica.

:meth:`DistributedTrainer.step` is :meth:`IncrementalTrainer.step` (same order: check, encode,
predict, score, learn) with the points where the replicas must agree made explicit. Every replica
calls it once per turn, with whatever its consumer polled (possibly nothing):

1. *task* (only while unknown): each replica proposes the task of its first labelled record; the
   lowest rank with a proposal wins (= the first record of the concatenated batch);
2. *screen* locally (rejected records stay local: they go to this replica's dead letters);
3. *exchange* (one JSON all-gather, no pickling): record / accepted / labelled counts, the schema
   entries this batch would add (new features, new categories, in arrival order), new class
   labels, rejection counts, and whatever the caller shares (the service: next offsets). Every
   replica applies the schema entries and, after the prediction, the class labels in rank order,
   so every replica has the same columns and the same output layer, in the same order that one
   process would give the concatenated batch (rank 0's records first). Counters (steps, samples,
   predicted-only, rejected) are global, so rank 0's checkpoint describes the whole group. When a
   field new in this step is a number on one replica and text on another, the lowest rank's kind
   wins, each replica rejects its records that disagree (``wrong_type``), and all exchange again;
4. *encode*: the feature statistics (a :class:`SynchronizedStandardizer`) fold in the global batch;
5. *predict* the local rows (serving mode, no collective) and *score*: the labelled rows' targets
   and served predictions are all-gathered, so every replica's prequential metrics are those of
   the concatenated batch (with each expert's errors, for the mixture's weights, and the labelled
   inputs, for the linear expert);
6. *learn* when any replica has a labelled row: a replica without one runs a one-row placeholder
   batch whose loss, batch statistics and gradient weigh zero, so the collectives of the forward
   (synchronized batch statistics), of the backward and of the gradient all-reduce line up;
   then every replica steps the linear expert through the gathered rows in rank order, as one
   process would through the concatenated batch.

A batch that is empty on every replica is skipped by all (the step counter does not move). The
trainer's own RNG state is broadcast from rank 0 after a step that drew from it (dropout), so
later growth draws the same numbers everywhere.

With ``LocalCollectives`` (world of one) a step is exactly :meth:`IncrementalTrainer.step` on the
trainer's autograd path (its distributed hooks are set, so the single-process compiled engine of
:mod:`stream_trainer.engine`, equal to rounding, is not used). The step is composed of the
trainer's own phases (screen, encode, :meth:`~IncrementalTrainer.predict_encoded`, score,
:meth:`~IncrementalTrainer.learn_encoded`) with the collectives in between.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stream_trainer.distributed.collectives import Collectives
from stream_trainer.distributed.sync import (
    GradientAllReduce,
    SynchronizedMomentReducer,
    SynchronizedStandardizer,
)
from stream_trainer.errors import ConfigError
from stream_trainer.features import FeatureEncoder
from stream_trainer.records import Record, RejectedRecord, RejectReason
from stream_trainer.training import IncrementalTrainer, StepReport
from stream_trainer.training.labels import infer_task
from stream_trainer.training.trainer import Served

__all__ = ["DistributedTrainer"]


class DistributedTrainer:
    """Wraps ``trainer`` (installing the hooks) for lock-step steps over ``comm``'s replicas."""

    def __init__(self, trainer: IncrementalTrainer, comm: Collectives) -> None:
        norm_options = trainer.config.norm_options.get("batch", {})
        if norm_options.get("track_running_stats") is False:
            raise ConfigError(
                "norm 'batch' with track_running_stats=False uses batch statistics when serving: "
                "it cannot be synchronized across replicas; keep the running statistics"
            )
        self.trainer = trainer
        self.comm = comm
        self.reducer = SynchronizedMomentReducer(comm)
        self.gradient_sync = GradientAllReduce(comm)
        self.shared: list[Any] = []
        self.exchange_seconds = 0.0
        trainer.moment_reducer = self.reducer
        trainer.gradient_sync = self.gradient_sync
        for member in trainer.members:  # restored: the layers exist already
            for _, layer in member.norm_layers():
                layer.moment_reducer = self.reducer
        trainer.encoder.scaler = SynchronizedStandardizer.wrap(comm, trainer.encoder.scaler)
        trainer.y_scaler = SynchronizedStandardizer.wrap(comm, trainer.y_scaler)

    # ------------------------------------------------------------------ schema
    def _new_schema_entries(self, values: list[dict[str, Any]]) -> list[list[Any]]:
        """``[name, value]`` pairs that register, in arrival order, the features and categories
        ``values`` would add (a numeric feature's value is given as ``0``)."""
        encoder = self.trainer.encoder
        kinds, categories = encoder.kinds, encoder.categories
        unseen = False
        for value in values:
            for name, v in value.items():
                kind = kinds.get(name)
                if v is not None and (
                    kind is None or (kind == "cat" and v not in categories[name])
                ):
                    unseen = True
                    break
            if unseen:
                break
        if not unseen:
            return []
        probe = FeatureEncoder.from_state(encoder.state())
        before = probe.n_columns
        probe._learn_schema(values)
        by_column: dict[int, list[Any]] = {}
        for name, slot in probe.numeric.items():
            if probe.numeric_columns[slot] >= before:
                by_column[probe.numeric_columns[slot]] = [name, 0]
        for name, cats in probe.categories.items():
            for cat, column in cats.items():
                if column >= before:
                    by_column[column] = [name, cat]
        return [by_column[c] for c in sorted(by_column)]

    def _exchange(
        self,
        records: Sequence[Record],
        accepted: list[Record],
        labels: list[Any],
        report: StepReport,
        share: Mapping[str, Any] | None,
    ) -> list[dict[str, Any]]:
        """Step 3's all-gather: every replica's entry (this one's at its rank)."""
        t = self.trainer
        labelled = [i for i, y in enumerate(labels) if y is not None]
        new_classes: list[str] = []
        if t.task != "regression":
            for i in labelled:
                if labels[i] not in t.class_index and labels[i] not in new_classes:
                    new_classes.append(labels[i])
        values = [r.value for r in accepted]
        mine = {
            "records": len(records),
            "accepted": len(accepted),
            "labelled": len(labelled),
            "schema": self._new_schema_entries(values) if values else [],
            "classes": new_classes,
            "rejected": dict(_count_reasons(report)),
            "share": dict(share) if share is not None else None,
        }
        return self.comm.all_gather_json(mine)

    # ------------------------------------------------------------------ step
    def step(self, records: Sequence[Record], share: Mapping[str, Any] | None = None) -> StepReport:
        """One lock-step prequential step (module docstring); ``share`` (JSON) is all-gathered
        with the step's exchange and left in :attr:`shared` (one entry per rank)."""
        t = self.trainer
        comm = self.comm
        report = StepReport(size=len(records))
        if t.task is None:
            t.task = self._agree_on_task(records)
        accepted, labels = t.screen(records, report.rejected)
        t0 = time.perf_counter()
        everyone = self._exchange(records, accepted, labels, report, share)
        kinds = _conflicting_kinds(everyone)
        if kinds:
            # A field new in this step is a number on one replica and text on another: the first
            # rank's kind wins (as the schema is applied), the records that disagree are rejected
            # here, and every replica exchanges again (each one saw the same conflict).
            accepted, labels = _reject_disagreeing(t, accepted, labels, kinds, report)
            everyone = self._exchange(records, accepted, labels, report, share)
        self.exchange_seconds += time.perf_counter() - t0
        report.accepted = accepted
        values = [r.value for r in accepted]
        labelled = [i for i, y in enumerate(labels) if y is not None]
        self.shared = [e["share"] for e in everyone]
        for rank, entry in enumerate(everyone):
            if rank != comm.rank:
                t.rejected.update(entry["rejected"])
        if sum(e["records"] for e in everyone) == 0:
            return report
        t.steps += 1
        if sum(e["accepted"] for e in everyone) == 0:
            return report

        # 3. the schema of the concatenated batch, then 4. its feature statistics
        pairs = [pair for e in everyone for pair in e["schema"]]
        if pairs:
            t.encoder._learn_schema([{name: v} for name, v in pairs])
        if values:
            x = t.encoder.fit_transform(values)
        else:
            x = np.zeros((0, t.encoder.n_columns), dtype=np.float32)
            if t.encoder.numeric:
                t.encoder.scaler.update(np.zeros((0, len(t.encoder.numeric)), dtype=np.float64))
        if t.model is not None and x.shape[1] != t.model.in_features:
            t.grow(x.shape[1])

        n_labelled = [int(e["labelled"]) for e in everyone]
        total_labelled = sum(n_labelled)
        n_accepted = sum(int(e["accepted"]) for e in everyone)
        report.trained = len(labelled)
        report.predicted_only = len(accepted) - len(labelled)
        t.predicted_only += n_accepted - total_labelled
        idx: np.ndarray | None = None
        if len(labelled) < len(accepted):
            idx = np.asarray(labelled, dtype=np.int64)

        # 5. predict (local), then score with everyone's labelled rows
        t0 = time.perf_counter()
        served = Served()
        if accepted:  # serving mode: no collective (see the module docstring)
            served = t.predict_encoded(x, report, idx if labelled else np.zeros(0, np.int64))
        report.classes = list(t.classes)
        report.predict_seconds = time.perf_counter() - t0
        if total_labelled == 0:
            return report

        target: np.ndarray
        # the labelled inputs travel with the targets when there is a linear expert to step
        x_mine = (x if idx is None else x[idx]).astype(np.float64)
        if not t.config.linear_expert:
            x_mine = x_mine[:, :0]
        # a mixture to weigh, scored and served in lock-step
        experts = len(t.expert_names) > 1 and t.model is not None
        if t.task == "regression":
            y = np.asarray([labels[i] for i in labelled], dtype=np.float64)
            # Every replica has the model or none has (lock-step): without it, unscored.
            served_y = report.values if report.values is not None else np.zeros(len(accepted))
            served_y = served_y if idx is None else served_y[idx]
            losses = (
                self._expert_losses(served.experts, y, idx)
                if experts
                else np.zeros((len(labelled), 0))
            )
            rows = comm.all_gather_rows(
                np.concatenate([np.stack([y, served_y], axis=1), losses, x_mine], axis=1),
                n_labelled,
            )
            t.reg_metrics.update(rows[:, 0], rows[:, 1] if t.model is not None else None)
            t.y_scaler.update(y[:, None])
            target = y
            global_target, rest = rows[:, 0], rows[:, 2:]
        else:
            t.add_classes(c for e in everyone for c in e["classes"])
            target = t.class_targets([labels[i] for i in labelled])
            proba = report.proba
            width = t.model.out_features if t.model is not None else 0
            served_p = np.zeros((len(labelled), width))
            if proba is not None and labelled:
                served_p = proba if idx is None else proba[idx]
            losses = (
                self._expert_losses(served.experts, target, idx)
                if experts
                else np.zeros((len(labelled), 0))
            )
            rows = comm.all_gather_rows(
                np.concatenate(
                    [target[:, None].astype(np.float64), served_p, losses, x_mine], axis=1
                ),
                n_labelled,
            )
            global_target = rows[:, 0].astype(np.int64)
            t.cls_metrics.update(global_target, rows[:, 1 : 1 + width] if width else None)
            rest = rows[:, 1 + width :]
        if experts:  # the mixture's weights from the whole batch's expert losses
            t.mixture.observe(rest[:, : losses.shape[1]].sum(axis=0), total_labelled)
        global_x = rest[:, losses.shape[1] :]

        # 6. learn, in lock-step
        t1 = time.perf_counter()
        if labelled:
            with self.reducer.synchronized():
                report.loss = t.learn_encoded(
                    x if idx is None else x[idx], target, served.take_graph()
                )
        else:
            self._placeholder_learn()
        # every replica steps the linear expert through the whole batch: one process's steps
        t._learn_expert(global_x, global_target)
        report.learn_seconds = time.perf_counter() - t1
        t.samples_trained += total_labelled
        if t.model is not None and t.model.uses_rng:
            t._rng_state = comm.broadcast_(t._rng_state.clone(), src=0)
        return report

    def _expert_losses(
        self,
        outputs: np.ndarray | None,
        y: np.ndarray,
        idx: np.ndarray | None,
    ) -> np.ndarray:
        """This replica's per-row expert losses (``outputs``, see
        :class:`~stream_trainer.training.trainer.Served`) on its labelled rows (none: zero
        rows)."""
        t = self.trainer
        if outputs is None:  # no accepted row here this step
            return np.zeros((len(y), len(t.expert_names)))
        if idx is not None:
            outputs = outputs[:, idx]
        return t._expert_losses(outputs, y)

    def _agree_on_task(self, records: Sequence[Record]) -> str | None:
        t = self.trainer
        guess = None
        for record in records:
            if t._check(record) is None:
                raw = record.value.get(t.target)
                if raw is not None and raw != "":
                    guess = infer_task(raw)
                    break
        return next((g for g in self.comm.all_gather_json(guess) if g is not None), None)

    def _placeholder_learn(self) -> None:
        """Run the learning step on one zero row that weighs nothing (no labelled row here)."""
        t = self.trainer
        x = np.zeros((1, t.encoder.n_columns), dtype=np.float32)
        y = np.zeros(1, dtype=np.float64 if t.task == "regression" else np.int64)
        self.gradient_sync.placeholder = True
        try:
            with self.reducer.synchronized(placeholder=True):
                t.learn_encoded(x, y)
        finally:
            self.gradient_sync.placeholder = False
        t.last_loss = None


def _entry_kind(value: Any) -> str:
    """The kind a schema entry registers: ``[name, 0]`` a number, ``[name, category]`` text."""
    return "cat" if isinstance(value, str) else "num"


def _conflicting_kinds(everyone: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``{field: winning kind}`` for the fields whose schema entries disagree across replicas
    (the first entry in rank order wins); empty when they all agree. Every replica computes it
    from the same gathered entries, so all of them take the same branch."""
    first: dict[str, str] = {}
    conflicts: set[str] = set()
    for entry in everyone:
        for name, value in entry["schema"]:
            kind = _entry_kind(value)
            if first.setdefault(name, kind) != kind:
                conflicts.add(name)
    return {name: first[name] for name in conflicts}


def _reject_disagreeing(
    trainer: IncrementalTrainer,
    accepted: list[Record],
    labels: list[Any],
    kinds: Mapping[str, str],
    report: StepReport,
) -> tuple[list[Record], list[Any]]:
    """``accepted`` and ``labels`` without the records whose value of a field in ``kinds`` is of
    the other kind; those are rejected (``wrong_type``) into ``report`` and counted."""
    kept: list[Record] = []
    kept_labels: list[Any] = []
    for record, label in zip(accepted, labels, strict=True):
        wrong = next(
            (
                name
                for name, kind in kinds.items()
                if (v := record.value.get(name)) is not None and _entry_kind(v) != kind
            ),
            None,
        )
        if wrong is None:
            kept.append(record)
            kept_labels.append(label)
            continue
        want = "a number" if kinds[wrong] == "num" else "a string"
        detail = f"feature {wrong!r} must be {want} (another replica's records decided it)"
        report.rejected.append(RejectedRecord.of(record, RejectReason.WRONG_TYPE, detail))
        trainer.rejected[RejectReason.WRONG_TYPE.value] += 1
    return kept, kept_labels


def _count_reasons(report: StepReport) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in report.rejected:
        out[r.reason.value] = out.get(r.reason.value, 0) + 1
    return out
