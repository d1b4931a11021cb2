"""One worker serving one model: its scheduler, the loop that drives its steps, and request streams.

The loop is schedule -> send -> await the result -> update -> emit; with the scheduler's overlap on it
sends the next step before awaiting the result of the one in flight, so the worker always has the next
step queued. A worker failure ends the loop; the engine then moves the replica's sequences elsewhere
(they keep every token, so nothing is lost).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import zmq

from daemon.metrics import Metrics, ReplicaMetrics, observe_many
from daemon.scheduler import Logprob, Scheduler, SchedulerConfig, Sequence, StepOutput, StepPlan
from daemon.tokenizer import IncrementalDetokenizer, StopMatcher
from protocol.messages import Error, Hello, StepResult
from protocol.transport import RouterEndpoint

log = logging.getLogger("nimbus.replica")
# The step loop wakes its streams' readers at most once per this many seconds per stream it holds (at most
# MAX_WAKE_INTERVAL_S; a first token and an end go out at once). With many streams on a fast model each
# wake-up, hence each SSE write (a syscall), then carries several steps' tokens, so writing takes a bounded
# share of the daemon's core however fast the model steps; a model slower than that has every token sent the
# step it is made.
WAKE_INTERVAL_PER_STREAM_S = 200e-6
MAX_WAKE_INTERVAL_S = 0.05


@dataclass(slots=True)
class Delta:
    """New output of one choice: text safe to show, its tokens, logprob entries, and the end if reached."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None


class RequestStream:
    """One request's output channel. `put` never blocks the step loop; a slow reader gets merged deltas.

    Deltas of one choice merge while unread, so a read returns at most one delta per choice. The step loop
    puts without waking the reader and wakes it later (`wake`), so a reader may see several steps at once.
    """

    def __init__(self, num_choices: int) -> None:
        self._pending: dict[int, Delta] = {}  # choice index -> everything it produced since the last read
        # (choice index, ids, its detokenizer): each choice's ordinary tokens arrive as bare ids, turned into
        # text when the reader reads (one decode for all the tokens since its last read, not one per step)
        self._raw: list[tuple[int, list[int], IncrementalDetokenizer]] = []
        self._waiter: asyncio.Future[None] | None = None
        self.unfinished = num_choices
        self.error: str | None = None
        self.error_status = 503

    def put(self, delta: Delta) -> None:
        self.push(delta.index, delta.text, delta.token_ids, delta.logprobs, delta.finish_reason)
        self.wake()

    def push(self, index: int, text: str, token_ids: list[int],
             logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None,
             finish_reason: str | None = None) -> None:
        """Add one choice's output without waking the reader (the caller wakes it, maybe after more)."""
        if finish_reason is not None:
            self.unfinished -= 1
        held = self._pending.get(index)
        if held is None:
            self._pending[index] = Delta(index, text, list(token_ids), list(logprobs or ()), finish_reason)
            return
        held.text += text
        held.token_ids += token_ids
        if logprobs:
            held.logprobs += logprobs
        if finish_reason is not None:
            held.finish_reason = finish_reason

    def attach(self, index: int, detok: IncrementalDetokenizer) -> list[int]:
        """The list the step loop appends a choice's ordinary token ids to (no logprobs, no end, no stop
        strings to check: their text needs nothing now). `settle` or a read turns them into text, in order,
        with the choice's detokenizer, which nothing else may use meanwhile."""
        ids: list[int] = []
        self._raw.append((index, ids, detok))
        return ids

    def settle(self) -> None:
        """Turn the attached ids into text now (before anything else is pushed for their choice)."""
        for index, ids, detok in self._raw:
            if ids:
                self.push(index, detok.add(ids), ids)
                ids.clear()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, message: str, status: int = 503) -> None:
        if self.error is None:
            self.error, self.error_status = message, status
        self.wake()

    @property
    def finished(self) -> bool:
        return self.unfinished <= 0 or self.error is not None

    async def get(self) -> list[Delta]:
        """Everything produced since the last call (waits for at least one delta or the end); [] only once
        the stream is finished and everything was read."""
        while True:
            self.settle()
            if self._pending or self.finished:
                break
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out = list(self._pending.values())
        self._pending.clear()
        return out


@dataclass(slots=True)
class Track:
    """Per-sequence output state kept beside the scheduler's Sequence; it moves with the sequence."""

    seq: Sequence
    index: int
    stream: RequestStream
    detok: IncrementalDetokenizer
    stops: StopMatcher | None
    failures: int = 0  # worker deaths or failed steps while this sequence was in the step
    created: float = field(default_factory=time.monotonic)  # the request's arrival
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    worker_id: str = ""  # where its last token came from (for the request log)
    version: str = ""  # the model version of the replica that holds it
    raw: list[int] = field(init=False)  # ordinary tokens not turned into text yet (RequestStream.attach)

    def __post_init__(self) -> None:
        self.raw = self.stream.attach(self.index, self.detok)


class WorkerFailed(Exception):
    pass


@dataclass(slots=True)
class InFlight:
    plan: StepPlan
    future: asyncio.Future[StepResult]
    # time.monotonic() when the worker began on it, as far as the daemon can tell: when it was sent, or when
    # the step before it was answered, whichever is later (step timeouts and durations count from here)
    started: float


def _drop(flights: list[InFlight]) -> None:
    """Forget steps whose results nobody will await (a late one counts as a stale frame)."""
    for flight in flights:
        if flight.future.done():
            if not flight.future.cancelled():
                flight.future.exception()  # retrieved, so asyncio does not log it
        else:
            flight.future.cancel()


class Replica:
    def __init__(self, hello: Hello, identity: bytes, endpoint: RouterEndpoint, config: SchedulerConfig,
                 incarnation: int, metrics: Metrics | None = None) -> None:
        self.hello = hello
        self._all_metrics = metrics
        # which deployment version this worker serves as which replica (engine.assign); None: a spare
        self.replica_id: str | None = None
        self.labels = ("", "")  # (deployment, version)
        self.draining = False  # out of rotation: finishes what it holds, takes nothing new
        self.metrics: ReplicaMetrics | None = None
        self.identity = identity
        self.endpoint = endpoint
        self.scheduler = Scheduler(config, hello.num_blocks, hello.block_size, hello.max_model_len)
        self.incarnation = incarnation
        self.tracks: dict[int, Track] = {}
        self.wake = asyncio.Event()
        self.flights: deque[InFlight] = deque()  # the steps sent and not yet answered, oldest first
        self.last_heartbeat = time.monotonic()
        self.registered_at = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        self.alive = True
        self.steps = 0
        self.stale_frames = 0

    @property
    def worker_id(self) -> str:
        return self.hello.worker_id

    @property
    def queued_tokens(self) -> int:  # routing.ReplicaCandidate
        return self.scheduler.queued_tokens

    def prefix_match_tokens(self, token_ids: list[int]) -> int:
        return self.scheduler.prefix_match_tokens(token_ids)

    @property
    def in_flight(self) -> InFlight | None:
        """The oldest step in flight (the one the worker is computing), or None."""
        return self.flights[0] if self.flights else None

    @property
    def idle(self) -> bool:
        """Holds no request and runs no step (a draining replica in this state is drained)."""
        return not self.tracks and not self.flights

    def assign(self, replica_id: str | None, deployment: str = "", version: str = "") -> None:
        """Serve (deployment, version) as `replica_id`, or, with None, become a spare holding its model."""
        self.replica_id, self.labels, self.draining = replica_id, (deployment, version), False
        m = self._all_metrics
        self.metrics = m.for_replica(deployment, version, self.worker_id) if m is not None and replica_id else None

    def add(self, track: Track) -> None:
        track.version = self.labels[1]
        self.tracks[track.seq.seq_id] = track
        self.scheduler.add(track.seq)
        self.wake.set()

    def abort(self, seq_id: int) -> None:
        if self.tracks.pop(seq_id, None) is not None:
            self.scheduler.abort(seq_id)
            self.wake.set()

    def on_result(self, msg: StepResult | Error) -> None:
        flight = next((f for f in self.flights if f.plan.step.step_id == msg.step_id), None)
        if flight is None or flight.future.done():
            self.stale_frames += 1
            log.warning("worker %s: dropping a result for step %s (not in flight)", self.worker_id, msg.step_id)
            return
        if isinstance(msg, Error):
            flight.future.set_exception(WorkerFailed(f"{msg.code}: {msg.message}"))
        else:
            flight.future.set_result(msg)

    def forget_flights(self) -> None:
        """Stop awaiting every step in flight (their late results count as stale frames)."""
        _drop(list(self.flights))
        self.flights.clear()

    def fail(self, reason: str) -> list[Track]:
        """The worker is gone: stop the loop and hand back every track (blame goes to the steps in flight,
        once per sequence however many of them it was in)."""
        self.alive = False
        blamed = {seq_id for flight in self.flights for seq_id in flight.plan.scheduled}
        for seq_id in blamed:
            if seq_id in self.tracks:
                self.tracks[seq_id].failures += 1
                self.tracks[seq_id].seq.suspect = True
        if self.flights:
            head = self.flights.popleft()
            if not head.future.done():
                head.future.set_exception(WorkerFailed(reason))  # the loop awaits it
            _drop(list(self.flights))
            self.flights.clear()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        tracks = list(self.tracks.values())
        self.tracks.clear()
        return tracks

    async def run(self, on_step_error) -> None:
        loop = asyncio.get_running_loop()
        unwoken: set[RequestStream] = set()  # streams holding output their readers were not woken for yet
        woken_at = 0.0
        flights, scheduler = self.flights, self.scheduler
        depth = scheduler.config.max_steps_in_flight
        try:
            while self.alive:
                if len(flights) < depth and (plan := scheduler.schedule()) is not None:
                    now = time.monotonic()
                    flights.append(InFlight(plan, loop.create_future(), now))
                    self._scheduled(plan, now)
                    try:
                        self.endpoint.send(self.identity, plan.step)
                    except zmq.ZMQError as exc:
                        if self.alive:
                            on_step_error(self, plan, exc)  # the worker is unreachable: it is failed
                        return
                    continue  # build the next step while the worker computes this one
                if not flights:
                    _wake_all(unwoken)
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                flight = flights[0]
                try:
                    result = await flight.future
                    updates = scheduler.update(flight.plan, result)
                except (WorkerFailed, ValueError) as exc:
                    if not self.alive:
                        return
                    self.forget_flights()
                    on_step_error(self, flight.plan, exc)  # the worker lives but its state is unknown: recompute
                    continue
                flights.popleft()
                self.steps += 1
                now = time.monotonic()
                if flights:  # the worker starts on the next step now (it was queued there already)
                    flights[0].started = now
                if (m := self.metrics) is not None:
                    done = flight.plan
                    m.step.observe(now - flight.started)
                    m.compute.observe(result.forward_s)
                    m.batch_tokens.observe(done.num_batched_tokens)
                    if done.preempted_seq_ids:
                        m.preemptions.inc(len(done.preempted_seq_ids))
                self._emit_all(updates, now, unwoken)
                if unwoken and now - woken_at >= min(MAX_WAKE_INTERVAL_S, WAKE_INTERVAL_PER_STREAM_S * len(self.tracks)):
                    _wake_all(unwoken)
                    woken_at = now
        finally:
            _wake_all(unwoken)

    def _scheduled(self, plan: StepPlan, now: float) -> None:
        for new in plan.step.new_seqs:  # a sequence is first scheduled when it is admitted
            track = self.tracks.get(new.seq_id)
            if track is not None and track.first_scheduled is None:
                track.first_scheduled = now
                if self.metrics is not None:
                    self.metrics.queue.observe(now - track.created)

    def _emit_all(self, out: StepOutput, now: float, unwoken: set[RequestStream]) -> None:
        """Apply one step's output to its tracks and streams; token metrics are observed once per step."""
        m = self.metrics
        tracks, worker_id, logprobs = self.tracks, self.worker_id, out.logprobs
        lasts: list[float] = []  # each token's previous token time (a step's sequences mostly share one)
        num_tokens = 0
        for seq, token in zip(out.seqs, out.tokens):  # inline: this runs for every sequence of every step
            track = tracks.get(seq.seq_id)
            if track is None:
                continue
            num_tokens += 1
            last = track.last_token
            track.last_token = now
            track.worker_id = worker_id
            if last is None:  # its first token
                track.first_token = now
                if m is not None:
                    m.ttft.observe(now - track.created)
                    m.prefill.observe(now - (track.first_scheduled or track.created))
                self._emit(track, token, logprobs.get(seq.seq_id) if logprobs else None, True, unwoken)
                continue
            lasts.append(last)
            if track.stops is not None or seq.finish_reason is not None or (logprobs and seq.seq_id in logprobs):
                self._emit(track, token, logprobs.get(seq.seq_id) if logprobs else None, False, unwoken)
                continue
            # the usual token: its id to the stream, made text when the reader reads
            track.raw.append(token)
            unwoken.add(track.stream)
        if m is not None:
            if num_tokens:
                m.generation_tokens.inc(num_tokens)
            for last, count in Counter(lasts).items():
                observe_many(m.itl, now - last, count)

    def _emit(self, track: Track, token: int, logprob: Logprob | None, first: bool,
              unwoken: set[RequestStream]) -> None:
        seq = track.seq
        finished = seq.finish_reason is not None  # by the step (a stop token, or a length limit)
        stream = track.stream
        if track.raw:  # earlier tokens' text first
            stream.settle()
        text = track.detok.add((token,))
        finish = seq.finish_reason
        if finished:
            text += track.detok.flush()
        if track.stops is not None:
            text, matched = track.stops.feed(text)
            if matched:
                if not finished:  # the worker may already hold one more token: it is freed next step
                    self.scheduler.abort(seq.seq_id, "stop")
                finish = "stop"
            elif finished:
                text += track.stops.flush()
        entries = None
        if logprob is not None and seq.sampling.logprobs is not None:
            entries = [(token, logprob[0], logprob[1])]
        stream.push(track.index, text, [token], entries, finish)
        if finish is not None:
            del self.tracks[seq.seq_id]
            if self.metrics is not None:
                self.metrics.e2e.observe(time.monotonic() - track.created)
            stream.wake()
        elif first:  # the first token and the end go out at once; the rest at the next wake-up
            stream.wake()
        else:
            unwoken.add(stream)


def _wake_all(streams: set[RequestStream]) -> None:
    for stream in streams:
        stream.wake()
    streams.clear()
