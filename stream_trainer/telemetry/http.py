"""The service's HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz``, in a daemon thread.

``/healthz`` answers 200 while the process can answer at all (liveness: restart on failure).
``/readyz`` answers 200 only while the injected ``health()`` says both consuming and checkpointing
are fine, else 503 with a JSON body saying why (readiness: alert, stop routing to it).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from stream_trainer.errors import ConfigError

__all__ = [
    "DEFAULT_METRICS_ADDRESS",
    "HealthState",
    "MetricsServer",
    "parse_metrics_address",
]

DEFAULT_METRICS_ADDRESS: Final = "127.0.0.1:9100"
"""Loopback by default: exposing metrics beyond the host is an explicit choice (compose uses
``0.0.0.0:9100``)."""

_JSON: Final = "application/json; charset=utf-8"
_TEXT: Final = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class HealthState:
    """What the service loop reports about itself; ``ready`` when both parts are OK.

    ``reasons`` says, in words, what is wrong (for example ``"no batch for 120 s"`` or
    ``"last 3 checkpoints failed"``); it is returned in the ``/readyz`` body.
    """

    consuming: bool
    checkpointing: bool
    reasons: tuple[str, ...] = field(default=())

    @property
    def ready(self) -> bool:
        return self.consuming and self.checkpointing

    def as_dict(self) -> dict[str, object]:
        return {
            "ready": self.ready,
            "consuming": self.consuming,
            "checkpointing": self.checkpointing,
            "reasons": list(self.reasons),
        }


def parse_metrics_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:9100`` for IPv6) into a host and a port in [0, 65535].

    Port 0 asks the OS for a free port (see :attr:`MetricsServer.port`).

    >>> parse_metrics_address("0.0.0.0:9100")
    ('0.0.0.0', 9100)
    >>> parse_metrics_address("[::1]:0")
    ('::1', 0)
    """
    if not isinstance(address, str):
        msg = f"--metrics-address must be HOST:PORT, got {address!r}"
        raise ConfigError(msg)
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        msg = f"--metrics-address: write an IPv6 host in brackets, like [::1]:9100, got {address!r}"
        raise ConfigError(msg)
    if not sep or not host or not port_text.isdigit():
        msg = (
            f"--metrics-address must be HOST:PORT (like {DEFAULT_METRICS_ADDRESS}), got {address!r}"
        )
        raise ConfigError(msg)
    port = int(port_text)
    if port > 65535:
        msg = f"--metrics-address port must be in [0, 65535], got {port} in {address!r}"
        raise ConfigError(msg)
    return host, port


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        health: Callable[[], HealthState],
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.registry = registry
        self.health = health
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that stops sending cannot hold a thread forever
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, content_type, encoder(self.server.registry))
        elif path == "/healthz":
            self._reply(200, _TEXT, b"ok\n")
        elif path == "/readyz":
            try:
                state = self.server.health()
                body = state.as_dict()
                status = 200 if state.ready else 503
            except Exception as exc:  # a broken health callback must not look ready
                body = {"ready": False, "reasons": [f"health check raised {exc!r}"]}
                status = 503
            self._reply(status, _JSON, json.dumps(body).encode() + b"\n")
        else:
            self._reply(404, _TEXT, b"not found; try /metrics, /healthz or /readyz\n")

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request access log: Prometheus scrapes every few seconds."""


class MetricsServer:
    """Serve a registry and the service's health over HTTP from a daemon thread.

    Parameters
    ----------
    address
        ``HOST:PORT`` to listen on (see :func:`parse_metrics_address`); port 0 picks a free port,
        read back from :attr:`port` after :meth:`start`.
    registry
        The registry to expose, usually ``ServiceMetrics.registry``.
    health
        Called on each ``/readyz`` request (from a server thread: keep it cheap and thread-safe).

    Examples
    --------
    >>> from prometheus_client import CollectorRegistry
    >>> server = MetricsServer("127.0.0.1:0", CollectorRegistry(),
    ...                        health=lambda: HealthState(consuming=True, checkpointing=True))
    >>> with server:
    ...     server.port > 0
    True
    """

    def __init__(
        self,
        address: str,
        registry: CollectorRegistry,
        *,
        health: Callable[[], HealthState],
    ) -> None:
        self.host, self._requested_port = parse_metrics_address(address)
        self.registry = registry
        self._health = health
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def port(self) -> int:
        """The bound port (the OS's choice when the address said port 0) once started."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> MetricsServer:
        """Bind and serve in a daemon thread. Raises :class:`ConfigError` when the address cannot
        be bound (in use, not an address of this host)."""
        with self._lock:
            if self._closed:
                msg = "MetricsServer was closed; create a new one"
                raise RuntimeError(msg)
            if self._server is not None:
                return self
            try:
                server = _Server((self.host, self._requested_port), self.registry, self._health)
            except OSError as exc:
                msg = f"cannot listen on {self.host}:{self._requested_port} for metrics: {exc}"
                raise ConfigError(msg) from exc
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.2},
                name=f"metrics-http-{server.server_address[1]}",
                daemon=True,
            )
            thread.start()
            self._server, self._thread = server, thread
        return self

    def close(self) -> None:
        """Stop serving and release the port. Idempotent; returns within about a second."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.shutdown()  # only safe once serve_forever runs: guarded by thread is not None
            server.server_close()
            thread.join(timeout=1.0)

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
