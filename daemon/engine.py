"""The asyncio layer around the schedulers: worker registry, one step loop per replica, request streams.

It only moves messages: `Scheduler` decides, workers compute, this module carries plans out and
results back, detokenizes, applies stop strings, and feeds each request's output channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from daemon.scheduler import Scheduler, SchedulerConfig, Sequence, SeqUpdate
from daemon.tokenizer import IncrementalDetokenizer, StopMatcher, Tokenizer
from protocol.messages import Error, Heartbeat, Hello, ProtocolError, Shutdown, StepResult, Welcome, decode
from protocol.transport import RouterEndpoint

log = logging.getLogger("nimbus.engine")


@dataclass(slots=True)
class Delta:
    """New output of one choice: text safe to show, its tokens, logprob entries, and the end if reached."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None


class RequestStream:
    """One request's output channel. `put` never blocks the step loop; a slow reader gets merged deltas."""

    def __init__(self, num_choices: int) -> None:
        self._pending: list[Delta] = []
        self._ready = asyncio.Event()
        self.unfinished = num_choices
        self.error: str | None = None

    def put(self, delta: Delta) -> None:
        if delta.finish_reason is not None:
            self.unfinished -= 1
        self._pending.append(delta)
        self._ready.set()

    def fail(self, message: str) -> None:
        self.error = message
        self._ready.set()

    @property
    def finished(self) -> bool:
        return self.unfinished <= 0 or self.error is not None

    async def get(self) -> list[Delta]:
        """Everything produced since the last call (waits for at least one delta or the end)."""
        while not self._pending and not self.finished:
            self._ready.clear()
            await self._ready.wait()
        out, self._pending = self._pending, []
        return out


@dataclass(slots=True)
class Track:
    """Per-sequence output state kept beside the scheduler's Sequence."""

    seq: Sequence
    index: int
    stream: RequestStream
    detok: IncrementalDetokenizer
    stops: StopMatcher | None


class WorkerFailed(Exception):
    pass


class Replica:
    """One worker serving one model: its scheduler and the loop that drives its steps."""

    def __init__(self, hello: Hello, identity: bytes, endpoint: RouterEndpoint, tokenizer: Tokenizer,
                 config: SchedulerConfig, step_timeout_s: float, incarnation: int) -> None:
        self.hello = hello
        self.identity = identity
        self.endpoint = endpoint
        self.tokenizer = tokenizer
        self.max_model_len = hello.max_model_len
        self.scheduler = Scheduler(config, hello.num_blocks, hello.block_size, hello.max_model_len)
        self.step_timeout_s = step_timeout_s
        self.incarnation = incarnation
        self.tracks: dict[int, Track] = {}
        self.wake = asyncio.Event()
        self.pending: tuple[int, asyncio.Future[StepResult]] | None = None
        self.last_heartbeat = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        self.alive = True
        self.steps = 0

    @property
    def worker_id(self) -> str:
        return self.hello.worker_id

    def add(self, track: Track) -> None:
        self.tracks[track.seq.seq_id] = track
        self.scheduler.add(track.seq)
        self.wake.set()

    def abort(self, seq_id: int) -> None:
        if self.tracks.pop(seq_id, None) is not None:
            self.scheduler.abort(seq_id)
            self.wake.set()

    def on_result(self, result: StepResult | Error) -> None:
        if self.pending is None or result.step_id != self.pending[0]:
            log.warning("worker %s: dropping result for step %s (not in flight)", self.worker_id, result.step_id)
            return
        future = self.pending[1]
        if future.done():
            return
        if isinstance(result, Error):
            future.set_exception(WorkerFailed(f"{result.code}: {result.message}"))
        else:
            future.set_result(result)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.alive:
            plan = self.scheduler.schedule()
            if plan is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            future: asyncio.Future[StepResult] = loop.create_future()
            self.pending = (plan.step.step_id, future)
            try:
                self.endpoint.send(self.identity, plan.step)
                result = await asyncio.wait_for(future, self.step_timeout_s)
            except (WorkerFailed, zmq.ZMQError, TimeoutError) as exc:
                self._recover(exc)
                continue
            finally:
                self.pending = None
            self.steps += 1
            try:
                updates = self.scheduler.update(plan, result)
            except ValueError as exc:  # the result contradicts the plan: the worker broke the contract
                self._recover(exc)
                continue
            for update in updates:
                self._emit(update)

    def _recover(self, exc: BaseException) -> None:
        # The worker's sequence state is unknown now (it resets itself on a failed step): recompute
        # everything from the daemon's copy, which holds every prompt and generated token.
        log.error("worker %s: step failed (%s); requeueing its %d sequences", self.worker_id, exc,
                  len(self.tracks))
        self.scheduler.requeue_all()

    def _emit(self, update: SeqUpdate) -> None:
        track = self.tracks.get(update.seq.seq_id)
        if track is None:
            return
        seq = update.seq
        text = track.detok.add(update.new_token_ids) if update.new_token_ids else ""
        finish = seq.finish_reason if update.finished else None
        if update.finished:
            text += track.detok.flush()
        if track.stops is not None:
            text, matched = track.stops.feed(text)
            if matched:
                if not update.finished:  # the worker may already hold one more token: it is freed next step
                    self.scheduler.abort(seq.seq_id, "stop")
                finish = "stop"
            elif update.finished:
                text += track.stops.flush()
        entries = []
        if seq.sampling.logprobs is not None and update.new_logprobs:
            entries = [(tok, lp, top) for tok, (lp, top) in zip(update.new_token_ids, update.new_logprobs)]
        track.stream.put(Delta(track.index, text, list(update.new_token_ids), entries, finish))
        if finish is not None:
            del self.tracks[seq.seq_id]

    def fail_all(self, message: str) -> None:
        for track in self.tracks.values():
            track.stream.fail(message)
            self.scheduler.abort(track.seq.seq_id)
        self.tracks.clear()


class Engine:
    """Owns the ROUTER socket, registers workers as replicas of the served model, routes requests."""

    def __init__(self, endpoint: RouterEndpoint, model_path: str, tokenizer: Tokenizer,
                 scheduler_config: SchedulerConfig, step_timeout_s: float = 120.0,
                 max_model_len: int | None = None) -> None:
        self.endpoint = endpoint
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.step_timeout_s = step_timeout_s
        self.max_model_len_cap = max_model_len
        self.replicas: dict[str, Replica] = {}
        self.epoch = uuid.uuid4().hex[:12]
        self._incarnations = itertools.count(1)
        self._seq_ids = itertools.count(1)
        self.replica_added = asyncio.Event()
        self.bad_frames = 0
        self.on_hello: Callable[[Hello], None] | None = None

    # ------------------------------------------------------------------ registry
    @property
    def ready(self) -> bool:
        return any(r.alive for r in self.replicas.values())

    @property
    def max_model_len(self) -> int:
        # the KV pool is a context limit too: the scheduler ends longer sequences with "length"
        lens = [r.scheduler.max_seq_len for r in self.replicas.values() if r.alive]
        cap = min(lens) if lens else 0
        return min(cap, self.max_model_len_cap) if self.max_model_len_cap else cap

    async def receive_loop(self) -> None:
        while True:
            identity, frame = await self.endpoint.recv()
            try:
                msg = decode(frame, self.endpoint.max_bytes)
            except ProtocolError as exc:
                self.bad_frames += 1
                log.warning("bad frame from %r: %s", identity[:64], exc)
                continue
            self._dispatch(identity, msg)

    def _dispatch(self, identity: bytes, msg: object) -> None:
        if isinstance(msg, Heartbeat):
            replica = self.replicas.get(msg.worker_id)
            if replica is not None and identity == f"{msg.worker_id}/hb".encode():
                replica.last_heartbeat = time.monotonic()
        elif isinstance(msg, StepResult | Error):
            replica = self._replica_by_identity(identity)
            if replica is not None and getattr(msg, "step_id", None) is not None:
                replica.on_result(msg)
            elif isinstance(msg, Error):
                log.warning("worker %r reports %s: %s", identity[:64], msg.code, msg.message)
        elif isinstance(msg, Hello):
            self._register(identity, msg)

    def _replica_by_identity(self, identity: bytes) -> Replica | None:
        replica = self.replicas.get(identity.decode(errors="replace"))
        return replica if replica is not None and replica.identity == identity else None

    def _register(self, identity: bytes, hello: Hello) -> None:
        if identity != hello.worker_id.encode():
            log.warning("Hello from %r claims id %r; ignored", identity[:64], hello.worker_id)
            return
        if hello.model != self.model_path:
            log.warning("worker %s holds %s, not %s; ignored", hello.worker_id, hello.model, self.model_path)
            self.endpoint.send(identity, Error(code="wrong_model", message=f"this daemon serves {self.model_path}"))
            return
        old = self.replicas.pop(hello.worker_id, None)
        if old is not None:  # the same worker again (restart or reconnect): its old state is gone
            old.alive = False
            old.scheduler.requeue_all()
            if old.task is not None:
                old.task.cancel()
        replica = Replica(hello, identity, self.endpoint, self.tokenizer, self.scheduler_config,
                          self.step_timeout_s, next(self._incarnations))
        if old is not None:
            for track in old.tracks.values():
                replica.add(track)
        self.replicas[hello.worker_id] = replica
        self.endpoint.send(identity, Welcome(worker_id=hello.worker_id, incarnation=replica.incarnation,
                                             epoch=self.epoch))
        replica.task = asyncio.get_running_loop().create_task(replica.run(), name=f"replica-{hello.worker_id}")
        log.info("worker %s registered (%s, %d blocks of %d, max len %d)", hello.worker_id, hello.device,
                 hello.num_blocks, hello.block_size, hello.max_model_len)
        self.replica_added.set()
        if self.on_hello:
            self.on_hello(hello)

    async def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.replica_added.clear()
            try:
                await asyncio.wait_for(self.replica_added.wait(), remaining)
            except TimeoutError:
                return False
        return True

    # ------------------------------------------------------------------ requests
    def num_waiting(self) -> int:
        return sum(r.scheduler.num_waiting for r in self.replicas.values() if r.alive)

    def pick_replica(self, prompt: list[int]) -> Replica:
        """Least queued tokens, but a replica whose prefix cache holds this prompt's start wins unless it
        is far busier (recomputing a long prefix costs more than a short queue)."""
        live = [r for r in self.replicas.values() if r.alive]
        if not live:
            raise LookupError("no live replica")
        least = min(live, key=lambda r: r.scheduler.queued_tokens)
        best = max(live, key=lambda r: r.scheduler.prefix_match_tokens(prompt))
        hit = best.scheduler.prefix_match_tokens(prompt)
        slack = self.scheduler_config.max_num_batched_tokens
        if hit and best.scheduler.queued_tokens - least.scheduler.queued_tokens <= max(hit, slack):
            return best
        return least

    def submit(self, stream: RequestStream, prompt: list[int], make_seq: Callable[[int], Sequence],
               num_choices: int, stops: list[str], first_index: int = 0) -> tuple[Replica, list[Sequence]]:
        """Queue `num_choices` sequences of one prompt on one replica, feeding `stream`."""
        replica = self.pick_replica(prompt)
        seqs = []
        for j in range(num_choices):
            seq = make_seq(next(self._seq_ids))
            seqs.append(seq)
            detok = IncrementalDetokenizer(self.tokenizer, prompt)
            replica.add(Track(seq, first_index + j, stream, detok, StopMatcher(stops) if stops else None))
        return replica, seqs

    def shutdown_workers(self) -> None:
        for replica in self.replicas.values():
            replica.alive = False
            with contextlib.suppress(zmq.ZMQError):
                self.endpoint.send(replica.identity, Shutdown())
