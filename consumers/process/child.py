"""The consumer process: a :class:`~consumers.kafka_source.KafkaRecordSource` in a child process.

Started by :class:`~consumers.process.source.ProcessKafkaSource` as
``python -m consumers.process.child``; it speaks frames (:mod:`consumers.process.frames`) on its
stdin and stdout and logs on stderr. It owns the group membership, the fetching, kafka-python's
record parsing and the decoding and checks of the values; the service trains and checkpoints.
Nothing here is pickled.

Threads
-------
- the **main thread** runs commands in order: ``poll`` (one batch), ``commit``, ``end_offsets``,
  ``committed_offsets``, ``committed_metadata``, ``lag``, ``caught_up``, ``assignment``,
  ``close``. While a ``poll`` waits for records it polls in slices of :data:`POLL_SLICE_MS` and
  runs the other commands between slices, so a command never waits for ``max_wait_ms`` (a
  ``poll`` that comes meanwhile is counted and answered after it: the service keeps several asked
  for, to read ahead);
- a **reader thread** reads stdin and routes each frame: answers to rebalance events go to the
  waiting callback, everything else to the main thread's queue. Had the main thread read them, a
  command needing kafka-python's IO thread (a commit) would wait for that thread while the IO
  thread waited, inside a rebalance callback, for an answer nobody read;
- kafka-python's **IO thread** runs the rebalance callbacks. Each one is sent to the service as an
  ``event`` frame and blocks until the service answers it (the offset to seek to on assignment,
  an acknowledgement on revocation). The service answers events whenever it reads from the pipe,
  that is inside any call on the source, so a callback waits at most one training step.

SIGINT and SIGTERM are ignored: the process ends on ``close`` or when the service's end of the pipe
closes (the service exited, however it exited).

The stdout file descriptor is kept for frames only: ``sys.stdout`` and fd 1 are pointed at stderr,
so that a stray ``print`` cannot corrupt the stream.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, BinaryIO

from kafka.structs import TopicPartition

from consumers.kafka_source import (
    KafkaRecordSource,
    KafkaSourceConfig,
    partition_key,
)
from consumers.process.frames import (
    PROTOCOL_VERSION,
    FrameError,
    pack_polled,
    read_frame,
    write_frame,
)
from stream_trainer.errors import ConfigError, SourceError

log = logging.getLogger("consumers.process.child")

POLL_SLICE_MS = 20
"""Longest single ``KafkaConsumer.poll`` while a batch waits: the latency of a command then."""


def error_payload(exc: BaseException) -> dict[str, Any]:
    """An exception as a frame field (what :func:`consumers.process.source` raises again)."""
    if isinstance(exc, ConfigError):
        kind = "config"
    elif isinstance(exc, ValueError):
        kind = "value"
    else:
        kind = "source"
    retriable = bool(getattr(exc, "retriable", False))
    return {"kind": kind, "message": f"{exc}", "retriable": retriable}


class ConsumerWorker:
    """The child's side: a source, a command loop and the rebalance callbacks' round trips."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO, config: KafkaSourceConfig) -> None:
        self._reader = reader
        self._writer = writer
        self._write_lock = threading.Lock()
        self._ask_lock = threading.Lock()
        self._commands: queue.Queue[tuple[dict[str, Any], bytes] | None] = queue.Queue()
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._gone = threading.Event()  # the service closed the pipe
        self._event_id = 0
        self._polls_due = 0  # polls asked for while another ran: answered in order, one by one
        self._closing = False  # a close (or the end of the pipe) is queued: answer no more polls
        self.config = config
        self.source: KafkaRecordSource | None = None

    # -- pipes ----------------------------------------------------------------------------------

    def send(self, header: dict[str, Any], blob: bytes = b"") -> None:
        """Write one frame; nothing once the service has gone (it reads nothing any more)."""
        with self._write_lock:
            if self._gone.is_set():
                return
            try:
                write_frame(self._writer, header, blob)
            except OSError:  # the service exited: the reader thread sees the end of stdin too
                self._gone.set()

    def _read_loop(self) -> None:
        try:
            while True:
                header, blob = read_frame(self._reader)
                if header["type"] == "answer":
                    self._answers.put(header)
                else:
                    self._commands.put((header, blob))
        except (FrameError, OSError, ValueError):
            self._gone.set()
            self._answers.put(None)
            self._commands.put(None)

    # -- rebalance callbacks (kafka-python's IO thread) -----------------------------------------

    def _ask(self, event: str, **fields: Any) -> dict[str, Any]:
        with self._ask_lock:
            if self._gone.is_set():
                raise SourceError("the service closed the consumer process's pipe")
            self._event_id += 1
            self.send({"type": "event", "event": event, "id": self._event_id, **fields})
            answer = self._answers.get()
            if answer is None:
                raise SourceError("the service closed the consumer process's pipe")
            if answer.get("error"):
                raise SourceError(f"the service's {event} callback failed: {answer['error']}")
            return answer

    def _offset_for(self, topic: str, partition: int) -> int | None:
        offset = self._ask("offset", topic=topic, partition=partition).get("offset")
        return None if offset is None else int(offset)

    def _revoked(self, partitions: list[TopicPartition]) -> None:
        self._ask("revoke", partitions=[partition_key(*tp) for tp in partitions])

    def _lost(self, partitions: list[TopicPartition]) -> None:
        self._ask("lost", partitions=[partition_key(*tp) for tp in partitions])

    # -- commands (main thread) -----------------------------------------------------------------

    def _run_command(self, header: dict[str, Any]) -> None:
        source = self.source
        assert source is not None
        kind = header["type"]
        try:
            if kind == "commit":
                source.commit(header["offsets"], header.get("metadata"))
                result: Any = None
            elif kind == "end_offsets":
                result = source.end_offsets()
            elif kind == "committed_offsets":
                result = source.committed_offsets()
            elif kind == "committed_metadata":
                result = {k: list(v) for k, v in source.committed_metadata().items()}
            elif kind == "lag":
                result = source.lag()
            elif kind == "caught_up":
                result = source.caught_up(header["end_offsets"])
            elif kind == "assignment":
                result = [[tp.topic, tp.partition] for tp in source.assignment()]
            else:
                raise SourceError(f"unknown command {kind!r}")
        except (SourceError, ValueError) as exc:
            self.send({"type": "reply", "error": error_payload(exc)})
        except Exception as exc:  # a bug here must not take the service's consumer down unseen
            log.exception("consumer process: %s failed", kind)
            failure = SourceError(
                f"{kind} failed in the consumer process: {type(exc).__name__}: {exc}"
            )
            self.send({"type": "reply", "error": error_payload(failure)})
        else:
            self.send({"type": "reply", "result": result, "rebalancing": source.rebalancing})

    def _run_pending_commands(self) -> bool:
        """Run the commands already queued (a ``poll`` is counted, to run after this one); False
        (and the item left queued) at a ``close`` or at the end of the pipe, which end the poll in
        progress and the polls due."""
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return True
            if item is None or item[0]["type"] == "close":
                self._commands.put(item)
                self._closing = True
                return False
            if item[0]["type"] == "poll":
                self._polls_due += 1
            else:
                self._run_command(item[0])

    def _poll(self) -> None:
        """Answer one ``poll``: slices until records arrive or ``max_wait_ms`` is over, running
        commands in between; an empty batch when a ``close`` comes meanwhile."""
        source = self.source
        assert source is not None
        deadline = time.monotonic() + self.config.max_wait_ms / 1000.0
        try:
            while True:
                remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
                polled, next_offsets = source.poll_messages(min(POLL_SLICE_MS, remaining_ms))
                # next offsets without messages: start positions to hand out (poll_messages)
                if polled or next_offsets or remaining_ms <= POLL_SLICE_MS:
                    break
                if not self._run_pending_commands():
                    polled, next_offsets = [], {}
                    break
        except SourceError as exc:
            self.send({"type": "batch", "error": error_payload(exc)})
            return
        fields, blob = pack_polled(source.decoder, polled, next_offsets)
        self.send({"type": "batch", "rebalancing": source.rebalancing, **fields}, blob)

    def serve(self) -> int:
        """Open the source, answer commands until ``close`` or the end of stdin; the exit code."""
        threading.Thread(target=self._read_loop, name="frames-in", daemon=True).start()
        try:
            self.source = KafkaRecordSource(
                self.config,
                offset_provider=self._offset_for,
                on_revoke=self._revoked,
                on_lost=self._lost,
            )
        except (SourceError, ValueError) as exc:
            self.send({"type": "error", "error": error_payload(exc)})
            return 1
        self.send({"type": "ready", "pid": os.getpid()})
        try:
            while True:
                if self._polls_due and not self._closing:
                    self._polls_due -= 1
                    self._poll()
                    continue
                item = self._commands.get()
                if item is None or item[0]["type"] == "close":
                    break
                if item[0]["type"] == "poll":
                    self._polls_due += 1  # run at the top of the loop, as those counted in a poll
                else:
                    self._run_command(item[0])
        finally:
            if self._gone.is_set():
                log.warning("the service went away without closing its source: leaving the group")
            self.source.close()  # calls on_revoke: the service answers it while it waits below
        if not self._gone.is_set():
            self.send({"type": "closed"})
        return 0


def _frames_out() -> BinaryIO:
    """A private copy of fd 1 for frames; fd 1 and ``sys.stdout`` then point at stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "wb", buffering=0)


def main() -> int:
    from stream_trainer.service.logs import configure_logging

    # Ctrl-C reaches a terminal's whole process group, and systemd stops a unit by signalling
    # every process in it: the service must still commit its last checkpoint through this
    # process, so it leaves only when the service says so (``close``) or goes away (end of stdin).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    writer = _frames_out()
    reader = os.fdopen(os.dup(0), "rb", buffering=0)
    try:
        header, _ = read_frame(reader)
    except FrameError:
        return 2
    if header.get("type") != "start" or header.get("version") != PROTOCOL_VERSION:
        write_frame(
            writer,
            {
                "type": "error",
                "error": {
                    "kind": "source",
                    "message": f"consumer process speaks protocol {PROTOCOL_VERSION}, "
                    f"got {header.get('type')!r} v{header.get('version')!r}",
                    "retriable": False,
                },
            },
        )
        return 2
    configure_logging(header.get("log_format", "text"), header.get("log_level", "INFO"))
    try:
        config = KafkaSourceConfig.from_mapping({**header["config"], "consumer_process": False})
    except (ValueError, TypeError) as exc:
        write_frame(writer, {"type": "error", "error": error_payload(ConfigError(str(exc)))})
        return 2
    return ConsumerWorker(reader, writer, config).serve()


if __name__ == "__main__":
    sys.exit(main())
