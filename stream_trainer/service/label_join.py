"""Delayed labels in the service: records predicted now, learned when their label arrives.

A record carries an id (``id_field``). When its features arrive the service predicts it (one
trainer step without a label: the feature statistics learn from it, the served prediction goes out
with the id) and keeps its *encoded* row and what it served here, in the pending store. A label is
a record ``{id, <target>}``: on the labels topic, or, with the labels on the source itself, a
record that has the id and the target and no other field. When it arrives it joins the pending row
of its id, and the rows joined in one batch are learned in one optimizer step
(:meth:`~stream_trainer.training.IncrementalTrainer.learn_delayed`), scoring the prediction that
was served. A label that arrives before its features (the two topics are read at their own pace)
waits for them in the same way.

Time and expiry
---------------
A record's time is its Kafka timestamp (seconds), or the wall clock when it was read when it has
none. A side's *watermark* is the smallest, over the partitions of that side read so far, of the
latest time read from each (so one partition read ahead of another does not move it). Each side
expires by the progress of the *other* side, so a stream that is read late does not expire what
is waiting on it: a pending row expires once the labels' watermark passes the row's time plus
``timeout_seconds``, and a label waiting for its features once the features' watermark passes the
label's time plus ``timeout_seconds``. A partition that stops receiving records holds its side's
watermark back; the bound below still applies. Both stores are bounded by
``max_pending``: past it the oldest entry goes (a row counted *expired*, a label *unmatched*).
Expiry walks each store in arrival order and stops at the first entry that is not due, so an entry
behind a later one goes when that one does.

Hostile ids and labels
----------------------
An id is a string of at most :data:`MAX_ID_LENGTH` characters or an integer of at most 63 bits;
anything else rejects the record (``bad_id``). A features record whose id is pending, or was
learned among the last ``max_pending`` joins, or repeats in its batch, is rejected
(``duplicate_id``); so is a label for an id that already has a label waiting or was learned
recently. A label the trainer refuses (``bad_label``, ``too_large``, ``out_of_range``,
``too_many_classes``) is rejected and its row goes back to wait for another label. Every rejected
label is counted as unmatched by reason; every rejected record is dead-lettered by the service.

Exactly once
------------
The whole store (rows as safetensors tensors, the rest as JSON; :meth:`LabelJoin.state_tensors`,
:meth:`LabelJoin.state_json`) is saved in the checkpoint beside the model, and the labels topic's
offsets are committed with the features topic's: the labels topic is read by the same consumer, so
a restored process re-reads exactly the records its checkpoint has not seen, and each label is
learned once, with the row it joined.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

import numpy as np
import torch

from stream_trainer.checkpoints.validation import CheckpointInvalidError
from stream_trainer.errors import ConfigError
from stream_trainer.records import Record, RejectedRecord, RejectReason

__all__ = [
    "LABEL_STATE_VERSION",
    "MAX_ID_LENGTH",
    "MAX_STORED_PENDING",
    "Joined",
    "LabelJoin",
    "SplitBatch",
    "validate_label_state",
]

LABEL_STATE_VERSION: Final = 1
MAX_ID_LENGTH: Final = 256
"""Longest string id, in characters."""
MAX_STORED_PENDING: Final = 1 << 24
"""Most entries a stored pending state may hold (each store)."""
_MAX_WIDTH: Final = 1 << 24
_ID_LIMIT: Final = 1 << 63
_TENSORS: Final = ("pending.x", "pending.served", "pending.served_width")

JoinId = str | int


def check_id(value: Any) -> JoinId | tuple[RejectReason, str]:
    """``value`` as a join id, or ``(bad_id, detail)``."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return RejectReason.BAD_ID, f"id must be a string or an integer, got {type(value).__name__}"
    if isinstance(value, int) and not -_ID_LIMIT <= value < _ID_LIMIT:
        return RejectReason.BAD_ID, "id is an integer beyond 64 bits"
    if isinstance(value, str) and not 0 < len(value) <= MAX_ID_LENGTH:
        return RejectReason.BAD_ID, f"id must have 1 to {MAX_ID_LENGTH} characters"
    return value


@dataclass(slots=True)
class _Row:
    """A pending record: its encoded features, what it was served, its time."""

    x: np.ndarray
    served: np.ndarray | None
    time: float


@dataclass(slots=True)
class _Label:
    """A label read before its features (or one whose features are still to come)."""

    record: Record
    time: float


@dataclass
class SplitBatch:
    """One batch sorted for the join: features records (the id removed), labels, rejections."""

    features: list[Record] = field(default_factory=list)
    # id(features record) -> (join id, record time)
    ids: dict[int, tuple[JoinId, float]] = field(default_factory=dict)
    labels: list[tuple[JoinId, Record, float]] = field(default_factory=list)
    rejected: list[RejectedRecord] = field(default_factory=list)


@dataclass
class Joined:
    """Rows whose label arrived, in the order the labels did (one learning step)."""

    ids: list[JoinId] = field(default_factory=list)
    rows: list[_Row] = field(default_factory=list)
    labels: list[Record] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)

    def inputs(self) -> np.ndarray:
        """The rows as one ``(n, w)`` float32 matrix, narrower rows padded with zeros."""
        width = max((r.x.shape[0] for r in self.rows), default=0)
        out = np.zeros((len(self.rows), width), dtype=np.float32)
        for i, row in enumerate(self.rows):
            out[i, : row.x.shape[0]] = row.x
        return out

    def served(self) -> list[np.ndarray | None]:
        return [row.served for row in self.rows]


class LabelJoin:
    """The pending store and the join of delayed labels (see the module docstring).

    Parameters
    ----------
    id_field
        The field that carries a record's id (removed before the record reaches the trainer).
    target
        The label field.
    labels_topic
        The topic labels arrive on; ``None``: on the source itself, as ``{id, <target>}``.
    max_pending
        Most rows waiting for a label (and most labels waiting for features).
    timeout_seconds
        How long, in record time, a row waits for its label (and a label for its features).
    wall_clock
        Seconds since the epoch, for records without a timestamp.
    check_label
        ``label value -> (reason, detail)`` for a label to refuse as it arrives, ``None`` to keep
        it (the service screens it as the trainer will); the trainer screens it again when it
        learns it.
    """

    def __init__(
        self,
        id_field: str,
        target: str,
        *,
        labels_topic: str | None = None,
        max_pending: int = 100_000,
        timeout_seconds: float = 3600.0,
        wall_clock: Callable[[], float] = time.time,
        check_label: Callable[[Any], tuple[RejectReason, str] | None] | None = None,
    ) -> None:
        if not id_field or id_field == target:
            raise ConfigError(f"id_field must be a field other than the target, got {id_field!r}")
        if max_pending < 1:
            raise ConfigError(f"max_pending must be >= 1, got {max_pending!r}")
        if not timeout_seconds > 0:
            raise ConfigError(f"label_timeout_seconds must be > 0, got {timeout_seconds!r}")
        self.id_field = id_field
        self.target = target
        self.labels_topic = labels_topic
        self.max_pending = max_pending
        self.timeout_seconds = float(timeout_seconds)
        self.wall_clock = wall_clock
        self.check_label = check_label
        self.pending: OrderedDict[JoinId, _Row] = OrderedDict()
        self.early: OrderedDict[JoinId, _Label] = OrderedDict()
        self.recent: OrderedDict[JoinId, None] = OrderedDict()  # ids learned lately
        # Per side, partition key -> latest record time read from it (module docstring).
        self.latest: dict[str, dict[str, float]] = {"features": {}, "labels": {}}
        self.expired = 0
        self.learned = 0
        self.unmatched: Counter[str] = Counter()

    # ------------------------------------------------------------------ sorting a batch
    def split(self, records: Sequence[Record]) -> SplitBatch:
        """Sort ``records`` into features records (the id removed from their value, in place; an
        id checked and new) and labels (an id checked, a label present), rejecting the others
        (bad and duplicate ids, missing labels); advances the watermarks."""
        out = SplitBatch()
        seen: set[JoinId] = set()
        features, labels = self.latest["features"], self.latest["labels"]
        now: float | None = None
        keys: dict[tuple[str | None, int | None], str] = {}
        id_field, target, labels_topic = self.id_field, self.target, self.labels_topic
        same_stream = labels_topic is None
        for record in records:
            ms = record.timestamp_ms
            if ms is not None and ms >= 0:
                t = ms / 1000.0
            else:
                t = now = self.wall_clock() if now is None else now
            value = record.value
            if not same_stream:
                is_label = record.topic == labels_topic
            else:  # {id, <target>} and nothing else, both present
                is_label = len(value) == 2 and id_field in value and target in value
            where = (record.topic, record.partition)
            key = keys.get(where)
            if key is None:
                key = keys[where] = f"{record.topic}:{record.partition}"
            if (is_label or same_stream) and t > labels.get(key, -math.inf):
                labels[key] = t
            if not is_label and t > features.get(key, -math.inf):
                features[key] = t
            raw = value.get(id_field)
            if raw is None and not is_label:
                out.features.append(record)  # no id: predicted only, or learned inline
                continue
            join_id = raw if type(raw) is int and -_ID_LIMIT <= raw < _ID_LIMIT else check_id(raw)
            if isinstance(join_id, tuple):
                self._reject(out, record, join_id, label=is_label)
                continue
            if is_label:
                label = value.get(target)
                if label is None or label == "":
                    problem = (RejectReason.BAD_LABEL, "the label is missing")
                    self._reject(out, record, problem, label=True)
                else:
                    out.labels.append((join_id, record, t))
                continue
            if join_id in self.pending or join_id in self.recent or join_id in seen:
                detail = f"id {join_id!r} is already pending or learned"
                self._reject(out, record, (RejectReason.DUPLICATE_ID, detail), label=False)
                continue
            seen.add(join_id)
            del value[id_field]  # the id is no feature (the raw bytes keep it for dead letters)
            out.features.append(record)
            out.ids[id(record)] = (join_id, t)
        return out

    def watermark(self, side: str) -> float:
        """The time ``side`` (``features`` or ``labels``) has reached on every partition read."""
        latest = self.latest[side]
        return min(latest.values()) if latest else -math.inf

    def _reject(
        self, out: SplitBatch, record: Record, problem: tuple[RejectReason, str], *, label: bool
    ) -> None:
        out.rejected.append(RejectedRecord.of(record, *problem))
        if label:
            self.unmatched[problem[0].value] += 1

    # ------------------------------------------------------------------ the join
    def hold(
        self,
        accepted: Sequence[Record],
        ids: Mapping[int, tuple[JoinId, float]],
        inputs: np.ndarray | None,
        served: Sequence[np.ndarray | None],
    ) -> tuple[int, list[JoinId]]:
        """Keep the unlabelled ``accepted`` records that carry an id, with their encoded rows
        (``inputs``) and served predictions (float32, as the checkpoint stores them, so that a
        restored row scores as the live one); returns how many rows the bound evicted, and the
        ids whose label was already waiting (for :meth:`join`)."""
        evicted = 0
        ready: list[JoinId] = []
        early = self.early
        target, pending = self.target, self.pending
        for i, record in enumerate(accepted):
            entry = ids.get(id(record))
            if entry is None or record.value.get(target) not in (None, ""):
                continue  # no id, or labelled inline (learned in its own step)
            assert inputs is not None
            kept = served[i]
            if kept is not None and kept.dtype != np.float32:
                kept = kept.astype(np.float32)
            pending[entry[0]] = _Row(inputs[i].copy(), kept, entry[1])
            if entry[0] in early:
                ready.append(entry[0])
            if len(pending) > self.max_pending:
                pending.popitem(last=False)
                self.expired += 1
                evicted += 1
        return evicted, ready

    def join(
        self, labels: Sequence[tuple[JoinId, Record, float]], ready: Sequence[JoinId] = ()
    ) -> tuple[Joined, list[RejectedRecord]]:
        """Join the labels that arrived, and those that waited for the rows now pending
        (``ready``, from :meth:`hold`), with their rows, removing both. A label without its row
        waits (bounded), once ``check_label`` accepts it; a joined label is screened by the
        trainer when it learns it. Returns the joined rows and the labels rejected (duplicates,
        refused labels)."""
        joined = Joined()
        rejected: list[RejectedRecord] = []
        for join_id in ready:
            label = self.early.pop(join_id, None)
            if label is not None and join_id in self.pending:
                self._take(joined, join_id, label.record, label.time)
        for join_id, record, t in labels:
            if join_id in self.pending:
                self._take(joined, join_id, record, t)
            elif join_id in self.early or join_id in self.recent:
                detail = f"id {join_id!r} already has its label"
                rejected.append(RejectedRecord.of(record, RejectReason.DUPLICATE_ID, detail))
                self.unmatched[RejectReason.DUPLICATE_ID.value] += 1
            else:
                check = self.check_label
                problem = None if check is None else check(record.value.get(self.target))
                if problem is not None:
                    rejected.append(RejectedRecord.of(record, *problem))
                    self.unmatched[problem[0].value] += 1
                    continue
                self.early[join_id] = _Label(record, t)
                if len(self.early) > self.max_pending:
                    self.early.popitem(last=False)
                    self.unmatched["unknown_id"] += 1
        return joined, rejected

    def _take(self, joined: Joined, join_id: JoinId, record: Record, t: float) -> None:
        row = self.pending.pop(join_id)
        joined.ids.append(join_id)
        joined.rows.append(row)
        joined.labels.append(record)
        joined.delays.append(max(0.0, t - row.time))

    def settle(
        self, joined: Joined, problems: Mapping[int, tuple[RejectReason, str]]
    ) -> tuple[list[RejectedRecord], list[JoinId]]:
        """After the trainer learned ``joined``: the learned ids are remembered (duplicates of
        them are refused, a second label of one that came in the same batch too), the refused
        labels are rejected and their rows wait again. Returns
        the rejected labels and the ids of the rows back in the store whose next label already
        waits (joined again by ``join((), ready=...)``)."""
        rejected: list[RejectedRecord] = []
        retry: list[JoinId] = []
        for i, join_id in enumerate(joined.ids):
            problem = problems.get(i)
            if problem is None:
                self.recent[join_id] = None
                self.learned += 1
                repeat = self.early.pop(join_id, None)  # a second label in the same batch
                if repeat is not None:
                    detail = f"id {join_id!r} already has its label"
                    rejected.append(
                        RejectedRecord.of(repeat.record, RejectReason.DUPLICATE_ID, detail)
                    )
                    self.unmatched[RejectReason.DUPLICATE_ID.value] += 1
                continue
            self.pending[join_id] = joined.rows[i]
            rejected.append(RejectedRecord.of(joined.labels[i], *problem))
            self.unmatched[problem[0].value] += 1
            if join_id in self.early:
                retry.append(join_id)
        while len(self.recent) > self.max_pending:
            self.recent.popitem(last=False)
        return rejected, retry

    def expire(self) -> tuple[int, int]:
        """Drop the rows and waiting labels that are due (module docstring); returns
        ``(rows expired, labels unmatched)``."""
        rows = labels = 0
        limit = self.watermark("labels") - self.timeout_seconds
        while self.pending and next(iter(self.pending.values())).time < limit:
            self.pending.popitem(last=False)
            rows += 1
        limit = self.watermark("features") - self.timeout_seconds
        while self.early and next(iter(self.early.values())).time < limit:
            self.early.popitem(last=False)
            labels += 1
        self.expired += rows
        self.unmatched["unknown_id"] += labels
        return rows, labels

    def label_of(self, record: Record) -> Any:
        return record.value.get(self.target)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The pending rows (zero-padded to the widest) and served predictions (padded; the
        width of each in ``pending.served_width``, ``-1`` for none) as tensors."""
        rows = list(self.pending.values())
        width = max((r.x.shape[0] for r in rows), default=0)
        k = max((r.served.shape[0] for r in rows if r.served is not None), default=0)
        x = np.zeros((len(rows), width), dtype=np.float32)
        served = np.zeros((len(rows), k), dtype=np.float32)
        widths = np.full(len(rows), -1, dtype=np.int64)
        for i, row in enumerate(rows):
            x[i, : row.x.shape[0]] = row.x
            if row.served is not None:
                served[i, : row.served.shape[0]] = row.served
                widths[i] = row.served.shape[0]
        return {
            "pending.x": torch.from_numpy(x),
            "pending.served": torch.from_numpy(served),
            "pending.served_width": torch.from_numpy(widths),
        }

    def state_json(self) -> dict[str, Any]:
        return {
            "version": LABEL_STATE_VERSION,
            "ids": list(self.pending),
            "times": [r.time for r in self.pending.values()],
            "early": [
                [
                    k,
                    lab.record.value.get(self.target),
                    lab.time,
                    lab.record.topic,
                    lab.record.partition,
                    lab.record.offset,
                ]
                for k, lab in self.early.items()
            ],
            "recent": list(self.recent),
            "latest": {side: dict(times) for side, times in self.latest.items()},
            "expired": self.expired,
            "learned": self.learned,
            "unmatched": dict(self.unmatched),
        }

    def load(self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> int:
        """Take a stored state (validated first: :func:`validate_label_state`); returns how many
        rows a smaller ``max_pending`` than the stored count evicted (counted expired)."""
        validate_label_state(tensors, state)
        x = tensors["pending.x"].numpy()
        served = tensors["pending.served"].numpy()
        widths = tensors["pending.served_width"].numpy()
        self.pending = OrderedDict(
            (
                join_id,
                _Row(x[i].copy(), None if widths[i] < 0 else served[i, : widths[i]].copy(), t),
            )
            for i, (join_id, t) in enumerate(zip(state["ids"], state["times"], strict=True))
        )
        self.early = OrderedDict()
        for join_id, label, t, topic, partition, offset in state["early"]:
            value = {self.id_field: join_id, self.target: label}
            record = Record(value, topic=topic, partition=partition, offset=offset)
            self.early[join_id] = _Label(record, float(t))
        self.recent = OrderedDict.fromkeys(state["recent"])
        self.latest = {side: dict(state["latest"][side]) for side in ("features", "labels")}
        self.expired = state["expired"]
        self.learned = state["learned"]
        self.unmatched = Counter(state["unmatched"])
        evicted = 0
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)
            evicted += 1
        while len(self.early) > self.max_pending:
            self.early.popitem(last=False)
            self.unmatched["unknown_id"] += 1
        while len(self.recent) > self.max_pending:
            self.recent.popitem(last=False)
        self.expired += evicted
        return evicted


def split_label_tensors(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(the trainer's tensors, the pending store's)`` of a checkpoint."""
    trainer = {k: v for k, v in tensors.items() if not k.startswith("pending.")}
    pending = {k: v for k, v in tensors.items() if k.startswith("pending.")}
    return trainer, pending


def validate_label_state(tensors: Mapping[str, torch.Tensor], state: Any) -> None:
    """Check a stored pending state before any of it is used; raises
    :class:`~stream_trainer.checkpoints.CheckpointInvalidError` (reason ``state`` or
    ``tensors``)."""
    if not isinstance(state, Mapping):
        _fail("the label state is not an object")
    if state.get("version") != LABEL_STATE_VERSION:
        _fail(f"label state version {state.get('version')!r} (this release reads 1)")
    if sorted(tensors) != sorted(_TENSORS):
        _fail(f"pending tensors are {sorted(tensors)}, expected {list(_TENSORS)}", "tensors")
    x, served, widths = (tensors[name] for name in _TENSORS)
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] > _MAX_WIDTH:
        _fail(f"pending.x is {x.dtype} {tuple(x.shape)}", "tensors")
    if served.dtype != torch.float32 or served.dim() != 2 or served.shape[1] > _MAX_WIDTH:
        _fail(f"pending.served is {served.dtype} {tuple(served.shape)}", "tensors")
    if widths.dtype != torch.int64 or widths.dim() != 1:
        _fail(f"pending.served_width is {widths.dtype} {tuple(widths.shape)}", "tensors")
    n = x.shape[0]
    if served.shape[0] != n or widths.shape[0] != n:
        _fail("pending tensors disagree on the number of rows", "tensors")
    if not (torch.isfinite(x).all() and torch.isfinite(served).all()):
        _fail("pending tensors hold NaN or infinite values", "tensors")
    if n and not ((widths >= -1).all() and (widths <= served.shape[1]).all()):
        _fail("pending.served_width out of range", "tensors")
    ids = _ids(state.get("ids"), "ids")
    if len(ids) != n or len(set(ids)) != n:
        _fail(f"{len(ids)} pending ids (unique: {len(set(ids))}) for {n} rows")
    times = state.get("times")
    if not isinstance(times, list) or len(times) != n or not all(_is_time(t) for t in times):
        _fail("pending times must be one finite number per row")
    early = state.get("early")
    if not isinstance(early, list) or len(early) > MAX_STORED_PENDING:
        _fail("early labels must be a list")
    for entry in early:
        ok = isinstance(entry, list) and len(entry) == 6
        if ok:
            join_id, label, t, topic, partition, offset = entry
            ok = (
                not isinstance(check_id(join_id), tuple)
                and (label is None or isinstance(label, str | int | float))
                and (not isinstance(label, float) or math.isfinite(label))
                and _is_time(t)
                and (topic is None or isinstance(topic, str))
                and (partition is None or _is_count(partition))
                and (offset is None or _is_count(offset))
            )
        if not ok:
            _fail(f"bad early label entry {str(entry)[:80]}")
    if len({e[0] for e in early}) != len(early):
        _fail("early labels repeat an id")
    recent = _ids(state.get("recent"), "recent")
    if len(set(recent)) != len(recent):
        _fail("recent ids repeat")
    latest = state.get("latest")
    if not (
        isinstance(latest, dict)
        and sorted(latest) == ["features", "labels"]
        and all(
            isinstance(times, dict)
            and len(times) <= MAX_STORED_PENDING
            and all(isinstance(k, str) and _is_time(t) for k, t in times.items())
            for times in latest.values()
        )
    ):
        _fail("latest must map features and labels to {partition: time}")
    if not (_is_count(state.get("expired")) and _is_count(state.get("learned"))):
        _fail("expired and learned must be counts")
    unmatched = state.get("unmatched")
    if not isinstance(unmatched, dict) or not all(
        isinstance(k, str) and _is_count(v) for k, v in unmatched.items()
    ):
        _fail("unmatched must map reasons to counts")


def _ids(value: Any, what: str) -> list[JoinId]:
    if not isinstance(value, list) or len(value) > MAX_STORED_PENDING:
        _fail(f"{what} must be a list of at most {MAX_STORED_PENDING} ids")
    if any(isinstance(check_id(v), tuple) for v in value):
        _fail(f"{what} holds an id that is not a string or a 64-bit integer")
    return value


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def _fail(message: str, reason: str = "state") -> NoReturn:
    raise CheckpointInvalidError(f"invalid label state: {message}", reason=reason)
