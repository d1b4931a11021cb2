"""Thin ZeroMQ edges: the daemon's ROUTER socket and a worker's DEALER sockets, moving encoded messages.

Everything above this module sees `Message` objects; everything below is frames. Socket options bound
what a peer can make us allocate (MAXMSGSIZE) and how long a dead peer can hold us (LINGER).
"""

from __future__ import annotations

import zmq
import zmq.asyncio

from protocol.messages import MAX_FRAME_BYTES, Message, decode, encode

# high-water marks: a worker that stops reading must not make the daemon buffer without bound
SEND_HWM = 1000


def _configure(sock: zmq.Socket, max_bytes: int) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SEND_HWM)
    sock.setsockopt(zmq.RCVHWM, SEND_HWM)


class RouterEndpoint:
    """The daemon's side: one ROUTER socket bound to one or more addresses (ipc:// or tcp://)."""

    def __init__(self, ctx: zmq.asyncio.Context, max_bytes: int = MAX_FRAME_BYTES) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        _configure(self.sock, max_bytes)
        # a worker whose identity reconnects replaces the old pipe instead of being dropped
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # fail loudly (EHOSTUNREACH) instead of silently dropping frames for a vanished worker
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.max_bytes = max_bytes

    def bind(self, address: str) -> str:
        self.sock.bind(address)
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    async def recv(self) -> tuple[bytes, bytes]:
        """Next (identity, raw frame); decoding is the caller's, so a bad frame can be pinned on its sender."""
        parts = await self.sock.recv_multipart(copy=True)
        if len(parts) != 2:
            return parts[0], b""  # decodes to a ProtocolError for the caller to count
        return parts[0], parts[1]

    def send(self, identity: bytes, msg: Message) -> None:
        """Queue a message for a worker; raises zmq.ZMQError (EHOSTUNREACH) if it is not connected."""
        # zmq.asyncio returns a future even with NOBLOCK; it is already done, and holds any error
        self.sock.send_multipart([identity, encode(msg)], flags=zmq.NOBLOCK).result()

    def close(self) -> None:
        self.sock.close(linger=0)


class DealerEndpoint:
    """A worker's side: a DEALER socket with a fixed identity, connected to the daemon (blocking API)."""

    def __init__(self, ctx: zmq.Context, identity: bytes, address: str, max_bytes: int = MAX_FRAME_BYTES) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        _configure(self.sock, max_bytes)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(address)
        self.max_bytes = max_bytes

    def send(self, msg: Message) -> None:
        self.sock.send(encode(msg))

    def recv(self, timeout_ms: int | None = None) -> Message | None:
        """The next message, or None on timeout; a malformed frame raises ProtocolError."""
        if timeout_ms is not None and not self.sock.poll(timeout_ms, zmq.POLLIN):
            return None
        return decode(self.sock.recv(copy=True), self.max_bytes)

    def close(self) -> None:
        self.sock.close(linger=0)
