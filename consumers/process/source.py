"""The Kafka record source with its consumer in a child process, so that Kafka overlaps training.

Why: kafka-python parses every record in Python, and in one process that work, the decoding and
the training step run one after the other (the Kafka section of BENCHMARKS.md,
``python bench/bench_kafka.py``). With the consumer in :mod:`consumers.process.child`, the child
fetches, parses, decodes and checks the batches after ``k`` on the other core while the service
trains batch ``k``; the service only reads the decoded batch back from its frame
(``python bench/bench_frames.py`` times it).

:class:`ProcessKafkaSource` has the interface of :class:`~consumers.kafka_source.KafkaRecordSource`
(``poll_batch``, ``commit``, ``end_offsets``, ``committed_offsets``, ``committed_metadata``,
``lag``, ``caught_up``,
``assignment``, ``rebalancing``, ``close``) and the same offset and rebalance contract, with these
differences, all consequences of reading ahead:

- **Read-ahead**: the child reads up to ``read_ahead_batches`` (default 4) batches ahead of
  the one the service trains on: :meth:`~ProcessKafkaSource.poll_batch` returns the oldest batch
  read (or waits for it) and asks for one more. A batch is cut when the child comes to it (at most
  ``max_wait_ms`` for the first records, then what is buffered, at most ``max_batch_records``),
  not when the trainer comes back for it: under moderate load batches are smaller than in one
  process, under a backlog they are full all the same. More than one lets a pause of the child
  (a fetch, a garbage collection) come out of its lead instead of the trainer's time;
  ``python bench/bench_kafka.py`` measures one beside four at 64 (the Kafka section of
  BENCHMARKS.md).
- **Callbacks** (``offset_provider``, ``on_revoke``, ``on_lost``) run in the service's thread,
  inside whichever call on the source reads the child's answer next. kafka-python's IO thread in
  the child waits for them, so a rebalance waits at most for the training step in progress; the
  hooks see every batch handed out before the rebalance trained, as in one process. They must not
  call the source themselves (in one process that would block kafka-python's IO thread too).
- **Rebalances**: a revocation's hook runs before any message read before it is handed out
  after it. Frames are read in order, so the batches the child sent before the revocation are
  read before its event; those still waiting when it comes (read while the service waited for a
  command's reply: a commit, ``lag``) lose the messages of the revoked partitions
  (``_drop_read_ahead``). In the child, a batch whose polls straddle the revocation drops the
  messages its earlier polls read from those partitions
  (:meth:`~consumers.kafka_source.KafkaRecordSource.poll_messages`). Each dropped message is read
  again by its partition's next owner: another member from the offsets committed at the
  revocation; this member from the offset the service has trained when it provides one, or else
  from the first message dropped (the answer to the assignment's offset event, and a seek in the
  child where kafka-python keeps the partition's position). Handed out instead, they would be
  trained twice (``tests/integration/test_process_source.py`` asks for the lag after each batch
  to hold this).
- :meth:`~ProcessKafkaSource.caught_up` is False while a batch read ahead holds messages, and
  :meth:`~ProcessKafkaSource.lag` counts their messages as not read.

Nothing crosses the pipes pickled (:mod:`consumers.process.frames`). When the child dies, every
call raises :class:`~stream_trainer.errors.SourceError` (not retriable) with its exit code.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kafka.structs import TopicPartition

from consumers.kafka_source import (
    ClosableSource,
    KafkaRecordSource,
    KafkaSourceConfig,
    OffsetProvider,
    RevokeHook,
    SourceBatch,
    parse_partition_key,
    partition_key,
)
from consumers.process.frames import (
    PROTOCOL_VERSION,
    FrameError,
    read_frame,
    unpack_batch,
    write_frame,
)
from stream_trainer.errors import ConfigError, SourceError
from stream_trainer.records import Record, RejectedRecord

__all__ = ["ProcessKafkaSource", "open_kafka_source"]

log = logging.getLogger(__name__)

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def open_kafka_source(
    config: KafkaSourceConfig,
    *,
    offset_provider: OffsetProvider | None = None,
    on_revoke: RevokeHook | None = None,
    on_lost: RevokeHook | None = None,
) -> KafkaRecordSource | ProcessKafkaSource:
    """The source ``config`` asks for: in a child process when ``config.consumer_process``."""
    cls = ProcessKafkaSource if config.consumer_process else KafkaRecordSource
    return cls(config, offset_provider=offset_provider, on_revoke=on_revoke, on_lost=on_lost)


def _raise_remote(error: Mapping[str, Any]) -> None:
    message = str(error.get("message", "unknown error in the consumer process"))
    kind = error.get("kind")
    if kind == "config":
        raise ConfigError(message)
    if kind == "value":
        raise ValueError(message)
    raise SourceError(message, retriable=bool(error.get("retriable", False)))


def _log_settings() -> tuple[str, str]:
    from stream_trainer.service.logs import JsonLineFormatter

    root = logging.getLogger()
    fmt = "text"
    if root.handlers and isinstance(root.handlers[0].formatter, JsonLineFormatter):
        fmt = "json"
    return fmt, logging.getLevelName(root.getEffectiveLevel())


PIPE_BYTES = 1 << 20
"""What the child's frame pipe holds (Linux's default is 64 KiB; 1 MiB is the usual most an
unprivileged process may ask, ``/proc/sys/fs/pipe-max-size``)."""


def _grow_pipe(fd: int) -> None:
    """Let the child write the batches it reads ahead whole, without waiting for the service to
    read them: a frame written in parts makes the child wait for the service's training step and
    the service then wait for the rest (frame sizes: ``python bench/bench_frames.py``). Where the
    size cannot be set, the pipe keeps its own."""
    setter = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setter is None:  # not Linux
        return
    size = PIPE_BYTES
    with contextlib.suppress(OSError, ValueError):
        size = min(size, int(Path("/proc/sys/fs/pipe-max-size").read_text()))
    try:
        fcntl.fcntl(fd, setter, size)
    except OSError as exc:
        log.debug("consumer process pipe left at its default size: %s", exc)


def _key_of(message: Record | RejectedRecord) -> str:
    """The partition key of a message read from Kafka (whose topic and partition are set)."""
    return partition_key(message.topic, message.partition)  # type: ignore[arg-type]


class ProcessKafkaSource(ClosableSource):
    """:class:`~consumers.kafka_source.KafkaRecordSource`'s interface, its consumer in a child
    process (see the module docstring for what differs).

    Raises
    ------
    SourceError
        As :class:`~consumers.kafka_source.KafkaRecordSource` does (broker not reachable: retriable;
        topic missing: not), and when the consumer process cannot start or dies.
    """

    def __init__(
        self,
        config: KafkaSourceConfig,
        *,
        offset_provider: OffsetProvider | None = None,
        on_revoke: RevokeHook | None = None,
        on_lost: RevokeHook | None = None,
    ) -> None:
        self.config = config
        self._offset_provider = offset_provider
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self._closed = False
        self._rebalancing = False
        self._polls_in_flight = 0
        # batches read ahead, in order (an error payload stands for a poll that failed)
        self._arrived: deque[SourceBatch | dict[str, Any]] = deque()
        # per partition, the first offset of the messages dropped from them at the latest
        # revocation (see _drop_read_ahead)
        self._dropped_from: dict[str, int] = {}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "consumers.process.child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
        )
        assert self._proc.stdout is not None
        _grow_pipe(self._proc.stdout.fileno())
        fmt, level = _log_settings()
        try:
            self._send(
                {
                    "type": "start",
                    "version": PROTOCOL_VERSION,
                    "config": config.to_mapping(),
                    "log_format": fmt,
                    "log_level": level,
                }
            )
            ready, _ = self._wait_for("ready")
        except BaseException:
            self._closed = True
            self._reap(timeout_s=5.0)
            raise
        self.pid = int(ready["pid"])
        log.info("consumer process %d started for %s", self.pid, list(config.topics))

    # -- pipes ----------------------------------------------------------------------------------

    def _send(self, header: dict[str, Any]) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            write_frame(stdin, header)  # type: ignore[arg-type]
        except OSError as exc:
            raise self._died(exc) from exc

    def _died(self, exc: BaseException) -> SourceError:
        try:
            code = self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            code = None
        self._closed = True
        return SourceError(f"the consumer process exited (code {code}): {exc}", retriable=False)

    def _next_frame(self) -> tuple[dict[str, Any], bytes]:
        stdout = self._proc.stdout
        assert stdout is not None
        try:
            header, blob = read_frame(stdout)  # type: ignore[arg-type]
        except (FrameError, OSError, ValueError) as exc:
            raise self._died(exc) from exc
        if "rebalancing" in header:
            self._rebalancing = bool(header["rebalancing"])
        return header, blob

    def _wait_for(self, kind: str) -> tuple[dict[str, Any], bytes]:
        """Read frames until one of type ``kind``: events are answered, a batch that comes first
        is kept for :meth:`poll_batch`, an ``error`` is raised."""
        while True:
            header, blob = self._next_frame()
            t = header["type"]
            if t == "event":
                self._answer(header)
                continue
            if t == "batch":
                self._polls_in_flight -= 1
                error = header.get("error")
                self._arrived.append(unpack_batch(header, blob) if error is None else error)
            if t == kind:
                return header, blob
            if t == "error":
                _raise_remote(header["error"])
            if t != "batch":
                raise SourceError(f"consumer process sent {t!r} while {kind!r} was due")

    def _answer(self, event: dict[str, Any]) -> None:
        name = event["event"]
        answer: dict[str, Any] = {"type": "answer", "id": event["id"]}
        try:
            if name == "offset":
                offset = None
                if self._offset_provider is not None:
                    offset = self._offset_provider(event["topic"], int(event["partition"]))
                if offset is None:  # no trained offset: from the first message dropped, if any
                    key = partition_key(event["topic"], int(event["partition"]))
                    offset = self._dropped_from.get(key)
                answer["offset"] = offset
            else:
                if name == "revoke":
                    self._rebalancing = True
                self._drop_read_ahead(frozenset(event["partitions"]))
                partitions = [TopicPartition(*parse_partition_key(k)) for k in event["partitions"]]
                hook = self._on_lost if name == "lost" else self._on_revoke
                if hook is not None:
                    hook(partitions)
                elif name == "lost":
                    log.warning("partitions lost without revocation: %s", partitions)
        except Exception as exc:  # reported to the child, raised by its next poll
            answer = {"type": "answer", "id": event["id"], "error": f"{type(exc).__name__}: {exc}"}
        self._send(answer)

    def _drop_read_ahead(self, keys: frozenset[str]) -> None:
        """Take the messages of the revoked (or lost) partitions ``keys`` out of the batches read
        ahead, before the hooks run: handed out after the revocation, they would be read again
        by the partitions' next owner. This member reads them again too when it gets a partition
        back: sought to the offset the service has handed out, or, with none, to the first
        message dropped (``_dropped_from``, the answer to the assignment's offset event)."""
        dropped_from: dict[str, int] = {}
        for item in self._arrived:
            if not isinstance(item, SourceBatch):
                continue
            for key in keys.intersection(item.next_offsets):
                del item.next_offsets[key]
            records = [r for r in item.records if _key_of(r) not in keys]
            rejected = [r for r in item.rejected if _key_of(r) not in keys]
            if len(records) + len(rejected) == item.size:
                continue
            messages: list[Record | RejectedRecord] = [*item.records, *item.rejected]
            for message in messages:
                key = _key_of(message)
                if key in keys and message.offset is not None:
                    offset = dropped_from.get(key, message.offset)
                    dropped_from[key] = min(offset, message.offset)
            item.records, item.rejected = records, rejected
        if dropped_from:
            log.info("dropped the messages read ahead of revoked partitions from: %s", dropped_from)
        self._dropped_from = dropped_from

    def _command(self, kind: str, **fields: Any) -> Any:
        self._check_open()
        self._send({"type": kind, **fields})
        reply, _ = self._wait_for("reply")
        if "error" in reply:
            _raise_remote(reply["error"])
        return reply["result"]

    def _check_open(self) -> None:
        if self._closed:
            raise SourceError("the Kafka source is closed")

    # -- reading --------------------------------------------------------------------------------

    def poll_batch(self) -> SourceBatch:
        """The oldest batch read ahead (waiting for it when none is there yet), decoded; the child
        reads on while the caller trains on it, up to ``config.read_ahead_batches`` ahead."""
        self._check_open()
        self._ask_ahead()
        while not self._arrived:
            self._wait_for("batch")
        item = self._arrived.popleft()
        self._ask_ahead()
        if isinstance(item, dict):
            _raise_remote(item)
        return item  # type: ignore[return-value]

    def _ask_ahead(self) -> None:
        """Ask for batches until ``read_ahead_batches`` are read ahead or asked for."""
        while self._polls_in_flight + len(self._arrived) < self.config.read_ahead_batches:
            self._send({"type": "poll"})
            self._polls_in_flight += 1

    def _read_ahead(self) -> list[SourceBatch]:
        return [b for b in self._arrived if isinstance(b, SourceBatch)]

    # -- offsets and positions ------------------------------------------------------------------

    def commit(
        self, next_offsets: Mapping[str, int], metadata: Mapping[str, str] | None = None
    ) -> None:
        """:meth:`KafkaRecordSource.commit <consumers.kafka_source.KafkaRecordSource.commit>`, run
        by the child."""
        self._command("commit", offsets=dict(next_offsets), metadata=dict(metadata or {}))

    def committed_offsets(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._command("committed_offsets").items()}

    def committed_metadata(self) -> dict[str, tuple[int, str]]:
        answer = self._command("committed_metadata")
        return {k: (int(offset), str(note)) for k, (offset, note) in answer.items()}

    def end_offsets(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._command("end_offsets").items()}

    def lag(self) -> dict[str, int]:
        """``end offset - position`` per assigned partition, the messages of the batches read
        ahead counted as not read (they are not handed out yet)."""
        lag = {k: int(v) for k, v in self._command("lag").items()}
        for batch in self._read_ahead():
            items: list[Record | RejectedRecord] = [*batch.records, *batch.rejected]
            for item in items:
                key = partition_key(item.topic, item.partition)  # type: ignore[arg-type]
                if key in lag:
                    lag[key] += 1
        return lag

    def caught_up(self, end_offsets_at_start: Mapping[str, int]) -> bool:
        """:meth:`KafkaRecordSource.caught_up
        <consumers.kafka_source.KafkaRecordSource.caught_up>`, and no message read ahead."""
        answer = bool(self._command("caught_up", end_offsets=dict(end_offsets_at_start)))
        return answer and not any(batch.size for batch in self._read_ahead())

    @property
    def rebalancing(self) -> bool:
        """True between a revocation and the next assignment, as of the child's latest answer."""
        return self._rebalancing

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, int(p)) for t, p in self._command("assignment")]

    # -- lifecycle ------------------------------------------------------------------------------

    def _reap(self, timeout_s: float) -> int | None:
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            return self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("consumer process %d did not exit: killing it", self._proc.pid)
            self._proc.kill()
            return self._proc.wait()
        finally:
            if self._proc.stdout is not None:
                self._proc.stdout.close()

    def close(self) -> None:
        """Leave the group (answering the ``on_revoke`` this triggers) and stop the child; bounded
        by about twice ``close_timeout_ms``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        limit_s = 2 * self.config.close_timeout_ms / 1000.0 + 5.0
        killer = threading.Timer(limit_s, self._proc.kill)  # a read below then ends at EOF
        killer.daemon = True
        killer.start()
        try:
            self._send({"type": "close"})
            self._wait_for("closed")
        except (SourceError, ValueError) as exc:
            log.warning("error while closing the consumer process: %s", exc)
        finally:
            killer.cancel()
            self._reap(timeout_s=5.0)

    def _repr_extra(self) -> str:
        return f", pid={self._proc.pid}"
