"""The engine's health and failover logic, driven in-process by fake workers over real ZeroMQ sockets.

Each test runs an `Engine` (receive loop and health loop) and `tests/fake_worker.FakeWorker`s in one
event loop, on an ipc:// address in tmp_path. The fake workers answer with `worker.null.NullExecutor`,
whose token depends only on the position, so the exact output of an uninterrupted run is known and a
failover must reproduce it: no token missing, none twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from fake_worker import FakeWorker, has_token

from daemon.control import Control
from daemon.deployments import DeploymentSpec, VersionSpec
from daemon.engine import Engine, HealthConfig
from daemon.models import pull
from daemon.replica import RequestStream
from daemon.scheduler import SchedulerConfig, Sequence
from daemon.tokenizer import Tokenizer
from protocol.messages import (
    Error,
    Heartbeat,
    Hello,
    SamplingParams,
    StepResult,
    Welcome,
    decode,
    encode,
    pack_ints,
)
from protocol.transport import RouterEndpoint
from worker.null import FIRST_TOKEN, NUM_TOKENS, NullRunner

DEPLOYMENT = "test"

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

# deadlines with room for a pause of the whole test process: on the 2-core AVX2 machine, beats of workers that were
# running fine were seen 0.5-0.9 s apart during the full suite, which a 0.5 s timeout took for deaths
HEALTH = HealthConfig(heartbeat_interval_s=0.1, heartbeat_timeout_s=1.5, step_timeout_s=2.0,
                      placement_timeout_s=2.5, check_interval_s=0.05)
# for tests where no worker should die of a deadline: a loaded machine must not make one miss it
STEADY = dict(heartbeat_timeout_s=3.0, step_timeout_s=5.0)
PROMPT = list(range(100, 120))
OTHER_PROMPT = list(range(300, 317))
POISON = 31337  # a token id that makes the fake workers fail (like `--fault crash-on-token`)
MAX_TOKENS = 30


def expected_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    """What NullExecutor samples for an uninterrupted run: the token after position p is a function of p."""
    return [FIRST_TOKEN + (len(prompt) + i + 1) % NUM_TOKENS for i in range(max_tokens)]


# ------------------------------------------------------------------------------------------ harness
@dataclass(frozen=True)
class Model:
    folder: str
    tokenizer: Tokenizer
    runner: NullRunner


@pytest.fixture(scope="module")
def model() -> Model:
    folder = pull()  # instant once installed
    runner = NullRunner.from_folder(folder)
    # a small pool keeps the daemon's block manager cheap (NullRunner reports 2^20 blocks)
    runner = dataclasses.replace(runner, num_blocks=1024, block_size=16, max_model_len=2048)
    return Model(str(folder), Tokenizer.from_folder(folder), runner)


@dataclass
class Output:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    status: int | None = None


class Reader:
    """Reads one single-choice stream as a client would."""

    def __init__(self, stream: RequestStream) -> None:
        self.stream = stream
        self.out = Output()

    async def _read_once(self) -> bool:
        deltas = await self.stream.get()
        for delta in deltas:
            self.out.tokens += delta.token_ids
            self.out.finish_reason = delta.finish_reason or self.out.finish_reason
        if not deltas and self.stream.finished:
            if self.stream.error is not None:
                self.out.error, self.out.status = self.stream.error, self.stream.error_status
            return False
        return True

    async def until(self, num_tokens: int, timeout: float = 5.0) -> None:
        async def go() -> None:
            while len(self.out.tokens) < num_tokens:
                assert await self._read_once(), f"stream ended early: {self.out}"
        await asyncio.wait_for(go(), timeout)

    async def finish(self, timeout: float = 8.0) -> Output:
        async def go() -> None:
            while await self._read_once():
                pass
        await asyncio.wait_for(go(), timeout)
        return self.out


async def until(cond: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class ExceptionLog(logging.Handler):
    """Collects log records that carry a traceback: an exception the engine caught and logged is a bug here."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


class Harness:
    def __init__(self, tmp_path: Path, model: Model, health: HealthConfig, scheduler: SchedulerConfig) -> None:
        self.model = model
        self.ctx = zmq.asyncio.Context()
        endpoint = RouterEndpoint(self.ctx)
        self.address = endpoint.bind(f"ipc://{tmp_path}/nimbus.sock")
        self.engine = Engine(endpoint, scheduler, health)
        # one deployment that every worker holding the model joins (as `nimbus serve` makes of [model])
        self.control = Control(self.engine, None, resolve=Path)
        self.control.elastic = DEPLOYMENT
        self.dead: list[tuple[str, int, str]] = []  # the supervisor's kill calls
        self.engine.on_dead = lambda worker_id, pid, reason: self.dead.append((worker_id, pid, reason))
        self.workers: list[FakeWorker] = []
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self.engine.receive_loop(), name="receive"),
                      loop.create_task(self.engine.health_loop(), name="health")]
        self.scheduler = scheduler
        self._pids = iter(range(1001, 2000))
        self.exceptions = ExceptionLog()
        logging.getLogger("nimbus").addHandler(self.exceptions)
        self.crashes_caused: set[str] = set()  # workers whose replica loop a test breaks on purpose

    def worker(self, worker_id: str, *, supervised: bool = False, model: str | None = None,
               **hello_fields: object) -> FakeWorker:
        """Start a fake worker; a supervised one reports its crash through engine.worker_exited."""
        on_crash = (lambda w: self.engine.worker_exited(w.worker_id, "exited with code 17")) if supervised else None
        w = FakeWorker(worker_id, self.address, model or self.model.folder, self.model.runner, ctx=self.ctx,
                       pid=next(self._pids), on_crash=on_crash, **hello_fields)
        self.workers.append(w)
        return w.start()

    async def registered(self, worker_id: str, **kwargs: object) -> FakeWorker:
        w = self.worker(worker_id, **kwargs)
        await w.wait_welcome()
        await until(lambda: self.engine.replicas.get(worker_id) is not None
                    and self.engine.replicas[worker_id].incarnation == w.incarnation
                    and self.engine.replicas[worker_id].replica_id is not None, what="registration")
        return w

    async def start(self) -> None:
        spec = DeploymentSpec(DEPLOYMENT, (VersionSpec("default", self.model.folder, replicas=0),))
        await self.control.start((spec,))
        self.tasks.append(asyncio.get_running_loop().create_task(self.control.run(0.02), name="control"))

    def raw_dealer(self, identity: bytes) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(self.address)
        return sock  # closed by ctx.destroy()

    def submit(self, prompt: list[int], max_tokens: int = MAX_TOKENS) -> tuple[Reader, Sequence, str | None]:
        """As daemon/api.py does: one Sequence (greedy, no stop ids) fed into one RequestStream.
        Returns the reader, the sequence and the worker it was placed on."""
        seq = Sequence(seq_id=self.engine.new_seq_id(), prompt_token_ids=list(prompt),
                       sampling=SamplingParams(temperature=0.0, stop_token_ids=()), max_tokens=max_tokens)
        stream = RequestStream(1)
        self.engine.submit(stream, DEPLOYMENT, "default", prompt, seq, [], 0)
        return Reader(stream), seq, self.replica_of(seq.seq_id)

    def replica_of(self, seq_id: int) -> str | None:
        for r in self.engine.live():
            if seq_id in r.tracks:
                return r.worker_id
        return None

    async def close(self) -> None:
        # The engine's loops must still run, and no replica loop may have died of an exception.
        problems = [f"engine task {t.get_name()} ended: {t.exception()!r}" for t in self.tasks if t.done()]
        for replica in self.engine.replicas.values():
            t = replica.task
            crashed = t is not None and t.done() and not t.cancelled() and t.exception() is not None
            if crashed and replica.worker_id not in self.crashes_caused:
                problems.append(f"replica {replica.worker_id} loop died: {t.exception()!r}")
        problems += [f"logged exception: {r.getMessage()}" for r in self.exceptions.records
                     if not any(r.getMessage() == f"replica loop of worker {w} crashed" for w in self.crashes_caused)]
        logging.getLogger("nimbus").removeHandler(self.exceptions)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.workers:
            await w.close()
        for replica in self.engine.replicas.values():
            if replica.task is not None:
                replica.task.cancel()
        await asyncio.sleep(0)
        self.engine.endpoint.close()
        self.ctx.destroy(linger=0)  # closes the raw sockets too
        assert not problems, problems


@contextlib.asynccontextmanager
async def harness(tmp_path: Path, model: Model, scheduler: SchedulerConfig | None = None,
                  **health: float) -> AsyncIterator[Harness]:
    h = Harness(tmp_path, model, dataclasses.replace(HEALTH, **health), scheduler or SchedulerConfig())
    await h.start()
    try:
        yield h
    finally:
        await h.close()


# ------------------------------------------------------------------------------------------ failover
async def test_silent_worker_is_declared_dead_and_its_sequence_continues_elsewhere(tmp_path, model):
    async with harness(tmp_path, model) as h:
        a = await h.registered("A")
        b = await h.registered("B")
        a.delay_s = 0.02
        reader, seq, placed = h.submit(PROMPT)
        assert placed == "A"
        await reader.until(5)
        a.mute_heartbeats, a.hang_steps = True, True  # frozen (SIGSTOP): no beats, no answers
        out = await reader.finish()

        assert out.tokens == expected_tokens(PROMPT, MAX_TOKENS), "tokens lost or repeated across the failover"
        assert out.finish_reason == "length" and out.error is None
        assert b.results, "B never computed anything"
        assert not h.engine.replicas["A"].alive and h.engine.replicas["B"].alive
        assert h.engine.counters["failovers"] == 1
        # the frozen A may register again and be declared dead again (with nothing to move) while B finishes: on a
        # slow machine that happens before the stream ends, so only A may die, and only its first death moves work
        assert h.engine.counters["worker_deaths"] == len(h.dead) >= 1
        assert {(wid, pid) for wid, pid, _ in h.dead} == {("A", a.pid)}
        assert "heartbeat" in h.dead[0][2]

        # the frozen worker thaws and answers its old steps (the one it froze in and, with overlap, the one
        # queued behind it): dropped, the stream already ended
        stale, held = h.engine.counters["stale_frames"], len(a.held)
        assert held == h.engine.scheduler_config.max_steps_in_flight
        a.hang_steps = False
        a.release()
        await until(lambda: h.engine.counters["stale_frames"] == stale + held, what="the late answers to be dropped")
        assert not reader.stream._pending


async def test_a_crashed_replica_loop_fails_its_replica_and_the_request_continues(tmp_path, model):
    async with harness(tmp_path, model) as h:
        a = await h.registered("A")
        await h.registered("B")
        a.delay_s = 0.01
        reader, seq, placed = h.submit(PROMPT)
        assert placed == "A"
        await reader.until(3)
        scheduler = h.engine.replicas["A"].scheduler

        def broken(plan, result):  # a bug in the daemon's own step handling, not in the worker
            raise RuntimeError("boom")

        h.crashes_caused.add("A")
        scheduler.update = broken
        out = await reader.finish()

        assert out.tokens == expected_tokens(PROMPT, MAX_TOKENS), "tokens lost or repeated after the crash"
        assert out.finish_reason == "length" and out.error is None
        assert not h.engine.replicas["A"].alive and h.engine.replicas["B"].alive
        assert [(wid, pid) for wid, pid, _ in h.dead] == [("A", a.pid)]
        assert "replica loop crashed: RuntimeError: boom" in h.dead[0][2]


async def test_hung_step_fails_the_worker_after_step_timeout(tmp_path, model):
    async with harness(tmp_path, model) as h:
        a = await h.registered("A")
        await h.registered("B")
        a.delay_s = 0.01
        reader, seq, placed = h.submit(PROMPT)
        assert placed == "A"
        await reader.until(5)
        a.hang_steps = True  # heartbeats keep flowing: only the step deadline can catch it
        await until(lambda: a.held, what="a held step")
        started = time.monotonic()
        await until(lambda: h.dead, timeout=HEALTH.step_timeout_s + 3, what="A declared dead")
        assert time.monotonic() - started >= HEALTH.step_timeout_s - 0.1
        out = await reader.finish()

        assert out.tokens == expected_tokens(PROMPT, MAX_TOKENS)
        assert out.finish_reason == "length"
        assert [(wid, pid) for wid, pid, _ in h.dead] == [("A", a.pid)]
        assert "hung" in h.dead[0][2]
        assert h.engine.counters["worker_deaths"] == 1 and h.engine.counters["failovers"] == 1
        assert a.echoes, "A's heartbeats were answered until it was declared dead"


async def test_worker_exited_fails_the_replica_at_once(tmp_path, model):
    async with harness(tmp_path, model, **STEADY) as h:
        a = await h.registered("A")
        await h.registered("B")
        a.delay_s = 0.01
        reader, seq, _ = h.submit(PROMPT)
        await reader.until(3)
        a.hang_steps = True
        await until(lambda: a.held, what="a held step")
        await a.close()  # the process is gone (a live one would hear unknown_worker and register again)

        h.engine.worker_exited("nobody", "exited with code 1")  # unknown ids are ignored
        h.engine.worker_exited("A", "exited with code 1")
        # synchronous: no health-loop tick needed, and the supervisor already knows (no kill)
        assert not h.engine.replicas["A"].alive
        assert h.replica_of(seq.seq_id) == "B"
        assert h.dead == []
        assert h.engine.counters["worker_deaths"] == 1
        out = await reader.finish()
        assert out.tokens == expected_tokens(PROMPT, MAX_TOKENS)
        h.engine.worker_exited("A", "exited with code 1")  # a second report changes nothing
        assert h.engine.counters["worker_deaths"] == 1


async def test_orphan_waits_for_a_worker_and_completes_there(tmp_path, model):
    async with harness(tmp_path, model) as h:
        a = await h.registered("A", supervised=True)
        a.delay_s = 0.01
        reader, seq, _ = h.submit(PROMPT)
        await reader.until(5)
        await a.crash()  # the supervisor's exit watch reports it
        assert len(h.engine.orphans) == 1 and not h.engine.ready
        assert h.engine.num_active() == 1
        await asyncio.sleep(0.3)  # well inside placement_timeout_s
        assert not reader.stream.finished
        await h.registered("B")
        out = await reader.finish()
        assert out.tokens == expected_tokens(PROMPT, MAX_TOKENS) and out.error is None
        assert h.engine.orphans == []


async def test_orphan_fails_with_503_when_no_worker_comes_back(tmp_path, model):
    async with harness(tmp_path, model, **STEADY) as h:  # the crash is reported at once (supervised)
        a = await h.registered("A", supervised=True)
        a.delay_s = 0.01
        reader, seq, _ = h.submit(PROMPT)
        await reader.until(5)
        died = time.monotonic()
        await a.crash()
        out = await reader.finish(timeout=5)
        assert time.monotonic() - died >= HEALTH.placement_timeout_s - 0.1
        assert out.status == 503 and "no replica" in out.error and "retry" in out.error
        assert out.finish_reason is None and out.tokens == expected_tokens(PROMPT, MAX_TOKENS)[:len(out.tokens)]
        assert h.engine.orphans == [] and h.engine.num_active() == 0


# ------------------------------------------------------------------------------------------ poison
async def test_request_that_fails_its_step_twice_fails_alone(tmp_path, model):
    # one running sequence at a time, so the other request is never in the failing step
    async with harness(tmp_path, model, SchedulerConfig(max_num_seqs=1), **STEADY) as h:
        a = await h.registered("A")
        a.fail_steps = has_token(POISON)
        bad_reader, bad, _ = h.submit(PROMPT + [POISON])
        good_reader, good, _ = h.submit(OTHER_PROMPT)
        bad_out = await bad_reader.finish()
        good_out = await good_reader.finish()

        assert bad_out.status == 500 and "this request" in bad_out.error and bad_out.tokens == []
        assert good_out.tokens == expected_tokens(OTHER_PROMPT, MAX_TOKENS) and good_out.error is None
        assert h.engine.counters["poisoned"] == 1 and h.engine.counters["worker_deaths"] == 0
        assert h.engine.replicas["A"].alive
        assert sum(has_token(POISON)(s) for s in a.steps) == 2


async def test_request_in_flight_during_two_worker_deaths_fails_alone(tmp_path, model):
    async with harness(tmp_path, model, **STEADY) as h:
        a = await h.registered("A", supervised=True)
        a.hang_steps = True
        bad_reader, bad, placed_bad = h.submit(PROMPT + [POISON])
        good_reader, good, placed_good = h.submit(OTHER_PROMPT)
        assert placed_bad == placed_good == "A"
        await until(lambda: a.held, what="A to hold the step")
        b = await h.registered("B", supervised=True)
        b.crash_steps = has_token(POISON)  # the poison input kills every worker it reaches
        c = await h.registered("C", supervised=True)
        c.crash_steps = has_token(POISON)

        await a.crash()  # both were in A's step: both blamed once; they move to B and C
        assert (h.replica_of(bad.seq_id), h.replica_of(good.seq_id)) == ("B", "C")
        bad_out = await bad_reader.finish()
        good_out = await good_reader.finish()

        assert bad_out.status == 500 and "this request" in bad_out.error
        assert good_out.tokens == expected_tokens(OTHER_PROMPT, MAX_TOKENS) and good_out.error is None
        assert b.crashed and not c.crashed
        assert h.engine.counters["worker_deaths"] == 2 and h.engine.counters["poisoned"] == 1
        assert h.engine.counters["failovers"] == 2  # each moved once; the poisoned one was not moved again


async def test_batch_mate_of_a_poison_request_survives(tmp_path, model):
    async with harness(tmp_path, model, **STEADY) as h:
        a = await h.registered("A")
        a.fail_steps = has_token(POISON)
        bad_reader, bad, _ = h.submit(PROMPT + [POISON])
        good_reader, good, _ = h.submit(OTHER_PROMPT)  # same step as the poison one
        bad_out = await bad_reader.finish()
        good_out = await good_reader.finish()
        assert bad_out.status == 500
        assert good_out.tokens == expected_tokens(OTHER_PROMPT, MAX_TOKENS), good_out


# ------------------------------------------------------------------------------------------ the wire
async def test_stale_and_bad_frames_are_dropped_and_counted(tmp_path, model):
    async with harness(tmp_path, model, **STEADY) as h:
        a = await h.registered("A")
        reader, seq, _ = h.submit(PROMPT)
        await reader.until(3)
        a.hang_steps = True
        await until(lambda: a.held, what="a held step")
        step = a.held[0]
        bogus = dict(worker_id="A", seq_ids=pack_ints([seq.seq_id]), token_ids=pack_ints([7]))
        counters = h.engine.counters
        assert counters["stale_frames"] == 0 and counters["bad_frames"] == 0

        a.send(StepResult(step_id=step.step_id, incarnation=a.incarnation + 1, **bogus))  # another life
        a.send(StepResult(step_id=step.step_id + 50, incarnation=a.incarnation, **bogus))  # not in flight
        a.send(Error(code="internal", message="late", step_id=step.step_id + 50))  # not in flight either
        ghost = h.raw_dealer(b"ghost")  # never registered
        await ghost.send(encode(StepResult(step_id=step.step_id, incarnation=1, **{**bogus, "worker_id": "ghost"})))
        await until(lambda: counters["stale_frames"] == 4, what="4 stale frames")

        a.hang_steps = False
        a.release()  # the real answer (and, with overlap, the answer to the step queued behind it)
        answered = next(r for r in a.results if r.step_id == step.step_id)
        a.send(answered)  # a duplicate of an answered step
        await until(lambda: counters["stale_frames"] == 5, what="the duplicate to be dropped")

        a.send_raw(b"\xc1 not msgpack")
        a.send_raw(b"\x93\x01\x02\x03", hb=True)  # msgpack, but not a message
        a.send_raw([b"two", b"parts"])
        a.send(Welcome(worker_id="A", incarnation=1, epoch="x"))  # a daemon->worker message
        await until(lambda: counters["bad_frames"] == 4, what="4 bad frames")

        out = await reader.finish()
        assert out.tokens == expected_tokens(PROMPT, MAX_TOKENS), "a stale frame leaked into the output"
        assert counters["stale_frames"] == 5 and counters["worker_deaths"] == 0
        # the engine keeps working after all that
        reader2, _, _ = h.submit(OTHER_PROMPT, 5)
        assert (await reader2.finish()).tokens == expected_tokens(OTHER_PROMPT, 5)


async def test_same_worker_id_registering_again_gets_a_new_incarnation(tmp_path, model):
    async with harness(tmp_path, model, **STEADY) as h:
        a = await h.registered("A")
        a.delay_s = 0.01
        reader, seq, _ = h.submit(PROMPT)
        await reader.until(5)
        a.hang_steps = True
        await until(lambda: a.held, what="a held step")
        old = h.engine.replicas["A"]
        await a.crash()  # nobody reports it; the restarted process says Hello first

        a2 = await h.registered("A")
        assert a2.incarnation > a.incarnation
        assert not old.alive and h.engine.replicas["A"] is not old
        out = await reader.finish()
        assert out.tokens == expected_tokens(PROMPT, MAX_TOKENS)
        assert a2.results, "the restarted worker finished the sequence"
        assert h.engine.counters["worker_deaths"] == 1 and h.engine.counters["failovers"] == 1
        # the restarted process is never killed. (With overlap, a step sent to the old process between its crash
        # and the new Hello finds it unreachable and reports the old pid dead: that is right too.)
        assert a2.pid != a.pid and all(pid != a2.pid for _, pid, _ in h.dead)
        assert [reason for _, _, reason in h.dead] in ([], ["unreachable: Host unreachable"])

        stale = h.engine.counters["stale_frames"]
        a2.send(StepResult(step_id=0, worker_id="A", incarnation=a.incarnation, seq_ids=b"", token_ids=b""))
        await until(lambda: h.engine.counters["stale_frames"] == stale + 1, what="the old life's frame dropped")


async def test_heartbeats_are_echoed_and_unknown_ones_refused(tmp_path, model):
    async with harness(tmp_path, model) as h:
        a = await h.registered("A")
        await until(lambda: len(a.echoes) >= 2, what="echoes")
        sent = {beat.seq: beat for beat in a.beats}
        assert all(sent[echo.seq] == echo for echo in a.echoes)

        ghost = h.raw_dealer(b"ghost/hb")
        await ghost.send(encode(Heartbeat(worker_id="ghost", incarnation=1, seq=1, state="ready")))
        reply = decode(await asyncio.wait_for(ghost.recv(), 3))
        assert isinstance(reply, Error) and reply.code == "unknown_worker"

        a.reregister = False
        a.send_raw(encode(Heartbeat(worker_id="A", incarnation=a.incarnation + 1, seq=99, state="ready")), hb=True)
        await until(lambda: a.hb_errors, what="unknown_worker for a wrong incarnation")
        assert a.hb_errors[0].code == "unknown_worker"
        assert all(echo.seq != 99 for echo in a.echoes)

        # a lost lease: declared dead while alive, it hears unknown_worker and registers again
        first = a.incarnation
        a.reregister = True
        a.mute_heartbeats = True
        await until(lambda: not h.engine.replicas["A"].alive, what="A declared dead")
        a.mute_heartbeats = False
        # registered again, and serving again once the control loop (woken by the registration) assigns it
        await until(lambda: a.incarnation > first and h.engine.replicas["A"].alive
                    and h.engine.replicas["A"].incarnation == a.incarnation
                    and h.engine.replicas["A"].replica_id is not None, what="A registered again")
        reader, _, placed = h.submit(PROMPT, 5)
        assert placed == "A"
        assert (await reader.finish()).tokens == expected_tokens(PROMPT, 5)


async def test_a_worker_holding_another_model_is_a_spare_not_a_replica(tmp_path, model):
    async with harness(tmp_path, model) as h:
        w = h.worker("B", model="/models/something-else")
        await w.wait_welcome()
        await until(lambda: "B" in h.engine.replicas, what="B registered")
        await asyncio.sleep(0.1)  # control rounds ran: B joins no deployment, and nothing routes to it
        assert h.engine.replicas["B"].replica_id is None and not h.control.ready
        assert h.engine.spares() == ["B"]


async def test_hello_the_engine_cannot_use_is_refused_and_the_engine_keeps_working(tmp_path, model):
    async with harness(tmp_path, model) as h:
        bad = h.raw_dealer(b"bad")
        hello = Hello(worker_id="bad", host="h", pid=1, device="null", model=model.folder, model_version="",
                      dtype="none", num_blocks=0, block_size=16, max_model_len=2048, vocab_size=49152)
        await bad.send(encode(hello))  # passes the wire checks, but a pool of 0 blocks cannot serve
        reply = decode(await asyncio.wait_for(bad.recv(), 3))
        assert isinstance(reply, Error) and reply.code == "bad_hello" and "num_blocks" in reply.message
        assert "bad" not in h.engine.replicas
        await h.registered("A")
        reader, _, _ = h.submit(PROMPT, 5)
        assert (await reader.finish()).tokens == expected_tokens(PROMPT, 5)


async def test_vanished_worker_does_not_fail_new_requests(tmp_path, model):
    # A's process is gone (its sockets closed) before any deadline noticed, and a new request is routed
    # to it. The send fails (EHOSTUNREACH): that is A's failure, not the request's, so A is declared dead
    # at once and the request runs on B (it used to be blamed for two failed sends and failed with 500).
    async with harness(tmp_path, model, **STEADY) as h:
        a = await h.registered("A")
        await h.registered("B")
        await a.crash()
        await asyncio.sleep(0.2)  # the ROUTER notices the disconnect
        reader, seq, placed = h.submit(PROMPT, 10)
        assert placed == "A"
        out = await reader.finish(timeout=2.5)  # well before any deadline
        assert out.error is None and out.tokens == expected_tokens(PROMPT, 10)
        assert not h.engine.replicas["A"].alive
        assert h.engine.counters["poisoned"] == 0
        assert [(wid, pid) for wid, pid, _ in h.dead] == [("A", a.pid)]
        assert "unreachable" in h.dead[0][2]


# ------------------------------------------------------------------------------------------ abort, drain
async def test_abort_frees_a_sequence_where_it_moved(tmp_path, model):
    async with harness(tmp_path, model, **STEADY) as h:
        a = await h.registered("A")
        b = await h.registered("B")
        a.hang_steps = b.hang_steps = True
        reader, seq, _ = h.submit(PROMPT)
        await until(lambda: a.held, what="A's step")
        await a.close()
        h.engine.worker_exited("A", "killed by signal 9")
        await until(lambda: b.held, what="B's step")
        assert h.replica_of(seq.seq_id) == "B"

        h.engine.abort(seq.seq_id)
        rb = h.engine.replicas["B"]
        assert seq.seq_id not in rb.tracks and rb.scheduler.get(seq.seq_id) is None
        assert rb.scheduler.kv_usage == 0
        b.hang_steps = False
        b.release()  # the late result for the aborted sequence reaches nobody
        other, _, _ = h.submit(OTHER_PROMPT, 5)
        assert (await other.finish()).tokens == expected_tokens(OTHER_PROMPT, 5)
        assert seq.seq_id not in b.executor.seqs, "the worker was never told to free it"
        assert not reader.stream._pending and not reader.stream.finished

        # an orphan can be aborted too
        await b.close()
        h.engine.worker_exited("B", "killed by signal 9")
        c = await h.registered("C")
        c.hang_steps = True
        reader3, seq3, _ = h.submit(PROMPT)
        await until(lambda: c.held, what="C's step")
        await c.close()
        h.engine.worker_exited("C", "killed by signal 9")
        assert [o.track.seq.seq_id for o in h.engine.orphans] == [seq3.seq_id]
        h.engine.abort(seq3.seq_id)
        assert h.engine.orphans == [] and h.engine.num_active() == 0


async def test_drain_waits_for_in_flight_work_and_tells_workers(tmp_path, model):
    async with harness(tmp_path, model, **STEADY) as h:
        a = await h.registered("A")
        a.delay_s = 0.01
        readers = [h.submit(PROMPT)[0], h.submit(OTHER_PROMPT)[0]]
        await readers[0].until(2)
        assert await asyncio.wait_for(h.engine.drain(5.0), 6.0) is True
        assert h.engine.num_active() == 0
        await until(lambda: a.drains, what="Drain at the worker")
        assert a.drains[0].deadline_s == 5.0
        outs = [await r.finish() for r in readers]
        assert outs[0].tokens == expected_tokens(PROMPT, MAX_TOKENS)
        assert outs[1].tokens == expected_tokens(OTHER_PROMPT, MAX_TOKENS)

        a.hang_steps = True  # work that cannot finish: drain gives up at its deadline
        h.submit(PROMPT)
        started = time.monotonic()
        assert await asyncio.wait_for(h.engine.drain(0.3), 3.0) is False
        assert time.monotonic() - started >= 0.3


async def test_hellos_sent_before_the_current_welcome_are_ignored(tmp_path, model):
    # a worker queues a Hello a second while no daemon listens; they arrive after its registration
    async with harness(tmp_path, model, **STEADY) as h:
        a = await h.registered("A")
        a.delay_s = 0.01
        replica = h.engine.replicas["A"]
        reader, _, _ = h.submit(PROMPT)
        await reader.until(3)
        a.send(dataclasses.replace(a.hello(), incarnation=0))  # from before its first Welcome
        a.send(dataclasses.replace(a.hello(), incarnation=a.incarnation + 5))  # from a daemon before this one
        out = await reader.finish()
        assert out.tokens == expected_tokens(PROMPT, MAX_TOKENS)
        assert h.engine.replicas["A"] is replica and replica.alive
        assert h.engine.counters["worker_deaths"] == 0
        # the same process saying Hello with its current incarnation lost its lease: that one re-registers
        a.send(a.hello())
        await until(lambda: h.engine.replicas["A"] is not replica, what="the re-registration")
        assert h.engine.counters["worker_deaths"] == 1
