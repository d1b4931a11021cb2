"""Thin ZeroMQ edges: the daemon's ROUTER socket and a worker's DEALER sockets, moving encoded messages.

Everything above this module sees `Message` objects; everything below is frames. Socket options bound
what a peer can make us allocate (MAXMSGSIZE) and how long a dead peer can hold us (LINGER). With keys,
both sides speak CURVE (encrypted, and only allow-listed worker keys get in); without, the link must be
ipc:// (guarded by its folder's permissions) or loopback TCP the operator allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from protocol.keys import AllowList, ClientKeys, ServerKeys
from protocol.messages import MAX_FRAME_BYTES, Message, decode, encode

log = logging.getLogger("nimbus.transport")
# high-water marks: a worker that stops reading must not make the daemon buffer without bound
SEND_HWM = 1000
# messages the daemon takes off its socket per wake-up at most, so one busy worker cannot hold the loop long
RECV_BATCH = 256
ZAP_DOMAIN = "nimbus"
# libzmq gives up on a link whose handshake the daemon refused; the worker tries again this often
REFUSED_RETRY_S = 5.0
_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_REFUSALS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the daemon at %s refused this worker's key: is its public key in the "
                                     "daemon's authorized/ folder? (retrying every %.0fs)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the daemon at %s refused the handshake: one side uses CURVE keys and "
                                         "the other does not (retrying every %.0fs)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the security handshake with the daemon at %s failed: a wrong "
                                          "server.key, or CURVE on one side only? (libzmq retries; logged every %.0fs)",
}


def check_plain_link(address: str, allow_plain_tcp: bool) -> None:
    """Raises ValueError unless `address` may carry worker traffic without CURVE: ipc:// (guarded by its
    folder's permissions), or tcp:// to a loopback address (127.0.0.0/8, ::1) when plain TCP is allowed."""
    scheme, _, rest = address.partition("://")
    if scheme == "ipc":
        return
    if scheme != "tcp":
        raise ValueError(f"{address}: workers attach over tcp:// or ipc:// only")
    host = rest.rpartition(";")[2].rpartition(":")[0].strip("[]")  # tcp://[SOURCE;]HOST:PORT
    if not allow_plain_tcp:
        raise ValueError(f"{address} would carry worker traffic unencrypted: use CURVE keys "
                         "(`nimbus keys generate`), or explicitly allow plain TCP on a loopback address")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{address}: plain TCP is allowed on a loopback address only (127.0.0.1 or ::1, "
                         "not a name or a wildcard); anywhere else use CURVE keys")


def _configure(sock: zmq.Socket, max_bytes: int) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SEND_HWM)
    sock.setsockopt(zmq.RCVHWM, SEND_HWM)


class RouterEndpoint:
    """The daemon's side: one ROUTER socket bound to one or more addresses (ipc:// or tcp://).

    With `curve` keys it is a CURVE server on every address it binds (CURVE is per socket, not per
    address), and a ZAP authenticator admits only the public keys `allow` holds.
    """

    def __init__(self, ctx: zmq.Context, max_bytes: int = MAX_FRAME_BYTES, curve: ServerKeys | None = None,
                 allow: AllowList | None = None) -> None:
        # A plain (blocking-API) socket, used only with NOBLOCK, its FD watched by the event loop: zmq.asyncio
        # makes a future and a poller round per call, which cost the daemon's step loop more than the send.
        # `ctx` may be a zmq.asyncio.Context; the shadow shares its libzmq context (ctx.term() still ends it).
        self._ctx = zmq.Context.shadow(ctx.underlying)
        self.sock = self._ctx.socket(zmq.ROUTER)
        _configure(self.sock, max_bytes)
        # a worker whose identity reconnects replaces the old pipe instead of being dropped
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # fail loudly (EHOSTUNREACH) instead of silently dropping frames for a vanished worker
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.max_bytes = max_bytes
        self.auth: ThreadAuthenticator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set when recv first waits: it watches our FD
        self._waiter: asyncio.Future[None] | None = None
        if curve is not None:
            self._require_curve(ctx, curve, allow or AllowList(curve.authorized))

    def _require_curve(self, ctx: zmq.Context, keys: ServerKeys, allow: AllowList) -> None:
        # The authenticator runs before anything binds: a CURVE server without a ZAP handler lets in
        # every client that knows its public key. Its own thread, so handshakes never wait on our loop.
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("nimbus.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(ZAP_DOMAIN, allow)
        self.sock.curve_secretkey = keys.secret
        self.sock.curve_publickey = keys.public
        self.sock.curve_server = True
        self.sock.zap_domain = ZAP_DOMAIN.encode()
        with contextlib.suppress(AttributeError, zmq.ZMQError):  # and refuse all if the handler ever went away
            self.sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def bind(self, address: str) -> str:
        self.sock.bind(address)
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    async def recv(self) -> tuple[bytes, bytes]:
        """Next (identity, raw frame); decoding is the caller's, so a bad frame can be pinned on its sender."""
        while True:
            batch = self._recv_ready(1)
            if batch:
                return batch[0]
            await self._readable()

    async def recv_batch(self, limit: int = RECV_BATCH) -> list[tuple[bytes, bytes]]:
        """Every (identity, raw frame) queued now, at most `limit`, in arrival order; waits for at least one."""
        while True:
            batch = self._recv_ready(limit)
            if batch:
                return batch
            await self._readable()

    def _recv_ready(self, limit: int) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        recv = self.sock.recv_multipart
        while len(out) < limit:
            try:
                parts = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            # a frame count other than 2 decodes (b"") to a ProtocolError for the caller to count
            out.append((parts[0], parts[1] if len(parts) == 2 else b""))
        return out

    async def _readable(self) -> None:
        """Wait until the socket may hold a message. libzmq's FD only signals that its state changed (it is
        cleared by any call that reads the state, a send included), so EVENTS is checked before waiting and
        `send` wakes a waiter itself when it finds input queued."""
        if self.sock.get(zmq.EVENTS) & zmq.POLLIN:
            return
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                with contextlib.suppress(RuntimeError):  # a loop that is closed already
                    self._loop.remove_reader(self.sock.fd)
            self._loop = loop
            loop.add_reader(self.sock.fd, self._on_fd)
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _on_fd(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        else:  # nobody waits (the receiver is busy and drains before it waits): clear the FD, or it fires again
            self.sock.get(zmq.EVENTS)

    def send(self, identity: bytes, msg: Message) -> None:
        """Queue a message for a worker; raises zmq.ZMQError (EHOSTUNREACH if it is not connected, zmq.Again if
        its queue is full)."""
        self.sock.send_multipart([identity, encode(msg)], flags=zmq.NOBLOCK)
        # the send may have read the FD's signal of a message that came meanwhile: hand it on to the receiver
        waiter = self._waiter
        if waiter is not None and not waiter.done() and self.sock.get(zmq.EVENTS) & zmq.POLLIN:
            waiter.set_result(None)

    def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError, ValueError, zmq.ZMQError):  # a closed loop, or socket
                self._loop.remove_reader(self.sock.fd)
            self._loop = None
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()


class DealerEndpoint:
    """A worker's side: a DEALER socket with a fixed identity, connected to the daemon (blocking API).

    A monitor watches the handshake: a refusal is logged, and since libzmq never retries a link the
    daemon refused, the endpoint reconnects every REFUSED_RETRY_S (a key allow-listed later gets in).
    """

    def __init__(self, ctx: zmq.Context, identity: bytes, address: str, max_bytes: int = MAX_FRAME_BYTES,
                 curve: ClientKeys | None = None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        _configure(self.sock, max_bytes)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        if curve is not None:
            self.sock.curve_secretkey = curve.secret
            self.sock.curve_publickey = curve.public
            self.sock.curve_serverkey = curve.server
        self.monitor = self.sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.address = address
        self.refused = False
        self._retry_at: float | None = None
        self._last_warning = -REFUSED_RETRY_S
        self.sock.connect(address)
        self.max_bytes = max_bytes

    def send(self, msg: Message) -> None:
        """Blocks while the queue is full, or while there is no link (the daemon refused us)."""
        frame = encode(msg)
        while True:
            try:
                self.sock.send(frame, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                self.sock.poll(100, zmq.POLLOUT)
                self._watch_link()

    def recv(self, timeout_ms: int | None = None) -> Message | None:
        """The next message, or None on timeout; a malformed frame raises ProtocolError."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            self._watch_link()
            # rounded up: truncating would turn the last millisecond before the deadline into a busy loop
            wait_ms = 500 if deadline is None else min(500, max(0, math.ceil((deadline - time.monotonic()) * 1000)))
            if self.sock in dict(self.poller.poll(wait_ms)):
                return decode(self.sock.recv(copy=True), self.max_bytes)
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _watch_link(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self.refused:
                    log.info("%s: attached to the daemon at %s", self.sock.identity.decode(errors="replace"),
                             self.address)
                self.refused = False
                continue
            self.refused = True
            if event != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # libzmq retries only after those
                self._retry_at = time.monotonic() + REFUSED_RETRY_S
            if time.monotonic() - self._last_warning >= REFUSED_RETRY_S:
                self._last_warning = time.monotonic()
                log.error(_REFUSALS.get(event, "handshake with %s failed (retry in %.0fs)"), self.address,
                          REFUSED_RETRY_S)
        if self._retry_at is not None and time.monotonic() >= self._retry_at:
            self._retry_at = None
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disconnect(self.address)
            self.sock.connect(self.address)

    def close(self, linger_ms: int = 0) -> None:
        """`linger_ms`: how long queued messages may still go out (a last Error before exiting)."""
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=linger_ms)
