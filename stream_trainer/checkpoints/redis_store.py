"""A checkpoint store in Redis (``redis://HOST:PORT/DB?prefix=NAME&keep=K``).

Keys, all under ``PREFIX``::

    PREFIX:v:N:part:I     part I of version N (written with a TTL until published)
    PREFIX:v:N:manifest   manifest of version N (idem)
    PREFIX:latest         the pointer: the newest published version
    PREFIX:versions       sorted set of published versions
    PREFIX:parts          hash: published version -> number of parts (for pruning)
    PREFIX:epoch          writer epoch (INCR); PREFIX:epoch:writer names who took it
    PREFIX:next_version   version counter (INCR)

A save writes, in this order:

1. every part, ``SET PREFIX:v:N:part:I <bytes> EX pending_ttl_s``, pipelined on one connection.
   The value of a part is sent straight from the tensors' memory (the RESP command is framed
   here and handed to redis-py's ``Connection.send_packed_command`` as a list of buffers, one
   per segment, so nothing is concatenated or copied). Meanwhile the calling thread computes the
   SHA-256 of the very same buffers; the two overlap (both release the GIL).
2. once every part is acknowledged, the manifest, which carries that SHA-256 (and the HMAC):
   ``SET PREFIX:v:N:manifest <json> EX pending_ttl_s``. A version without a manifest does not
   exist for a reader, so a manifest only ever stands beside parts that were all written.
3. a Lua script publishes version N atomically: it refuses if the writer's epoch is not
   ``PREFIX:epoch`` or if the manifest or any part of N is missing, otherwise it removes the
   TTLs, points ``PREFIX:latest`` at N and unlinks the published versions the store chose to
   prune (beyond ``keep``; see :mod:`~stream_trainer.checkpoints.store` for signed stores).

Keys of a write that never got published expire by themselves (``pending_ttl_s``). A load reads
the manifest, then the parts, and checks their sizes and SHA-256 before decoding anything, so a
damaged or tampered part is refused.

The Lua script builds key names from the prefix, so the store needs a single Redis (or a
cluster with every key of a prefix in one hash slot, e.g. ``prefix={trainer-1}``).

Redis must persist (AOF or RDB) for checkpoints to survive a Redis restart: a Redis that comes
back empty has lost the pointer and the epoch, and every writer holding an epoch is then fenced.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import queue
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from stream_trainer.checkpoints.checkpoint import Checkpoint
from stream_trainer.checkpoints.codec import (
    CheckpointCodec,
    ChunkedPart,
    EncodedCheckpoint,
    Part,
    PartData,
)
from stream_trainer.checkpoints.retry import RetryPolicy
from stream_trainer.checkpoints.store import DEFAULT_KEEP, StoreAccessError, VersionedStore
from stream_trainer.checkpoints.validation import CheckpointInvalidError
from stream_trainer.errors import CheckpointError, ConfigError, FencedWriterError

__all__ = ["DEFAULT_PREFIX", "RedisCheckpointStore"]

T = TypeVar("T")
DEFAULT_PREFIX = "stream-trainer:checkpoints"
# Buffers below this size are merged before they reach the socket (framing, small segments);
# larger ones are sent as they are, without a copy.
_COALESCE_BELOW = 64 * 1024

# KEYS: latest, epoch, versions, parts-hash.  ARGV: prefix, version, epoch, parts, then the
# published versions to delete (chosen by VersionedStore._to_drop).
_PUBLISH = """
local prefix, version = ARGV[1], tonumber(ARGV[2])
local epoch, nparts = tonumber(ARGV[3]), tonumber(ARGV[4])
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if current ~= epoch then return {'FENCED', tostring(current)} end
local latest = tonumber(redis.call('GET', KEYS[1]) or '0')
if latest == version then return {'OK', '0'} end
if latest > version then return {'STALE', tostring(latest)} end
local base = prefix .. ':v:' .. ARGV[2]
if redis.call('EXISTS', base .. ':manifest') == 0 then return {'MISSING', 'manifest'} end
for i = 0, nparts - 1 do
  if redis.call('EXISTS', base .. ':part:' .. i) == 0 then return {'MISSING', 'part ' .. i} end
end
redis.call('PERSIST', base .. ':manifest')
for i = 0, nparts - 1 do redis.call('PERSIST', base .. ':part:' .. i) end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], version, ARGV[2])
redis.call('HSET', KEYS[4], ARGV[2], nparts)
local old = {}
for i = 5, #ARGV do
  if redis.call('ZSCORE', KEYS[3], ARGV[i]) then table.insert(old, ARGV[i]) end
end
for _, gone in ipairs(old) do
  local count = tonumber(redis.call('HGET', KEYS[4], gone) or '0')
  local gbase = prefix .. ':v:' .. gone
  redis.call('UNLINK', gbase .. ':manifest')
  for i = 0, count - 1 do redis.call('UNLINK', gbase .. ':part:' .. i) end
  redis.call('ZREM', KEYS[3], gone)
  redis.call('HDEL', KEYS[4], gone)
end
return {'OK', tostring(#old)}
"""


class RedisCheckpointStore(VersionedStore):
    """Checkpoints in Redis; see the module docstring for keys and the publish script.

    Parameters
    ----------
    client
        A ``redis.Redis`` with ``decode_responses=False``. Use :meth:`from_url` in production: it
        turns off redis-py's own retries so that ``retry`` alone decides.
    prefix
        Key prefix; one trainer deployment per prefix.
    keep
        Published versions to keep.
    codec
        Encoder/decoder; default :meth:`CheckpointCodec.from_env`.
    retry
        Policy for connection errors and timeouts; when spent, :class:`StoreUnavailableError`
        (retriable) is raised.
    pending_ttl_s
        TTL of a version's keys until it is published, so abandoned writes expire.
    owns_client
        Close ``client`` on :meth:`close`.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        keep: int = DEFAULT_KEEP,
        codec: CheckpointCodec | None = None,
        retry: RetryPolicy | None = None,
        pending_ttl_s: int = 3600,
        owns_client: bool = False,
        read_chunk: int = 4 * 1024 * 1024,
    ) -> None:
        super().__init__(keep=keep, codec=codec)
        if isinstance(read_chunk, bool) or not isinstance(read_chunk, int) or read_chunk < 1:
            msg = f"read_chunk must be an int >= 1, got {read_chunk!r}"
            raise ConfigError(msg)
        self.read_chunk = read_chunk
        if not isinstance(prefix, str) or not prefix:
            msg = f"prefix must be a non-empty str, got {prefix!r}"
            raise ConfigError(msg)
        if isinstance(pending_ttl_s, bool) or not isinstance(pending_ttl_s, int):
            msg = f"pending_ttl_s must be an int, got {pending_ttl_s!r}"
            raise ConfigError(msg)
        if pending_ttl_s < 1:
            msg = f"pending_ttl_s must be >= 1, got {pending_ttl_s!r}"
            raise ConfigError(msg)
        if client.get_encoder().decode_responses:
            raise ConfigError("the Redis client must have decode_responses=False")
        self.client = client
        self.prefix = prefix
        self.pending_ttl_s = pending_ttl_s
        base = RetryPolicy() if retry is None else retry
        self._retry = base.with_errors((redis.ConnectionError, redis.TimeoutError))
        self._owns_client = owns_client
        self._publish_script = client.register_script(_PUBLISH)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        **options: Any,
    ) -> RedisCheckpointStore:
        """A store owning a client for ``url`` (``redis://HOST:PORT/DB``, or ``rediss://`` with
        the ``ssl_*`` files: a private CA, a client certificate and key); ``options`` as for the
        constructor."""
        tls = {
            name: value
            for name, value in (
                ("ssl_ca_certs", ssl_ca_certs),
                ("ssl_certfile", ssl_certfile),
                ("ssl_keyfile", ssl_keyfile),
            )
            if value is not None
        }
        client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            **tls,
        )
        return cls(client, owns_client=True, **options)

    def _key(self, *parts: object) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    def _call(self, operation: Callable[[], T], what: str) -> T:
        """``operation`` under the retry policy. A refusal of this client (credentials, TLS
        certificate, ACL) is raised at once as :class:`StoreAccessError`, never retried."""

        def attempt() -> T:
            try:
                return operation()
            except redis.RedisError as exc:
                problem = _access_problem(exc)
                if problem is None:
                    raise
                msg = f"redis {what}: {problem} ({exc})"
                raise StoreAccessError(msg) from exc

        try:
            return self._retry.call(attempt, what=f"redis {what}")
        except redis.RedisError as exc:
            msg = f"redis {what} failed: {exc}"
            raise CheckpointError(msg) from exc

    # ------------------------------------------------------------ epoch

    def _acquire_epoch(self, writer_id: str) -> int:
        def run() -> int:
            pipe = self.client.pipeline(transaction=True)
            pipe.incr(self._key("epoch"))
            pipe.set(self._key("epoch", "writer"), writer_id)
            return int(pipe.execute()[0])

        return self._call(run, "acquire epoch")

    def current_epoch(self) -> int:
        self._check_open()
        value = self._call(lambda: self.client.get(self._key("epoch")), "read epoch")
        return 0 if value is None else self._number(value, "epoch")

    # ------------------------------------------------------------ primitives

    def _reserve_version(self) -> int:
        return int(self._call(lambda: self.client.incr(self._key("next_version")), "reserve"))

    def _stage(self, checkpoint: Checkpoint) -> tuple[int, EncodedCheckpoint]:
        """Steps 2 and 3 of a save: reserve a version, then write its parts while hashing them,
        then its manifest (see the module docstring); nothing is published."""
        version = self._reserve_version()
        layout = self.codec.layout(replace(checkpoint, version=version))
        sha256 = self._write_parts_hashed(version, layout.parts)
        encoded = self.codec.seal(layout, sha256)
        self._write_manifest(version, encoded.manifest_bytes)
        return version, encoded

    def _write_version(self, version: int, encoded: EncodedCheckpoint) -> None:
        """Write the parts, then the manifest (no hashing: ``encoded`` is already sealed)."""
        self._call(lambda: self._send_parts(version, encoded.segments), f"write version {version}")
        self._write_manifest(version, encoded.manifest_bytes)

    def _write_manifest(self, version: int, manifest: bytes) -> None:
        key = self._key("v", version, "manifest")
        self._call(
            lambda: self.client.set(key, manifest, ex=self.pending_ttl_s),
            f"write manifest {version}",
        )

    def _write_parts_hashed(self, version: int, parts: Sequence[Part]) -> str:
        """Send ``parts`` on a helper thread while this thread hashes them; the hex SHA-256.

        Connection errors are retried (the whole set of parts again: ``SET`` is idempotent) on
        the helper thread; a final error is raised here once hashing is done.
        """
        failure: list[BaseException] = []

        def send() -> None:
            try:
                self._call(lambda: self._send_parts(version, parts), f"write version {version}")
            except BaseException as exc:  # re-raised on the calling thread
                failure.append(exc)

        thread = threading.Thread(target=send, name="checkpoint-write", daemon=True)
        thread.start()
        try:
            digest = hashlib.sha256()
            for part in parts:
                for segment in part:
                    digest.update(segment)
        finally:
            thread.join()
        if failure:
            raise failure[0]
        return digest.hexdigest()

    def _send_parts(self, version: int, parts: Sequence[Part]) -> None:
        """``SET`` every part with the pending TTL, pipelined on one pooled connection, framed
        here so that each segment goes to the socket as it is (see the module docstring)."""
        if not parts:
            return
        encode = self.client.get_encoder().encode
        ttl = str(self.pending_ttl_s).encode()
        buffers: list[bytes | memoryview] = []
        for index, part in enumerate(parts):
            key = encode(self._key("v", version, "part", index))
            size = sum(len(segment) for segment in part)
            buffers.append(b"*5\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n" % (len(key), key, size))
            buffers.extend(part)
            buffers.append(b"\r\n$2\r\nEX\r\n$%d\r\n%b\r\n" % (len(ttl), ttl))
        pool = self.client.connection_pool
        connection = _pooled_connection(pool)
        try:
            connection.send_packed_command(_coalesce(buffers))
            replies = [connection.read_response() for _ in parts]
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
        if any(reply not in (b"OK", "OK") for reply in replies):
            msg = f"unexpected replies to SET: {replies!r}"
            raise CheckpointError(msg)

    def _publish(self, version: int, epoch: int, parts: int, drop: Sequence[int]) -> None:
        keys = [self._key("latest"), self._key("epoch"), self._key("versions"), self._key("parts")]
        args: list[str | int] = [self.prefix, version, epoch, parts, *drop]
        status, detail = self._call(
            lambda: self._publish_script(keys=keys, args=args), f"publish version {version}"
        )
        if status == b"FENCED":
            msg = (
                f"epoch {epoch} is not the current epoch {detail.decode()}; "
                f"version {version} not published"
            )
            raise FencedWriterError(msg)
        if status == b"STALE":
            msg = f"version {version} is older than the latest version {detail.decode()}"
            raise CheckpointError(msg)
        if status == b"MISSING":
            msg = f"version {version} is incomplete ({detail.decode()} missing); not published"
            raise CheckpointError(msg)

    def _read_manifest(self, version: int) -> bytes | None:
        key = self._key("v", version, "manifest")
        value = self._call(lambda: self.client.get(key), f"read manifest {version}")
        return value  # type: ignore[return-value]

    def _read_parts(self, version: int, count: int) -> Sequence[bytes | None]:
        def run() -> list[bytes | None]:
            pipe = self.client.pipeline(transaction=False)
            for index in range(count):
                pipe.get(self._key("v", version, "part", index))
            return pipe.execute()

        return self._call(run, f"read version {version}")

    def _read_parts_hashed(
        self, version: int, sizes: Sequence[int]
    ) -> tuple[Sequence[PartData | None], str | None]:
        """Read the parts in ranges of ``read_chunk`` bytes on a helper thread while this thread
        hashes the ranges already received: the transfer and the SHA-256 overlap (both release
        the GIL), so a load costs about the transfer, not the transfer plus the hash.

        A part read in several ranges comes back as a :class:`ChunkedPart` (the decoder joins the
        ranges of a whole section at once); a missing part (GETRANGE of a missing key reads
        ``b""``) comes back as ``None``.
        """

        def run() -> tuple[list[PartData | None], str]:
            ranges: queue.Queue[tuple[int, bytes | None] | BaseException | None] = queue.Queue(
                maxsize=8
            )

            def fetch() -> None:
                try:
                    for index, size in enumerate(sizes):
                        key = self._key("v", version, "part", index)
                        if size == 0:
                            ranges.put((index, b""))
                        for start in range(0, size, self.read_chunk):
                            end = min(size, start + self.read_chunk) - 1
                            chunk = cast(bytes, self.client.getrange(key, start, end))
                            if not chunk and start == 0 and not self.client.exists(key):
                                ranges.put((index, None))
                                break
                            ranges.put((index, chunk))
                            if len(chunk) < end - start + 1:
                                break  # a short part: the size check reports it
                except BaseException as exc:  # re-raised on the reading thread
                    ranges.put(exc)
                    return
                ranges.put(None)

            thread = threading.Thread(target=fetch, name="checkpoint-read", daemon=True)
            thread.start()
            digest = hashlib.sha256()
            chunks: list[list[bytes]] = [[] for _ in sizes]
            missing: set[int] = set()
            while True:
                item = ranges.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    thread.join()
                    raise item
                index, chunk = item
                if chunk is None:
                    missing.add(index)
                    continue
                digest.update(chunk)
                chunks[index].append(chunk)
            thread.join()
            parts: list[PartData | None] = [
                None if i in missing else c[0] if len(c) == 1 else ChunkedPart(c)
                for i, c in enumerate(chunks)
            ]
            return parts, digest.hexdigest()

        parts, sha256 = self._call(run, f"read version {version}")
        return parts, sha256

    def _pointer(self) -> int | None:
        value = self._call(lambda: self.client.get(self._key("latest")), "read latest")
        return None if value is None else self._number(value, "latest")

    def _published(self) -> list[int]:
        members = self._call(lambda: self.client.zrange(self._key("versions"), 0, -1), "list")
        return sorted(self._number(member, "versions") for member in members)  # type: ignore[arg-type]

    def _number(self, value: bytes | str, key: str) -> int:
        """A version or epoch number stored under ``PREFIX:key``; a value that is not one is a
        damaged store (:class:`CheckpointCorruptError`), never a ``ValueError``."""
        if len(value) <= 20 and value.isdigit():
            return int(value)
        msg = f"{self._key(key)} holds {value[:40]!r}, not a number"
        raise CheckpointInvalidError(msg, reason="manifest")

    def _close(self) -> None:
        if self._owns_client:
            self.client.close()


def _coalesce(buffers: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """Merge runs of small buffers (fewer, larger socket writes); large ones pass uncopied."""
    out: list[bytes | memoryview] = []
    pending = bytearray()
    for buffer in buffers:
        if len(buffer) < _COALESCE_BELOW:
            pending += buffer
            continue
        if pending:
            out.append(bytes(pending))
            pending.clear()
        out.append(buffer)
    if pending:
        out.append(bytes(pending))
    return out


# Transient TLS failures (the peer went away mid-handshake): retried like any connection error.
def _pooled_connection(pool: redis.ConnectionPool) -> Any:
    """A connection from ``pool``. redis-py before 5.3 requires a command name (used for nothing
    but its signature); later versions deprecate passing one."""
    if _needs_command_name(type(pool)):
        return pool.get_connection("SET")
    return pool.get_connection()


@functools.cache
def _needs_command_name(pool_type: type[redis.ConnectionPool]) -> bool:
    parameters = inspect.signature(pool_type.get_connection).parameters
    name = parameters.get("command_name")
    return name is not None and name.default is inspect.Parameter.empty


_TRANSIENT_TLS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLWantReadError)


def _access_problem(error: BaseException) -> str | None:
    """What makes ``error`` a refusal of this client rather than an outage, or ``None``.

    Decided on exception types only: redis-py's :class:`~redis.AuthenticationError` (WRONGPASS,
    NOAUTH, invalid password) and :class:`~redis.exceptions.NoPermissionError` (ACL), and an
    :class:`ssl.SSLError` in the error's cause chain (redis-py keeps the socket error as the
    cause), except the transient ones above.
    """
    if isinstance(error, redis.AuthenticationError):
        return "authentication failed: check the password (and user) in the store URL"
    if isinstance(error, redis.exceptions.NoPermissionError):
        return "permission denied by the server's ACL for this user"
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "TLS certificate verification failed: check the server certificate and CA"
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, _TRANSIENT_TLS):
            return "TLS handshake refused: check the TLS settings of the URL and the server"
        cause = cause.__cause__ or cause.__context__
    return None
