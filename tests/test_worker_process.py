"""A real `nimbus worker` process against a daemon played by the test: leases, re-registration, orphaning."""

from __future__ import annotations

import platform
import subprocess
import sys
import time

import pytest
import zmq

from daemon.models import pull
from protocol.messages import (
    Error,
    Heartbeat,
    Hello,
    NewSequence,
    SamplingParams,
    Step,
    StepResult,
    Welcome,
    decode,
    encode,
    pack_ints,
)


@pytest.fixture
def router(tmp_path):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/daemon.sock"
    sock.bind(address)
    yield sock, address
    sock.close()
    ctx.term()


def start_worker(address: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "daemon.cli", "worker", "--connect", address, "--model", str(pull()),
           "--null-model", "--worker-id", "w1", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def next_message(sock: zmq.Socket, want: type, timeout: float = 20.0) -> tuple[bytes, object, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(100):
            identity, frame = sock.recv_multipart()
            msg = decode(frame)
            if isinstance(msg, want):
                return identity, msg, time.monotonic()
    raise AssertionError(f"no {want.__name__} within {timeout}s")


def test_a_worker_without_echoes_drops_its_work_and_registers_again(router):
    sock, address = router
    worker = start_worker(address, "--lease", "1.5")
    try:
        identity, hello, _ = next_message(sock, Hello)
        assert hello.incarnation == 0
        sock.send_multipart([identity, encode(Welcome(worker_id="w1", incarnation=7, epoch="e1",
                                                      heartbeat_interval=0.2))])
        seq = NewSequence(1, pack_ints([5, 6, 7]), 3, 0, pack_ints([0]), SamplingParams(temperature=0.0))
        sock.send_multipart([identity, encode(Step(step_id=0, new_seqs=(seq,), seq_ids=pack_ints([1]),
                                                   num_tokens=pack_ints([3])))])
        _, result, _ = next_message(sock, StepResult)
        assert result.incarnation == 7 and result.step_id == 0
        # from now on the test echoes no heartbeat: the worker's lease (1.5 s) runs out
        _, beat, silent_since = next_message(sock, Heartbeat)
        assert beat.incarnation == 7 and beat.worker_id == "w1"
        _, again, at = next_message(sock, Hello)
        assert again.incarnation == 7  # the same process, registering again
        assert 1.0 < at - silent_since < 6.0
        sock.send_multipart([identity, encode(Welcome(worker_id="w1", incarnation=8, epoch="e2"))])
        # its old sequence is gone: a decode step for it is refused, not computed on stale state
        sock.send_multipart([identity, encode(Step(step_id=1, seq_ids=pack_ints([1]), num_tokens=pack_ints([1])))])
        _, err, _ = next_message(sock, Error)
        assert err.code == "bad_step" and err.step_id == 1
    finally:
        worker.kill()
        worker.wait(timeout=10)


def test_a_worker_without_any_daemon_exits_after_its_orphan_timeout(router):
    sock, address = router
    t0 = time.monotonic()
    worker = start_worker(address, "--orphan-timeout", "3")
    try:
        assert worker.wait(timeout=60) == 0
        assert time.monotonic() - t0 > 3
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)


def test_a_worker_freezes_its_loaded_heap(tmp_path, router):
    """The objects alive after the model loads leave the collector's reach (a full collection walked ~170,000 of
    them in ~90 ms, stalling a step); what is made later is still collected."""
    import gc
    import weakref

    from worker.main import freeze_heap

    before = len(gc.get_objects())
    try:
        freeze_heap()
        # a full collection now walks only what was made since, not the tens of thousands alive before
        assert gc.get_freeze_count() > before // 2 and len(gc.get_objects()) < before // 20

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after the freeze
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
    sock, address = router
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "worker", "--connect", address, "--model",
                                 str(pull()), "--null-model", "--worker-id", "w1"], stdout=out, stderr=out)
    try:
        next_message(sock, Hello)
        assert "froze" in log.read_text() and "out of garbage collection" in log.read_text()
    finally:
        proc.kill()
        proc.wait(10)


ALLOC_CYCLES = """
import resource, sys, torch
from worker.main import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def cycle():
    x = torch.empty(32 * 2**20 // 4)
    x.fill_(1.0)  # touch every page
    del x
for _ in range(3):  # the heap settles (a cycle may still grow it once while alignment padding finds its place)
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory sets glibc's allocator only")
def test_the_worker_reuses_freed_step_memory():
    # five cycles of a step's 32 MB activations: mapped afresh (8,192 faults each) by default, reused once the
    # worker keeps them (allowing one more growth of the heap)
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", ALLOC_CYCLES, mode], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    assert faults("default") > 4 * 8192
    assert faults("keep") < 2 * 8192
