"""The service's HTTP endpoint, in a daemon thread.

- ``GET /metrics``: the registry, in the text or OpenMetrics format the client asks for.
- ``GET /healthz`` (liveness: restart on failure): 200 while the injected ``liveness()`` says the
  loop is alive (or when none is given), else 503 with a JSON body saying since when it is stuck.
- ``GET /readyz`` (readiness: alert, stop routing to it): 200 only while the injected
  ``health()`` says both consuming and checkpointing are fine, else 503 with a JSON body saying
  why.
- ``GET /model`` and ``POST /predict``, when a :class:`ModelEndpoint` is given: what the model is,
  and predictions of the live model. This layer checks the request itself (method, content type,
  a ``Content-Length`` of at most ``max_body_bytes``, UTF-8 JSON) and answers 4xx with a JSON
  ``{"error": ...}`` when it fails; the endpoint judges the records. Bad input is never a 5xx.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from stream_trainer.errors import ConfigError
from stream_trainer.records import MAX_JSON_DEPTH, json_depth_exceeds

log = logging.getLogger("stream_trainer.http")

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_METRICS_ADDRESS",
    "HealthState",
    "Liveness",
    "MetricsServer",
    "ModelEndpoint",
    "parse_metrics_address",
]

DEFAULT_METRICS_ADDRESS: Final = "127.0.0.1:9100"
"""Loopback by default: exposing metrics beyond the host is an explicit choice (compose uses
``0.0.0.0:9100``)."""

DEFAULT_MAX_BODY_BYTES: Final = 1 << 20
"""Largest ``POST /predict`` body read (1 MiB); a longer one is answered 413 unread."""

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


@dataclass(frozen=True, slots=True)
class Liveness:
    """Whether the service loop still turns: ``alive``, else ``reason`` says since when not."""

    alive: bool
    reason: str = ""


class ModelEndpoint(Protocol):
    """What ``/model`` and ``/predict`` call (from server threads: must be thread-safe)."""

    @property
    def predict_enabled(self) -> bool:
        """Whether ``POST /predict`` is served (else it answers 404 saying how to enable it)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The body of ``GET /model``."""
        ...

    def predict(self, payload: Any) -> tuple[int, dict[str, Any]]:
        """Status and JSON body for the parsed JSON body of a ``POST /predict``."""
        ...


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


_UNREAD: Final = object()
"""What :meth:`_Handler._read_json` returns once it has answered the request with a 4xx."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        health: Callable[[], HealthState],
        liveness: Callable[[], Liveness] | None,
        model: ModelEndpoint | None,
        max_body_bytes: int,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.registry = registry
        self.health = health
        self.liveness = liveness
        self.model = model
        self.max_body_bytes = max_body_bytes
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that stops sending cannot hold a thread forever
    # Headers and body go out in two writes: with Nagle's algorithm the second would wait for
    # the client's delayed ACK of the first (tens of milliseconds on every keep-alive request).
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, content_type, encoder(self.server.registry))
        elif path == "/healthz":
            self._healthz()
        elif path == "/readyz":
            try:
                state = self.server.health()
                body = state.as_dict()
                status = 200 if state.ready else 503
            except Exception as exc:  # a broken health callback must not look ready
                body = {"ready": False, "reasons": [f"health check raised {exc!r}"]}
                status = 503
            self._reply_json(status, body)
        elif path == "/model" and self.server.model is not None:
            self._reply_json(200, self._guarded(self.server.model.describe))
        elif path == "/predict":
            self._reply_json(405, {"error": "use POST /predict"}, allow="POST")
        else:
            self._reply(404, _TEXT, b"not found; try /metrics, /healthz, /readyz or /model\n")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        model = self.server.model
        if path != "/predict" or model is None:
            self._refuse(404, f"no POST {path}; POST JSON records to /predict")
            return
        if not model.predict_enabled:
            self._refuse(404, "POST /predict is off: start the service with --serve-predictions")
            return
        payload = self._read_json()
        if payload is _UNREAD:
            return
        status, body = 500, {"error": "internal error"}
        try:
            status, body = model.predict(payload)
        except Exception:  # a bug, not the client's input: say so, keep serving
            log.exception("POST /predict failed")
        self._reply_json(status, body)

    def do_PUT(self) -> None:
        """Any other method: 405 naming the allowed one (never the base class's 501)."""
        allow = "POST" if self.path.split("?", 1)[0] == "/predict" else "GET"
        self.close_connection = True
        self._reply_json(405, {"error": f"use {allow}"}, allow=allow, close=True)

    do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_PUT

    def _healthz(self) -> None:
        liveness = self.server.liveness
        if liveness is None:
            self._reply(200, _TEXT, b"ok\n")
            return
        try:
            state = liveness()
        except Exception as exc:  # a broken liveness callback must not look alive
            state = Liveness(alive=False, reason=f"liveness check raised {exc!r}")
        if state.alive:
            self._reply(200, _TEXT, b"ok\n")
        else:
            self._reply_json(503, {"alive": False, "reason": state.reason})

    def _read_json(self) -> Any:
        """The request's JSON body, or :data:`_UNREAD` once a 4xx has been answered."""
        content_type = self.headers.get("Content-Type", "")
        media, _, params = content_type.partition(";")
        if media.strip().lower() != "application/json":
            shown = content_type[:100]
            self._refuse(415, f"send Content-Type: application/json, got {shown!r}")
            return _UNREAD
        charset = params.strip().lower().removeprefix("charset=").strip('"')
        if params.strip() and charset not in ("utf-8", "utf8"):
            self._refuse(415, "the body must be UTF-8 JSON")
            return _UNREAD
        if self.headers.get("Transfer-Encoding"):
            self._refuse(411, "send the body with a Content-Length, not chunked")
            return _UNREAD
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.strip().isdigit():
            self._refuse(411, "a Content-Length header is required")
            return _UNREAD
        length, limit = int(length_text), self.server.max_body_bytes
        if length > limit:
            self._refuse(413, f"the body is {length} bytes, more than the limit of {limit}")
            return _UNREAD
        try:
            raw = self.rfile.read(length)
        except OSError:  # the client stalled past the handler's timeout, or reset
            raw = b""
        if len(raw) < length:
            self.close_connection = True
            return _UNREAD  # the client went away
        if json_depth_exceeds(raw, MAX_JSON_DEPTH + 1):
            message = f"the JSON nests deeper than {MAX_JSON_DEPTH + 1}"
            self._reply_json(400, {"error": message, "reason": "too_deep"})
            return _UNREAD
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            self._reply_json(400, {"error": "the body is not UTF-8"})
        except ValueError as exc:
            self._reply_json(400, {"error": f"the body is not JSON: {exc}"})
        return _UNREAD

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` without reading the body, then close the connection (the unread
        body would otherwise be taken for the next request)."""
        self.close_connection = True
        self._reply_json(status, {"error": message}, close=True)

    @staticmethod
    def _guarded(describe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        try:
            return describe()
        except Exception as exc:
            log.exception("GET /model failed")
            return {"error": f"cannot describe the model: {exc!r}"}

    def _reply_json(
        self, status: int, body: dict[str, Any], *, allow: str | None = None, close: bool = False
    ) -> None:
        data = json.dumps(body, allow_nan=False, separators=(",", ":")).encode() + b"\n"
        extra = {"Allow": allow} if allow else {}
        if close:
            extra["Connection"] = "close"
        self._reply(status, _JSON, data, extra)

    def _reply(
        self,
        status: int,
        content_type: str,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
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
    liveness
        Called on each ``/healthz`` request, likewise; ``None``: ``/healthz`` is always 200.
    model
        Serves ``GET /model`` and ``POST /predict``; ``None``: both answer 404.
    max_body_bytes
        Largest ``POST /predict`` body accepted (413 above it).

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
        liveness: Callable[[], Liveness] | None = None,
        model: ModelEndpoint | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if max_body_bytes < 1:
            msg = f"max_body_bytes must be >= 1, got {max_body_bytes!r}"
            raise ConfigError(msg)
        self.host, self._requested_port = parse_metrics_address(address)
        self.registry = registry
        self._health = health
        self._liveness = liveness
        self._model = model
        self._max_body_bytes = max_body_bytes
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
                server = _Server(
                    (self.host, self._requested_port),
                    self.registry,
                    self._health,
                    self._liveness,
                    self._model,
                    self._max_body_bytes,
                )
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
