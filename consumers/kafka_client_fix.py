"""Two fixes to kafka-python 3.0's connections, applied when this module is imported (first thing
:mod:`consumers` does), so that a wrong password fails at once with its own error.

kafka-python 3.0 reads a socket until it would block; when the peer closes the connection right
after its last response, that read ends with both the response's bytes and the end of the stream,
and the transport aborts with "socket disconnected" *without handing the bytes to the protocol*.
A broker answers a failed SASL authentication exactly that way (the error response, then the
close), so a wrong password looked like an unreachable broker and was retried as one. The fixed
read loop hands over what arrived before the close, and lets the coroutine waiting for it run
before the abort, so kafka-python sees the broker's answer.

Then ``KafkaConnection.initialize`` only records that answer on the connection, so the
connection manager, which remembers a node's authentication failure and raises it on the next
attempt, never learns of it, and the bootstrap keeps trying until its deadline. The fixed
``initialize`` raises an authentication or authorization failure after recording it: the
bootstrap then stops with :class:`kafka.errors.SaslAuthenticationFailedError` (not retriable).
"""

from __future__ import annotations

import time
from typing import Any

from kafka import errors as kafka_errors
from kafka.net import connection as _connection
from kafka.net import transport as _transport

__all__ = ["APPLIED", "apply"]


async def _read_from_sock(self: Any) -> Any:
    """``KafkaTCPTransport._read_from_sock`` that delivers the bytes read before an error."""
    while self._read and not self._closed:
        await self._net.wait_read(self._sock)
        recvd_data, err = self._sock_recv()
        if recvd_data:
            self.last_read = time.monotonic()
            if self._protocol and self._protocol._sensors:
                self._protocol._sensors.bytes_received.record(len(recvd_data))
            try:
                self._protocol.data_received(recvd_data)
            except kafka_errors.KafkaProtocolError as e:
                return self.abort(error=e)
        if err:
            if recvd_data:
                # One turn of the loop first: the coroutine waiting for that last response
                # (the SASL handshake) reads it and closes the connection with its error.
                await self._net.sleep(0)
            return None if self._closed else self.abort(error=err)
    return None


_AUTH_FAILURES = (kafka_errors.SaslAuthenticationFailedError, kafka_errors.AuthorizationError)


def _raising_initialize(initialize: Any) -> Any:
    async def fixed(self: Any, timeout_at: Any = None) -> None:
        """``KafkaConnection.initialize`` that raises an authentication failure it recorded."""
        await initialize(self, timeout_at)
        future = self._init_future
        if future.is_done and isinstance(future.exception, _AUTH_FAILURES):
            raise future.exception

    fixed.__wrapped__ = initialize  # type: ignore[attr-defined]
    return fixed


def apply() -> bool:
    """Install both fixes; False (and nothing changed) on a kafka-python whose classes do not
    have the methods they replace."""
    transport = getattr(_transport, "KafkaTCPTransport", None)
    connection = getattr(_connection, "KafkaConnection", None)
    if transport is None or connection is None:
        return False
    if not all(hasattr(transport, m) for m in ("_read_from_sock", "_sock_recv")):
        return False
    if not hasattr(connection, "initialize"):
        return False
    transport._read_from_sock = _read_from_sock
    if not hasattr(connection.initialize, "__wrapped__"):  # once
        connection.initialize = _raising_initialize(connection.initialize)
    return True


APPLIED = apply()
