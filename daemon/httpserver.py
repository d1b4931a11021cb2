"""Serving the aiohttp app behind limits on slow, idle and too many clients.

aiohttp bounds an idle keep-alive connection (`keepalive_timeout`) but not how long a client may take to
send a request: a client dribbling its headers or body one byte at a time holds a connection, and a task,
for as long as it likes; nor does it cap connections. `GuardedSite` (a `web.BaseSite`) listens with its
own protocol factory: each connection is a thin `asyncio.Protocol` that forwards every event to aiohttp's
own `RequestHandler` and adds
- a header timeout: a request's head must arrive within `header_timeout_s` (from the first byte, or from
  the accept for a connection's first request, so a connection that never speaks is closed too);
- a body timeout: its body within `body_timeout_s` of the end of the head (handlers read the body first);
- a connection cap: beyond `max_connections` a new connection gets an immediate 503 with Retry-After and
  is closed, rather than waiting in a queue; the listen backlog is `backlog`.
Only reading the request is timed: once the body is in, a response may stream for as long as it needs.
It learns where a request stands through two public hooks of aiohttp's low-level `web.Server`:
`request_factory` (the head is parsed) and `request_handler` (the handler returned).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, fields
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("nimbus.http")

# how long a refused connection may take to read its 503 before it is dropped
REJECT_LINGER_S = 1.0
_REJECT_BODY = json.dumps({"error": {
    "message": "the server has too many open connections; retry shortly", "type": "server_error",
    "param": None, "code": "too_many_connections"}}).encode()
REJECT_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                   b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(_REJECT_BODY), _REJECT_BODY))


@dataclass(frozen=True, slots=True)
class HttpLimits:
    header_timeout_s: float = 10.0  # to send a request's head (request line and headers)
    body_timeout_s: float = 60.0  # to send its body, from the end of the head
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this
    max_connections: int = 1024  # open connections; more are answered 503 and closed at once
    backlog: int = 512  # accepted-by-the-kernel connections waiting for the server (capped by somaxconn)

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"HttpLimits.{f.name} must be positive")


async def start_http(app: web.Application, host: str, port: int, limits: HttpLimits,
                     **runner_kwargs: Any) -> web.AppRunner:
    """Sets `app` up and serves it on host:port under `limits`; the caller awaits `runner.cleanup()`.

    `runner_kwargs` go to `web.AppRunner` (e.g. access_log=None). The site is `runner.sites` (one
    `GuardedSite`); `runner.addresses[0]` is the bound address (useful with port 0).
    """
    runner = web.AppRunner(app, keepalive_timeout=limits.keepalive_timeout_s, **runner_kwargs)
    await runner.setup()
    try:
        await GuardedSite(runner, host, port, limits).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class GuardedSite(web.BaseSite):
    """A TCP site whose connections are timed and counted under `HttpLimits`. One per runner."""

    __slots__ = ("_host", "_port", "_limits", "_connections", "rejected_total", "timeouts_total")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: HttpLimits) -> None:
        super().__init__(runner, backlog=limits.backlog)
        self._host, self._port, self._limits = host, port, limits
        self._connections: dict[RequestHandler, _Connection] = {}
        self.rejected_total = 0
        self.timeouts_total = {"header": 0, "body": 0}
        self._hook(runner.server)

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), self._host, self._port,
                                                backlog=self._limits.backlog)

    def _hook(self, server: web.Server | None) -> None:
        """Wraps the server's request factory and handler so each connection hears of its requests.

        Must run before the first connection: each RequestHandler copies both when it is created.
        """
        assert server is not None, "call runner.setup() first"
        make_request, handle = server.request_factory, server.request_handler
        connections = self._connections

        def request_factory(message: Any, payload: StreamReader, protocol: RequestHandler, writer: Any,
                            task: Any) -> web.BaseRequest:
            request = make_request(message, payload, protocol, writer, task)
            if (conn := connections.get(protocol)) is not None:
                conn.request_started(payload)
            return request

        async def request_handler(request: web.BaseRequest) -> web.StreamResponse:
            try:
                return await handle(request)
            finally:
                if (conn := connections.get(request.protocol)) is not None:
                    conn.request_handled()

        server.request_factory, server.request_handler = request_factory, request_handler


class _Connection(asyncio.Protocol):
    """One client connection: aiohttp's RequestHandler does the HTTP; this times the client's sending.

    Phases: awaiting a head (header timer, started by the accept or by the first byte of a later request),
    reading the body (body timer), handling (no timer: the response may take as long as it needs). A
    request is over when its body is in and its handler has returned; bytes that came meanwhile (a
    pipelined request) start the next header timer then.
    """

    def __init__(self, site: GuardedSite) -> None:
        self._site = site
        self._loop = asyncio.get_running_loop()
        self._handler: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None  # header or body, never both
        self._awaiting_head = True
        self._body_read = self._handled = False
        self._early_bytes = False  # bytes of the next request came while this one was handled

    # asyncio.Protocol: forward everything to aiohttp's handler
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        site = self._site
        if site.active_connections >= site._limits.max_connections:
            self._reject()
            return
        assert site._runner.server is not None
        self._handler = handler = site._runner.server()
        site._connections[handler] = self
        handler.connection_made(transport)
        self._start_timer("header", site._limits.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._handler is None:
            return  # a refused connection: its request is not read
        if self._awaiting_head:
            if self._timer is None:
                self._start_timer("header", self._site._limits.header_timeout_s)
        elif self._body_read:
            self._early_bytes = True
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received() if self._handler is not None else None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        handler, self._handler = self._handler, None
        if handler is not None:
            self._site._connections.pop(handler, None)
            handler.connection_lost(exc)

    # hooks from the server's request factory and handler
    def request_started(self, payload: StreamReader) -> None:
        """The head of a request is parsed: its body must now arrive within the body timeout."""
        self._awaiting_head = self._body_read = self._handled = False
        self._start_timer("body", self._site._limits.body_timeout_s)
        payload.on_eof(self._body_complete)  # at once if there is no body

    def request_handled(self) -> None:
        self._handled = True
        self._maybe_done()

    def _body_complete(self) -> None:
        if not self._awaiting_head:
            self._cancel_timer()
            self._body_read = True
            self._maybe_done()

    def _maybe_done(self) -> None:
        if self._handled and self._body_read and not self._awaiting_head:
            self._awaiting_head = True
            if self._early_bytes:
                self._early_bytes = False
                self._start_timer("header", self._site._limits.header_timeout_s)

    def _start_timer(self, phase: str, delay: float) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(delay, self._timed_out, phase)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self, phase: str) -> None:
        self._timer = None
        self._site.timeouts_total[phase] += 1
        peer = self._transport.get_extra_info("peername") if self._transport else None
        log.debug("closing the connection from %s: request %s not received in time", peer, phase)
        if self._handler is not None:
            self._handler.force_close()  # aiohttp's own way to drop a connection; connection_lost follows

    def _reject(self) -> None:
        """Over the cap: answer 503 at once, half-close, and drop the socket soon whatever the client does."""
        self._site.rejected_total += 1
        transport = self._transport
        assert transport is not None
        transport.write(REJECT_RESPONSE)
        if transport.can_write_eof():
            # half-close rather than close: closing with the client's request unread would send a RST
            # that can destroy the 503 before the client reads it
            transport.write_eof()
            self._timer = self._loop.call_later(REJECT_LINGER_S, transport.abort)
        else:
            transport.close()
