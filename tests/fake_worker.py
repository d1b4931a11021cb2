"""A fake worker that speaks the real protocol over real ZeroMQ sockets, inside the test's event loop.

It registers like `worker/main.py` (Hello until Welcome, heartbeats on a second DEALER named "<id>/hb",
Error(unknown_worker) -> register again) and answers steps with `worker.null.NullExecutor`, so the
daemon's token bookkeeping is real. Its knobs make it fail on purpose: stop heartbeating, hold steps
(a hung step), answer steps with Error, answer slowly, crash, or send arbitrary frames.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from protocol.messages import (
    MAX_FRAME_BYTES,
    Drain,
    Error,
    Heartbeat,
    Hello,
    Message,
    ProtocolError,
    Shutdown,
    Step,
    StepResult,
    Welcome,
    decode,
    encode,
    unpack_ints,
)
from protocol.transport import SEND_HWM
from worker.executor import StepError
from worker.null import NullExecutor, NullRunner

StepPredicate = Callable[[Step], bool]


def has_token(token: int) -> StepPredicate:
    """A step predicate: true when one of the step's new sequences contains `token` (a poison input)."""
    return lambda step: any(token in unpack_ints(new.token_ids) for new in step.new_seqs)


def _dealer(ctx: zmq.asyncio.Context, identity: bytes, address: str) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SEND_HWM)
    sock.setsockopt(zmq.RCVHWM, SEND_HWM)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(address)
    return sock


def _matches(knob: bool | StepPredicate, step: Step) -> bool:
    return knob(step) if callable(knob) else bool(knob)


class FakeWorker:
    """One fake worker process. Knobs are plain attributes, so a test may flip them at any time:

    - mute_heartbeats: stop sending heartbeats (a frozen or partitioned process);
    - hang_steps: keep steps unanswered in `held` (a hung kernel; heartbeats still flow); `release()`
      answers them later;
    - fail_steps: answer with Error(code="internal", step_id) and reset, as the real worker does;
    - crash_steps: crash on receiving such a step (like `--fault crash-on-token`);
    - delay_s: sleep this long before answering each step;
    - reregister: say Hello again when the daemon answers a heartbeat with Error(unknown_worker).
    The three step knobs take True/False or a predicate on the Step (see `has_token`).
    `on_crash(worker)` is called after a crash: a test harness uses it as the supervisor's exit watch.
    """

    def __init__(self, worker_id: str, address: str, model: str, runner: NullRunner, *,
                 ctx: zmq.asyncio.Context, pid: int = 4242, hello_retry_s: float = 0.5,
                 on_crash: Callable[[FakeWorker], None] | None = None, **hello_fields: Any) -> None:
        self.worker_id = worker_id
        self.address = address
        self.model = model
        self.runner = runner
        self.ctx = ctx
        self.pid = pid
        self.hello_retry_s = hello_retry_s
        self.on_crash = on_crash
        self.hello_fields = hello_fields  # overrides of Hello fields (a bad num_blocks, say)
        self.executor = NullExecutor(runner, worker_id=worker_id)
        # knobs
        self.mute_heartbeats = False
        self.hang_steps: bool | StepPredicate = False
        self.fail_steps: bool | StepPredicate = False
        self.crash_steps: bool | StepPredicate = False
        self.delay_s = 0.0
        self.reregister = True
        # what happened
        self.welcomed = asyncio.Event()
        self.welcomes: list[Welcome] = []
        self.steps: list[Step] = []  # every step received
        self.held: list[Step] = []  # steps received under hang_steps, not yet answered
        self.results: list[StepResult] = []  # every StepResult sent
        self.errors: list[Error] = []  # Errors received on the main socket
        self.hb_errors: list[Error] = []  # Errors received on the heartbeat socket
        self.echoes: list[Heartbeat] = []  # heartbeats the daemon echoed
        self.beats: list[Heartbeat] = []  # heartbeats sent
        self.drains: list[Drain] = []
        self.shutdowns = 0
        self.bad_frames = 0
        self.crashed = False
        self.state = "ready"
        self.dealer: zmq.asyncio.Socket | None = None
        self.hb: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._beat_seq = 0

    # ------------------------------------------------------------------------------ life cycle
    @property
    def incarnation(self) -> int:
        return self.executor.incarnation

    def start(self) -> FakeWorker:
        self.dealer = _dealer(self.ctx, self.worker_id.encode(), self.address)
        self.hb = _dealer(self.ctx, f"{self.worker_id}/hb".encode(), self.address)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._main_loop(), name=f"fake-{self.worker_id}-main"),
                       loop.create_task(self._hello_loop(), name=f"fake-{self.worker_id}-hello"),
                       loop.create_task(self._beat_loop(), name=f"fake-{self.worker_id}-beat"),
                       loop.create_task(self._hb_loop(), name=f"fake-{self.worker_id}-hb")]
        return self

    async def wait_welcome(self, timeout: float = 3.0) -> Welcome:
        await asyncio.wait_for(self.welcomed.wait(), timeout)
        return self.welcomes[-1]

    async def crash(self) -> None:
        """Stop everything at once, like a killed process: no goodbye, sockets gone."""
        if self.crashed:
            return
        self.crashed = True
        current = asyncio.current_task()
        others = [t for t in self._tasks if t is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        for sock in (self.dealer, self.hb):
            if sock is not None:
                sock.close(linger=0)
        if self.on_crash is not None:
            self.on_crash(self)

    async def close(self) -> None:
        """Test teardown: like crash(), without telling anyone."""
        self.on_crash = None
        await self.crash()

    # ------------------------------------------------------------------------------ sending
    def send(self, msg: Message) -> None:
        assert self.dealer is not None
        self.dealer.send(encode(msg), flags=zmq.NOBLOCK)

    def send_raw(self, frame: bytes | list[bytes], hb: bool = False) -> None:
        """Send arbitrary bytes (or a multipart message) on the main or the heartbeat socket."""
        sock = self.hb if hb else self.dealer
        assert sock is not None
        if isinstance(frame, list):
            sock.send_multipart(frame, flags=zmq.NOBLOCK)
        else:
            sock.send(frame, flags=zmq.NOBLOCK)

    def hello(self) -> Hello:
        r = self.runner
        fields: dict[str, Any] = dict(
            worker_id=self.worker_id, host="fakehost", pid=self.pid, device=r.device, model=self.model,
            model_version="", dtype=r.dtype, num_blocks=r.num_blocks, block_size=r.block_size,
            max_model_len=r.max_model_len, vocab_size=r.config.vocab_size, incarnation=self.incarnation,
            state=self.state)
        fields.update(self.hello_fields)
        return Hello(**fields)

    def answer(self, step: Step) -> StepResult | Error:
        """Run one step on the null executor and send its result (or Error, as the real worker does)."""
        try:
            result: StepResult | Error = self.executor.execute(step)
        except StepError as exc:
            self.executor.reset()
            result = Error(code="bad_step", message=f"StepError: {exc}", step_id=step.step_id)
        else:
            self.results.append(result)
        self.send(result)
        return result

    def release(self) -> None:
        """Answer every held step now (the hang is over)."""
        held, self.held = self.held, []
        for step in held:
            self.answer(step)

    # ------------------------------------------------------------------------------ loops
    async def _hello_loop(self) -> None:
        while True:
            if not self.welcomed.is_set():
                self.send(self.hello())
            await asyncio.sleep(self.hello_retry_s)

    async def _main_loop(self) -> None:
        assert self.dealer is not None
        while not self.crashed:
            frame = await self.dealer.recv()
            try:
                msg = decode(frame)
            except ProtocolError:
                self.bad_frames += 1
                continue
            if isinstance(msg, Welcome):
                self.executor.reset()
                self.executor.incarnation = msg.incarnation
                self.welcomes.append(msg)
                self.state = "ready"
                self.welcomed.set()
            elif isinstance(msg, Step):
                if self.welcomed.is_set():
                    await self._on_step(msg)
            elif isinstance(msg, Error):
                self.errors.append(msg)
            elif isinstance(msg, Drain):
                self.drains.append(msg)
                self.state = "draining"
            elif isinstance(msg, Shutdown):
                self.shutdowns += 1

    async def _on_step(self, step: Step) -> None:
        self.steps.append(step)
        if _matches(self.crash_steps, step):
            await self.crash()  # the main loop (this task) then ends
            return
        if self.held or _matches(self.hang_steps, step):  # a hung worker runs nothing after it either
            self.held.append(step)
            return
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if _matches(self.fail_steps, step):
            self.executor.reset()  # the real worker starts clean after a failed step
            self.send(Error(code="internal", message="RuntimeError: injected", step_id=step.step_id))
            return
        self.answer(step)

    async def _beat_loop(self) -> None:
        assert self.hb is not None
        while True:
            await self.welcomed.wait()
            if not self.mute_heartbeats:
                self._beat_seq += 1
                beat = Heartbeat(worker_id=self.worker_id, incarnation=self.incarnation, seq=self._beat_seq,
                                 state=self.state, step_id=self.held[0].step_id if self.held else None)
                self.beats.append(beat)
                with contextlib.suppress(zmq.ZMQError):
                    self.hb.send(encode(beat), flags=zmq.NOBLOCK)
            interval = self.welcomes[-1].heartbeat_interval if self.welcomes else 0.1
            await asyncio.sleep(interval)

    async def _hb_loop(self) -> None:
        assert self.hb is not None
        while True:
            frame = await self.hb.recv()
            try:
                msg = decode(frame)
            except ProtocolError:
                self.bad_frames += 1
                continue
            if isinstance(msg, Heartbeat):
                self.echoes.append(msg)
            elif isinstance(msg, Error):
                self.hb_errors.append(msg)
                if msg.code == "unknown_worker" and self.reregister and self.welcomed.is_set():
                    # the daemon declared this life dead: drop the work, register again
                    self.welcomed.clear()
                    self.executor.reset()
                    self.held.clear()
                    self.send(self.hello())
