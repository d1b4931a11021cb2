"""The daemon's ROUTER edge: a plain ZeroMQ socket whose FD the event loop watches. Every message arrives,
in order per worker, however sends and bursts interleave (a send may consume the FD's signal of a message
that came meanwhile), and a malformed multipart frame still reaches the caller to be counted."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import zmq
import zmq.asyncio

from protocol.messages import Heartbeat, decode, encode
from protocol.transport import DealerEndpoint, RouterEndpoint


@pytest.fixture()
def router(tmp_path):
    ctx = zmq.asyncio.Context()
    endpoint = RouterEndpoint(ctx)
    address = endpoint.bind(f"ipc://{tmp_path}/router.sock")
    yield endpoint, address
    endpoint.close()
    ctx.term()


def _burst(address: str, name: bytes, count: int, ready: threading.Event) -> None:
    """A worker: says hello, waits for the go, sends `count` heartbeats as fast as it can, waits for the end."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, name)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(address)
    sock.send(encode(Heartbeat(worker_id=name.decode(), incarnation=0, seq=-1, state="ready")))
    ready.wait(30)
    assert sock.poll(30_000), "no go from the daemon"
    sock.recv()
    for i in range(count):
        sock.send(encode(Heartbeat(worker_id=name.decode(), incarnation=0, seq=i, state="ready")))
    # stay connected until the daemon has read everything: libzmq drops what a peer that left still had
    # queued beyond the high-water mark
    sock.poll(30_000)
    sock.close(linger=0)
    ctx.term()


@pytest.mark.asyncio
async def test_every_message_of_a_burst_arrives_while_the_daemon_sends(router) -> None:
    endpoint, address = router
    names, count = [b"w1", b"w2", b"w3"], 3000
    ready = threading.Event()
    threads = [threading.Thread(target=_burst, args=(address, n, count, ready), daemon=True) for n in names]
    for t in threads:
        t.start()
    hello = {(await asyncio.wait_for(endpoint.recv(), 10))[0] for _ in names}
    assert hello == set(names)
    ready.set()
    for name in names:
        endpoint.send(name, Heartbeat(worker_id="daemon", incarnation=0, seq=0, state="go"))
    seen: dict[bytes, list[int]] = {n: [] for n in names}
    batches = 0
    while sum(map(len, seen.values())) < len(names) * count:
        batch = await asyncio.wait_for(endpoint.recv_batch(limit=64), 10)
        assert 1 <= len(batch) <= 64
        batches += 1
        for identity, frame in batch:
            seen[identity].append(decode(frame).seq)
        # sends in between reads: each may read the FD's signal of messages queued meanwhile
        with pytest.raises(zmq.ZMQError):
            endpoint.send(b"nobody", Heartbeat(worker_id="daemon", incarnation=0, seq=0, state="x"))
    for name in names:
        assert seen[name] == list(range(count))  # every one, in order
        endpoint.send(name, Heartbeat(worker_id="daemon", incarnation=0, seq=1, state="done"))
    assert batches < len(names) * count  # a wake-up takes what is queued, not one message
    for t in threads:
        t.join(10)


@pytest.mark.asyncio
async def test_a_waiting_receiver_wakes_for_a_message_after_a_send(router) -> None:
    endpoint, address = router
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"w")
    dealer.connect(address)
    try:
        dealer.send(encode(Heartbeat(worker_id="w", incarnation=0, seq=0, state="ready")))
        assert (await asyncio.wait_for(endpoint.recv(), 10))[0] == b"w"
        for i in range(200):  # a ping-pong: the reply often lands while the daemon's send runs
            waiting = asyncio.ensure_future(endpoint.recv())
            await asyncio.sleep(0)
            endpoint.send(b"w", Heartbeat(worker_id="daemon", incarnation=0, seq=i, state="ping"))
            assert dealer.poll(10_000)
            dealer.send(dealer.recv())
            identity, frame = await asyncio.wait_for(waiting, 10)
            assert identity == b"w" and decode(frame).seq == i
        dealer.send_multipart([b"one", b"two"])  # three frames at the router: handed on as an empty frame
        assert await asyncio.wait_for(endpoint.recv(), 10) == (b"w", b"")
    finally:
        dealer.close(linger=0)
        ctx.term()


@pytest.mark.asyncio
async def test_a_message_noticed_by_a_send_still_wakes_the_receiver(router) -> None:
    """A message lands while the loop is busy; the daemon's next send reads the FD's signal of it (libzmq
    processes its commands on send), so the FD never fires: the send itself must wake the receiver."""
    endpoint, address = router
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"w")
    dealer.connect(address)
    try:
        dealer.send(encode(Heartbeat(worker_id="w", incarnation=0, seq=0, state="ready")))
        assert (await asyncio.wait_for(endpoint.recv(), 10))[0] == b"w"
        for i in range(1, 21):
            waiting = asyncio.ensure_future(endpoint.recv())
            await asyncio.sleep(0)  # the receiver now waits on the FD
            dealer.send(encode(Heartbeat(worker_id="w", incarnation=0, seq=i, state="ready")))
            time.sleep(0.02)  # the loop is busy (no FD callback) while the message lands
            endpoint.send(b"w", Heartbeat(worker_id="daemon", incarnation=0, seq=i, state="ping"))
            identity, frame = await asyncio.wait_for(waiting, 5)
            assert identity == b"w" and decode(frame).seq == i
            assert dealer.poll(5000) and dealer.recv()
    finally:
        dealer.close(linger=0)
        ctx.term()


def test_a_worker_waiting_for_a_message_sleeps_instead_of_spinning(router) -> None:
    """recv with a timeout sleeps in poll for all of it: rounding the wait down once turned each timeout's last
    millisecond into a busy loop, which on a worker's cores stalls the forward pass's threads."""
    _, address = router
    ctx = zmq.Context()
    dealer = DealerEndpoint(ctx, b"idle", address)
    try:
        wall, cpu = time.monotonic(), time.thread_time()
        for _ in range(50):
            assert dealer.recv(timeout_ms=2) is None
        wall, cpu = time.monotonic() - wall, time.thread_time() - cpu
        assert wall >= 0.1  # every wait lasted its timeout
        # sleeping: well under a millisecond of CPU a call; spinning through the last millisecond took ~50 ms
        assert cpu < 0.02, f"{cpu * 1e3:.1f} ms of CPU in 50 waits of 2 ms"
    finally:
        dealer.close()
        ctx.term()
