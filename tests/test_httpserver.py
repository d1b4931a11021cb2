"""`daemon.httpserver` over real sockets on 127.0.0.1: slow headers and bodies and idle connections are
cut off, connections over the cap get a quick 503, and a response streaming longer than every timeout
is left alone. The server runs on its own event loop (asyncio and uvloop) in a thread; clients are
blocking sockets, so nothing on the client side normalises or hurries what is sent."""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import pytest
import uvloop
from aiohttp import web

from daemon.httpserver import GuardedSite, HttpLimits, start_http

GET = b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n"


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": []})


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"bytes": len(body)})


async def stream(request: web.Request) -> web.StreamResponse:
    """SSE: `n` events `gap` seconds apart, with one long silence in the middle (like a long prefill)."""
    await request.read()
    n, gap = int(request.query.get("n", "8")), float(request.query.get("gap", "0.15"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(n):
        await asyncio.sleep(gap * (4 if i == n // 2 else 1))
        await resp.write(f"data: {i}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", echo)
    app.router.add_post("/v1/stream", stream)
    return app


class Served:
    def __init__(self, runner: web.AppRunner, loop: asyncio.AbstractEventLoop) -> None:
        self.runner, self.loop = runner, loop
        self.port: int = runner.addresses[0][1]
        self.site: GuardedSite = next(iter(runner.sites))  # type: ignore[assignment]

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def call(self, fn):  # runs `fn()` on the server's loop and returns its result
        return asyncio.run_coroutine_threadsafe(_call(fn), self.loop).result(5)


async def _call(fn):
    return fn()


@pytest.fixture(params=["asyncio", "uvloop"])
def serve(request):
    new_loop = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    @contextmanager
    def run(limits: HttpLimits) -> Iterator[Served]:
        loop = new_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        runner = asyncio.run_coroutine_threadsafe(start_http(make_app(), "127.0.0.1", 0, limits), loop).result(5)
        try:
            yield Served(runner, loop)
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()

    return run


def read_response(conn: socket.socket | BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body (pass `sock.makefile("rb")` to read several)."""
    reader = conn.makefile("rb") if isinstance(conn, socket.socket) else conn
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    return status, headers, reader.read(int(headers["content-length"]))


def closed(sock: socket.socket, wait_s: float) -> bool:
    """True if the server closes `sock` within `wait_s` (anything it sends first is skipped)."""
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0]:
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionResetError:
                return True
    return False


def dribble(sock: socket.socket, data: bytes, every_s: float) -> float | None:
    """Sends `data` a byte at a time; returns when the server closed the connection (None if it never did)."""
    start = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
        if closed(sock, every_s):
            return time.monotonic() - start
    return None


def test_limits_are_checked():
    with pytest.raises(ValueError, match="header_timeout_s"):
        HttpLimits(header_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections"):
        HttpLimits(max_connections=-1)


def test_headers_sent_a_byte_at_a_time_are_cut_off(serve):
    with serve(HttpLimits(header_timeout_s=0.5, keepalive_timeout_s=30)) as srv, srv.connect() as sock:
        took = dribble(sock, b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100, 0.05)
        assert took is not None and 0.4 < took < 1.2
        assert srv.site.timeouts_total["header"] == 1


def test_a_connection_that_never_speaks_is_closed_after_the_header_timeout(serve):
    with serve(HttpLimits(header_timeout_s=0.5, keepalive_timeout_s=30)) as srv, srv.connect() as sock:
        start = time.monotonic()
        assert closed(sock, 2.0)
        assert 0.4 < time.monotonic() - start < 1.5


def test_a_slow_but_timely_request_is_served(serve):
    with serve(HttpLimits(header_timeout_s=2.0, body_timeout_s=2.0)) as srv, srv.connect() as sock:
        assert dribble(sock, GET[:-2], 0.01) is None
        sock.sendall(b"\r\n")
        assert read_response(sock)[0] == 200


def test_a_body_sent_slowly_is_cut_off_after_the_body_timeout(serve):
    with serve(HttpLimits(header_timeout_s=0.3, body_timeout_s=0.6)) as srv, srv.connect() as sock:
        # the head arrives at once; the body's bytes each come well within the header timeout
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
        took = dribble(sock, b"x" * 100, 0.1)
        assert took is not None and 0.5 < took < 1.5
        assert srv.site.timeouts_total == {"header": 0, "body": 1}


def test_idle_keepalive_is_closed_and_used_connections_are_not_cut_early(serve):
    limits = HttpLimits(header_timeout_s=0.3, body_timeout_s=0.3, keepalive_timeout_s=0.8)
    with serve(limits) as srv, srv.connect() as sock:
        body = b'{"prompt": "hi"}'
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert read_response(sock)[:1] == (200,)
        assert not closed(sock, 0.5)  # idle longer than the header timeout: governed by keep-alive
        sock.sendall(GET)
        assert read_response(sock)[0] == 200
        start = time.monotonic()
        assert closed(sock, 3.0)
        assert 0.6 < time.monotonic() - start < 1.5


def test_pipelined_requests_are_all_answered(serve):
    with serve(HttpLimits(header_timeout_s=0.5, body_timeout_s=0.5)) as srv, srv.connect() as sock:
        sock.sendall(GET * 3)
        reader = sock.makefile("rb")
        assert [read_response(reader)[0] for _ in range(3)] == [200, 200, 200]


def test_connections_over_the_cap_get_a_quick_503_and_a_freed_slot_serves(serve):
    with serve(HttpLimits(header_timeout_s=10, max_connections=4)) as srv:
        idle = [srv.connect() for _ in range(4)]
        _wait_for(lambda: srv.call(lambda: srv.site.active_connections) == 4)
        for _ in range(3):
            with srv.connect() as extra:
                start = time.monotonic()
                extra.sendall(GET)
                status, headers, body = read_response(extra)
                assert status == 503 and headers["retry-after"] == "1" and b"too_many_connections" in body
                assert closed(extra, 2.0)
                assert time.monotonic() - start < 1.0
        idle.pop().close()
        _wait_for(lambda: srv.call(lambda: srv.site.active_connections) == 3)
        with srv.connect() as sock:
            sock.sendall(GET)
            assert read_response(sock)[0] == 200
        assert srv.site.rejected_total == 3
        for sock in idle:
            sock.close()


def test_a_stream_longer_than_every_timeout_completes(serve):
    limits = HttpLimits(header_timeout_s=0.15, body_timeout_s=0.15, keepalive_timeout_s=0.15)
    with serve(limits) as srv, srv.connect() as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/stream?n=6&gap=0.08 HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
        data = b""
        while not data.endswith(b"0\r\n\r\n"):  # the chunked encoding's last chunk
            chunk = sock.recv(65536)
            assert chunk, f"stream cut after {data!r}"
            data += chunk
        assert time.monotonic() - start > 0.6  # longer than all three timeouts together
        assert all(f"data: {i}\n\n".encode() in data for i in range(6)) and b"[DONE]" in data
        sock.sendall(GET)  # and the connection is still good for another request
        assert read_response(sock)[0] == 200


def _wait_for(cond, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
