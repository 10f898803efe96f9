#!/usr/bin/env python3
"""A real Apache Kafka broker for development and tests, without Docker (standard library only).

The broker's classpath comes from Maven Central (``scripts/kafka/pom.xml``); it runs as one combined
KRaft broker + controller on 127.0.0.1, with replication factors and min ISR of 1, a small heap and
its Log4j output in a file of its data directory.

By hand::

    python scripts/kafka_broker.py fetch                      # once; idempotent
    python scripts/kafka_broker.py start                      # foreground, Ctrl-C stops it
    python scripts/kafka_broker.py start --daemon --data-dir /tmp/kafka --port 9092
    python scripts/kafka_broker.py stop --data-dir /tmp/kafka

``start`` prints ``bootstrap=127.0.0.1:PORT`` once the client port accepts connections (that port
opens only when the broker can serve). Free ports are chosen when none are given.

From Python (the pytest fixture and the benchmark)::

    broker = KafkaBroker(data_dir)
    broker.start()            # fetches first when needed
    broker.bootstrap          # "127.0.0.1:PORT"
    broker.stop()

Environment: ``STREAM_TRAINER_KAFKA_HOME`` overrides the cache folder that holds the libraries
(default ``~/.cache/stream-trainer/kafka-<version>``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "KAFKA_VERSION",
    "BrokerError",
    "KafkaBroker",
    "fetch",
    "free_port",
    "kafka_home",
    "missing_tools",
]

KAFKA_VERSION = "4.3.1"
POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
MARKER = ".complete"
PID_FILE = "broker.pid"
LOG_FILE = "broker.log"
STDOUT_FILE = "broker.stdout"
PROPERTIES_FILE = "server.properties"
LOG4J_FILE = "log4j2.properties"
DEFAULT_HEAP = "512m"
DEFAULT_START_TIMEOUT_S = 90.0

_LOG4J2_PROPERTIES = """\
# Quiet broker logging: warnings and errors, plus the startup and shutdown lines, into a file.
status = error
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = INFO
"""


class BrokerError(RuntimeError):
    """The broker could not be fetched, started or stopped; ``log_tail`` has the log's end."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(f"{message}\n--- broker log tail ---\n{log_tail}" if log_tail else message)
        self.log_tail = log_tail


def kafka_home(version: str = KAFKA_VERSION) -> Path:
    """The cache folder holding ``libs/`` (outside the repository)."""
    override = os.environ.get("STREAM_TRAINER_KAFKA_HOME")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "stream-trainer" / f"kafka-{version}"


def missing_tools() -> list[str]:
    """The external programs that ``fetch`` and ``start`` need and that are not on PATH."""
    return [tool for tool in ("java", "mvn") if shutil.which(tool) is None]


def _libs_complete(libs: Path, version: str) -> bool:
    marker = libs / MARKER
    return marker.is_file() and marker.read_text().split()[:1] == [version]


def fetch(home: Path | None = None, *, version: str = KAFKA_VERSION, quiet: bool = True) -> Path:
    """Resolve the broker classpath into ``home/libs`` with Maven; return that folder.

    Idempotent: a ``.complete`` marker (written last) makes later calls return at once. Concurrent
    callers are serialised by a lock file, so two test sessions never half-write the same folder.
    """
    home = kafka_home(version) if home is None else home
    libs = home / "libs"
    if _libs_complete(libs, version):
        return libs
    if shutil.which("mvn") is None:
        raise BrokerError("mvn is not on PATH: install Maven (Debian: apt-get install maven)")
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _libs_complete(libs, version):
            return libs
        staging = Path(tempfile.mkdtemp(prefix="libs.", dir=home))
        try:
            shutil.copy(POM, staging / "pom.xml")
            cmd = [
                "mvn",
                *(["-q"] if quiet else []),
                "-B",
                "-f",
                str(staging / "pom.xml"),
                f"-Dkafka.version={version}",
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging / 'libs'}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
                raise BrokerError(f"mvn failed with exit code {proc.returncode}", tail)
            jars = sorted(p.name for p in (staging / "libs").glob("*.jar"))
            if not any(name.startswith(f"kafka_2.13-{version}") for name in jars):
                raise BrokerError(f"mvn finished but kafka_2.13-{version}.jar is missing")
            if libs.exists():
                shutil.rmtree(libs)
            (staging / "libs").rename(libs)
            (libs / MARKER).write_text(f"{version} {len(jars)} jars\n")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return libs


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _cluster_id() -> str:
    # Kafka's Uuid: 16 random bytes, URL-safe base64 without padding, never starting with '-'.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _set_parent_death_signal() -> None:  # pragma: no cover - runs in the child
    # Linux: the broker gets SIGTERM when the process that started it dies (no orphaned JVMs after
    # a killed test run). Elsewhere this is a no-op.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class KafkaBroker:
    """One KRaft broker + controller in ``data_dir``, listening on 127.0.0.1.

    Parameters
    ----------
    data_dir
        Holds ``server.properties``, the log4j config, the Kafka log dirs, ``broker.log`` and, for a
        daemon, ``broker.pid``.
    port, controller_port
        Client and controller ports; free ones are chosen when ``None``.
    heap
        JVM ``-Xmx``.
    home
        Cache folder holding ``libs/`` (default :func:`kafka_home`).
    sasl_users
        ``{user: password}``: also listen for ``SASL_PLAINTEXT`` clients on :attr:`sasl_port`, for
        tests of authentication, with mechanisms ``PLAIN`` (these users) and ``OAUTHBEARER``
        (Kafka's unsecured validator: any unsigned JWT with ``sub`` and ``exp`` claims passes; a
        test setup, never a production one); ``None`` (default): plaintext only.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        heap: str = DEFAULT_HEAP,
        home: Path | None = None,
        version: str = KAFKA_VERSION,
        sasl_users: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port if port is not None else free_port()
        self.controller_port = controller_port if controller_port is not None else free_port()
        if self.controller_port == self.port:
            self.controller_port = free_port()
        self.heap = heap
        self.home = kafka_home(version) if home is None else home
        self.version = version
        self.sasl_users = dict(sasl_users) if sasl_users else None
        self.sasl_port = free_port() if self.sasl_users else None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str | None:
        """``host:port`` of the SASL_PLAINTEXT listener (``None`` without ``sasl_users``)."""
        return None if self.sasl_port is None else f"127.0.0.1:{self.sasl_port}"

    @property
    def pid(self) -> int | None:
        """The broker's process id while this object runs it (None before start, after stop)."""
        return None if self._proc is None else self._proc.pid

    @property
    def log_file(self) -> Path:
        return self.data_dir / LOG_FILE

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the JVM's own output and of the broker log."""
        parts = []
        for path in (self.data_dir / STDOUT_FILE, self.log_file):
            text = _tail(path, lines)
            if text:
                parts.append(f"[{path.name}]\n{text}")
        return "\n".join(parts)

    def _write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "log.dirs": str(self.data_dir / "kraft-logs"),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "share.coordinator.state.topic.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Topics exist only when created on purpose: a typo in --topic is an error.
            "auto.create.topics.enable": "false",
            # Two cores: few threads.
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.threads": "1",
        }
        if self.sasl_users:
            users = " ".join(f'user_{u}="{p}"' for u, p in self.sasl_users.items())
            props["listeners"] += f",SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}"
            props["advertised.listeners"] += f",SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}"
            props["listener.security.protocol.map"] += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
            props["sasl.enabled.mechanisms"] = "PLAIN,OAUTHBEARER"
            props["listener.name.sasl_plaintext.plain.sasl.jaas.config"] = (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            )
            props["listener.name.sasl_plaintext.oauthbearer.sasl.jaas.config"] = (
                "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;"
            )
        path = self.data_dir / PROPERTIES_FILE
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.data_dir / LOG4J_FILE).write_text(
            _LOG4J2_PROPERTIES.format(log_file=self.log_file.as_posix())
        )
        return path

    def _java(self, main_class: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise BrokerError("java is not on PATH: install a JRE >= 17 (Debian: default-jre)")
        return [
            java,
            f"-Xmx{self.heap}",
            "-Xms128m",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / LOG4J_FILE}",
            "-cp",
            str(self.home / "libs" / "*"),
            main_class,
            *args,
        ]

    def format(self) -> None:
        """Write the config and format the storage with a fresh cluster id (once per data dir)."""
        props = self._write_config()
        if (self.data_dir / "kraft-logs" / "meta.properties").exists():
            return
        cmd = self._java(
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            _cluster_id(),
            "-c",
            str(props),
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise BrokerError(f"kafka StorageTool format failed (exit {proc.returncode})", tail)

    def start(
        self,
        *,
        timeout_s: float = DEFAULT_START_TIMEOUT_S,
        daemon: bool = False,
        fetch_first: bool = True,
    ) -> None:
        """Format when needed, launch the JVM and wait until the client port accepts connections.

        ``daemon=True`` detaches the broker (new session, pid file in ``data_dir``); otherwise it is
        tied to this process (it gets SIGTERM when this process dies, on Linux).
        On failure the broker is stopped and :class:`BrokerError` carries the log tail.
        """
        if fetch_first:
            fetch(self.home, version=self.version)
        self.format()
        out = open(self.data_dir / STDOUT_FILE, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                self._java("kafka.Kafka", str(self.data_dir / PROPERTIES_FILE)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=daemon,
                preexec_fn=None if daemon else _set_parent_death_signal,
            )
        finally:
            out.close()
        if daemon:
            (self.data_dir / PID_FILE).write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + timeout_s
        while not _port_open(self.port):
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._cleanup_pid_file()
                raise BrokerError(f"kafka exited with code {code} during startup", self.log_tail())
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(
                    f"kafka client port {self.port} did not open within {timeout_s:.0f} s",
                    self.log_tail(),
                )
            time.sleep(0.2)

    def _cleanup_pid_file(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / PID_FILE).unlink()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (controlled shutdown), then SIGKILL after ``timeout_s``. Idempotent."""
        if self._proc is not None:
            _terminate(self._proc.pid, timeout_s, wait=self._proc.wait)
            self._proc = None
            self._cleanup_pid_file()
            return
        stop_daemon(self.data_dir, timeout_s)

    def wait(self) -> int:
        """Block until the broker (started by this object) exits; return its exit code."""
        if self._proc is None:
            return 0
        return self._proc.wait()

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate(pid: int, timeout_s: float, wait: object = None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(wait):
            with contextlib.suppress(subprocess.TimeoutExpired):
                wait(timeout=0.2)
                return
        elif not _alive(pid):
            return
        else:
            time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if callable(wait):
        wait()


def stop_daemon(data_dir: Path, timeout_s: float = 10.0) -> bool:
    """Stop the broker whose pid file is in ``data_dir``; False when there was none."""
    pid_file = Path(data_dir) / PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    if _alive(pid):
        _terminate(pid, timeout_s)
    pid_file.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def running_broker(data_dir: Path | str, **kwargs: object) -> Iterator[KafkaBroker]:
    """``with running_broker(tmp) as broker: ... broker.bootstrap ...``"""
    broker = KafkaBroker(data_dir, **kwargs)  # type: ignore[arg-type]
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="resolve the broker classpath with Maven (idempotent)")
    p_fetch.add_argument("--verbose", action="store_true", help="show Maven's output")
    p_start = sub.add_parser("start", help="format (if needed) and start a broker")
    p_start.add_argument("--data-dir", type=Path, help="default: a new temporary folder")
    p_start.add_argument("--port", type=int, help="client port (default: a free one)")
    p_start.add_argument("--controller-port", type=int, help="default: a free one")
    p_start.add_argument("--heap", default=DEFAULT_HEAP, help="JVM -Xmx (default %(default)s)")
    p_start.add_argument("--timeout", type=float, default=DEFAULT_START_TIMEOUT_S)
    p_start.add_argument("--daemon", action="store_true", help="detach; writes broker.pid")
    p_stop = sub.add_parser("stop", help="stop the daemon whose pid file is in --data-dir")
    p_stop.add_argument("--data-dir", type=Path, required=True)
    p_stop.add_argument("--timeout", type=float, default=10.0, help="SIGKILL after this (s)")
    for p in (p_fetch, p_start):
        p.add_argument("--home", type=Path, help="libs cache (default: $STREAM_TRAINER_KAFKA_HOME)")
    args = parser.parse_args(argv)

    try:
        if args.command == "fetch":
            libs = fetch(args.home, quiet=not args.verbose)
            print(f"libs={libs}")
            return 0
        if args.command == "stop":
            if stop_daemon(args.data_dir, args.timeout):
                print(f"stopped broker in {args.data_dir}")
                return 0
            print(f"no {PID_FILE} in {args.data_dir}", file=sys.stderr)
            return 1
        data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="kafka-"))
        broker = KafkaBroker(
            data_dir,
            port=args.port,
            controller_port=args.controller_port,
            heap=args.heap,
            home=args.home,
        )
        t0 = time.monotonic()
        broker.start(timeout_s=args.timeout, daemon=args.daemon)
        print(f"bootstrap={broker.bootstrap}", flush=True)
        print(
            f"data_dir={broker.data_dir} log={broker.log_file} "
            f"started in {time.monotonic() - t0:.1f} s",
            flush=True,
        )
        if args.daemon:
            print(f"stop with: {sys.argv[0]} stop --data-dir {broker.data_dir}", flush=True)
            return 0
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            return broker.wait()
        except KeyboardInterrupt:
            broker.stop()
            return 0
    except BrokerError as exc:
        print(f"kafka_broker {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
