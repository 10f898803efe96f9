"""``open_store(url)``: a checkpoint store from a URL, as given to ``--checkpoint``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from stream_trainer.errors import ConfigError
from stream_trainer.redaction import mask_url

if TYPE_CHECKING:
    from stream_trainer.checkpoints.store import VersionedStore

__all__ = ["ACCEPTED_FORMS", "open_store"]

ACCEPTED_FORMS = (
    "redis://HOST:PORT/DB[?prefix=NAME&keep=K]",
    "rediss://HOST:PORT/DB[?prefix=NAME&keep=K&ssl_ca_certs=CA.pem"
    "&ssl_certfile=CERT.pem&ssl_keyfile=KEY.pem]",
    "file:///DIR[?keep=K]",
    "DIR (a plain path)",
    "memory://[?keep=K]",
)
_COMMON = {"keep", "chunk_size", "codec"}
_OPTIONS = {
    "redis": _COMMON
    | {"prefix", "retry", "pending_ttl_s", "socket_timeout_s", "connect_timeout_s"}
    | {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"},
    "file": _COMMON | {"fsync"},
    "memory": _COMMON,
}
# rediss:// only: a private CA, and a client certificate for servers that verify clients
_TLS = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"}
_QUERY = {"redis": {"prefix", "keep", "chunk_size"} | _TLS, "file": {"keep", "chunk_size"}}
_QUERY["memory"] = _QUERY["file"]


def open_store(url: str, **options: Any) -> VersionedStore:
    """Open the checkpoint store that ``url`` names.

    Accepted forms: ``redis://HOST:PORT/DB[?prefix=NAME&keep=K]`` (or ``rediss://``),
    ``file:///DIR`` or a plain path, ``memory://``. Query parameters ``keep`` and ``chunk_size``
    (bytes) work for every form. ``options`` are the store's keyword arguments (``keep``,
    ``chunk_size``, ``codec``, and per store ``prefix``, ``retry``, ``pending_ttl_s``,
    ``socket_timeout_s``, ``connect_timeout_s``, ``fsync``); an option also given in the URL
    overrides it. Unknown query parameters or options raise :class:`ConfigError`.

    ``rediss://`` (TLS) also takes ``ssl_ca_certs`` (a PEM file of the CA that signed the server's
    certificate, for a private CA; default: the system's trust store), and ``ssl_certfile`` with
    ``ssl_keyfile`` (a client certificate and its key, for servers started with
    ``--tls-auth-clients yes``), as query parameters or options; each file must exist.
    """
    if not isinstance(url, str) or not url.strip():
        raise _bad(url, "empty")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss"):
        kind = "redis"
    elif scheme in ("file", "memory"):
        kind = scheme
    elif scheme == "" or (len(scheme) == 1 and url[1:2] == ":"):
        kind, parts = "file", urlsplit("file://" + url.replace("?", "%3F"))
    else:
        raise _bad(url, f"unknown scheme {parts.scheme!r}")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - _QUERY[kind])
    if unknown:
        raise _bad(url, f"unknown parameter(s) {unknown}; allowed: {sorted(_QUERY[kind])}")
    for name in ("keep", "chunk_size"):
        if name in query:
            try:
                options[name] = int(query.pop(name))
            except ValueError:
                raise _bad(url, f"{name} must be an integer") from None
    if "prefix" in query:
        options["prefix"] = query.pop("prefix")
    for name in sorted(_TLS & set(query)):
        options[name] = query.pop(name)
    tls = sorted(_TLS & {k for k, v in options.items() if v is not None})
    if tls and scheme != "rediss":
        raise _bad(url, f"{', '.join(tls)} need a TLS URL (rediss://)")
    for name in tls:
        if not Path(options[name]).is_file():
            raise ConfigError(f"{name} {options[name]!r} of the checkpoint store is not a file")
    if ("ssl_certfile" in tls) != ("ssl_keyfile" in tls):
        raise ConfigError("a client certificate needs both ssl_certfile and ssl_keyfile")
    unknown = sorted(set(options) - _OPTIONS[kind])
    if unknown:
        msg = f"unknown option(s) {unknown} for a {kind} store; allowed: {sorted(_OPTIONS[kind])}"
        raise ConfigError(msg)
    # The stores load here, not with the module: ACCEPTED_FORMS serves the parser without torch.
    from stream_trainer.checkpoints.codec import DEFAULT_CHUNK_SIZE, CheckpointCodec
    from stream_trainer.checkpoints.local_store import LocalDirCheckpointStore
    from stream_trainer.checkpoints.memory_store import MemoryCheckpointStore
    from stream_trainer.checkpoints.redis_store import RedisCheckpointStore

    chunk_size = options.pop("chunk_size", DEFAULT_CHUNK_SIZE)
    if "codec" not in options or options["codec"] is None:
        options["codec"] = CheckpointCodec.from_env(chunk_size=chunk_size)
    if kind == "memory":
        return MemoryCheckpointStore(**options)
    if kind == "file":
        directory = parts.netloc + parts.path
        if not directory:
            raise _bad(url, "no directory")
        return LocalDirCheckpointStore(directory.replace("%3F", "?"), **options)
    if not parts.hostname:
        raise _bad(url, "no host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
        database = parts.path.strip("/") or "0"
        int(database)
    except ValueError:
        raise _bad(url, "port and DB must be integers") from None
    plain = urlunsplit((parts.scheme, parts.netloc, "/" + database, urlencode(query), ""))
    return RedisCheckpointStore.from_url(plain, **options)


def _bad(url: object, why: str) -> ConfigError:
    forms = ", ".join(ACCEPTED_FORMS)
    shown = mask_url(url) if isinstance(url, str) else url
    return ConfigError(f"bad checkpoint store URL {shown!r} ({why}); accepted forms: {forms}")
