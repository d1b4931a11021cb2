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
# The step loop wakes its streams' readers at most once per this many seconds per stream it holds, and at
# most once per [scheduler] stream_interval_ms (a first token and an end go out at once). With many streams
# on a fast model each wake-up, hence each SSE write (a syscall), then carries several steps' tokens, so
# writing takes a bounded share of the daemon's core however fast the model steps (2,500 wake-ups a second up
# to 250 streams, each stream's every 100 ms beyond, by default); a model slower than that has every token sent
# the step it is made.
WAKE_INTERVAL_PER_STREAM_S = 400e-6


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
        # each choice's ordinary tokens are read from its sequence's own output list and turned into text
        # when the reader reads (one decode for all the tokens since its last read, not one per step)
        self._sources: list[Source] = []
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

    def attach(self, index: int, ids: list[int], detok: IncrementalDetokenizer) -> Source:
        """Read a choice's ordinary tokens from `ids`, its sequence's output list, which only grows: a read
        turns the ids past the source's mark into text with the choice's detokenizer, which nothing else may
        use meanwhile. The step loop moves the mark itself past tokens it pushes (`Source.settle`)."""
        source = Source(index, ids, detok, len(ids))
        self._sources.append(source)
        return source

    def settle(self) -> None:
        """Turn every choice's unread ids into text now."""
        for source in self._sources:
            if len(source.ids) > source.read:
                source.settle(self, len(source.ids))

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
class Source:
    """Where a stream reads one choice's tokens: its sequence's output ids, read up to `read`."""

    index: int
    ids: list[int]
    detok: IncrementalDetokenizer
    read: int

    def settle(self, stream: RequestStream, upto: int) -> None:
        """Push the text of ids[read:upto] to the stream (without waking it)."""
        part = self.ids[self.read : upto]
        self.read = upto
        stream.push(self.index, self.detok.add(part), part)


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
    # its latest token's time; while its sequence is in the replica's cohort the replica knows a later one
    # (Replica.cohort_time), written here when the sequence leaves the cohort
    last_token: float | None = None
    worker_id: str = ""  # the worker that holds it, or held it last (for the request log)
    version: str = ""  # the model version of the replica that holds it
    source: Source = field(init=False)  # where its stream reads its ordinary tokens (RequestStream.attach)
    # its tokens take the eager path every step (their text is checked, or carries logprobs)
    eager: bool = field(init=False)

    def __post_init__(self) -> None:
        self.source = self.stream.attach(self.index, self.seq.output_token_ids, self.detok)
        self.eager = self.stops is not None or self.seq.sampling.logprobs is not None


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
        self.num_eager = 0  # tracks held that are eager (Track.eager)
        # The sequences of the step emitted last, all of which produced a token at cohort_time. A step that
        # samples the same sequences again (most steps) is applied without touching each track: see _emit_all.
        self.cohort: list[Sequence] = []
        self.cohort_time = 0.0
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
        track.version, track.worker_id = self.labels[1], self.worker_id
        self.scheduler.add(track.seq)
        self.tracks[track.seq.seq_id] = track
        self.num_eager += track.eager
        self.wake.set()

    def abort(self, seq_id: int) -> None:
        if seq_id in self.tracks:
            self._leave_cohort()
            self.num_eager -= self.tracks.pop(seq_id).eager
            self.scheduler.abort(seq_id)
            self.wake.set()

    def _leave_cohort(self) -> None:
        """Write the cohort's token time into its tracks (before a step that is not the cohort's, or before
        tracks leave), and start a new cohort."""
        tracks, when = self.tracks, self.cohort_time
        for seq in self.cohort:
            track = tracks.get(seq.seq_id)
            if track is not None:
                track.last_token = when
        self.cohort = []

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
        self._leave_cohort()
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
        self.num_eager = 0
        return tracks

    async def run(self, on_step_error) -> None:
        loop = asyncio.get_running_loop()
        unwoken = False  # some stream holds output its reader was not woken for yet
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
                    if unwoken:
                        self._wake_all()
                        unwoken = False
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
                unwoken |= self._emit_all(updates, now)
                if unwoken and now - woken_at >= self.wake_interval():
                    self._wake_all()
                    unwoken, woken_at = False, now
        finally:
            self._wake_all()

    def wake_interval(self) -> float:
        """Seconds between wake-ups of this replica's stream readers while steps come faster than that."""
        cap = self.scheduler.config.stream_interval_ms / 1000
        return min(cap, WAKE_INTERVAL_PER_STREAM_S * len(self.tracks))

    def _wake_all(self) -> None:
        """Wake every stream this replica feeds (a reader with nothing new waits again)."""
        for track in self.tracks.values():
            track.stream.wake()

    def _scheduled(self, plan: StepPlan, now: float) -> None:
        for new in plan.step.new_seqs:  # a sequence is first scheduled when it is admitted
            track = self.tracks.get(new.seq_id)
            if track is not None and track.first_scheduled is None:
                track.first_scheduled = now
                if self.metrics is not None:
                    self.metrics.queue.observe(now - track.created)

    def _emit_all(self, out: StepOutput, now: float) -> bool:
        """Apply one step's output to its tracks and streams; token metrics are observed once per step.
        Returns whether some stream got output its reader was not woken for (it reads it at the next wake-up)."""
        m = self.metrics
        seqs = out.seqs
        if not self.num_eager and not out.num_finished and seqs == self.cohort:
            # The usual step: the same sequences as the last one, all ordinary tokens. Their streams read the
            # new ids from the sequences themselves, and each token's latency is the time since that step.
            if m is not None and seqs:
                m.generation_tokens.inc(len(seqs))
                observe_many(m.itl, now - self.cohort_time, len(seqs))
            self.cohort, self.cohort_time = list(seqs), now
            return bool(seqs)
        self._leave_cohort()
        tracks, logprobs = self.tracks, out.logprobs
        lasts: list[float] = []  # each token's previous token time (a step's sequences mostly share one)
        unwoken = False
        num_tokens = 0
        for seq, token in zip(seqs, out.tokens):  # inline: this runs for every sequence of some steps
            track = tracks.get(seq.seq_id)
            if track is None:
                continue
            num_tokens += 1
            last = track.last_token
            track.last_token = now
            if last is None:  # its first token
                track.first_token = now
                if m is not None:
                    m.ttft.observe(now - track.created)
                    m.prefill.observe(now - (track.first_scheduled or track.created))
                self._emit(track, token, logprobs.get(seq.seq_id) if logprobs else None, True)
                continue
            lasts.append(last)
            if track.eager or seq.finish_reason is not None:
                unwoken |= self._emit(track, token, logprobs.get(seq.seq_id) if logprobs else None, False)
            else:
                unwoken = True  # the usual token: its stream reads its id from the sequence
        self.cohort, self.cohort_time = [s for s in seqs if s.seq_id in tracks], now  # finished ones left
        if m is not None:
            if num_tokens:
                m.generation_tokens.inc(num_tokens)
            for last, count in Counter(lasts).items():
                observe_many(m.itl, now - last, count)
        return unwoken

    def _emit(self, track: Track, token: int, logprob: Logprob | None, first: bool) -> bool:
        """The eager path of one token (the sequence's latest output): returns whether its stream waits for the
        next wake-up (False: it was woken now)."""
        seq = track.seq
        finished = seq.finish_reason is not None  # by the step (a stop token, or a length limit)
        stream, source = track.stream, track.source
        latest = len(seq.output_token_ids) - 1  # where `token` is in the output
        if source.read < latest:  # earlier tokens' text first
            source.settle(stream, latest)
        source.read = latest + 1
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
            self.num_eager -= track.eager
            if self.metrics is not None:
                self.metrics.e2e.observe(time.monotonic() - track.created)
            stream.wake()
            return False
        if first:  # the first token and the end go out at once; the rest at the next wake-up
            stream.wake()
            return False
        return True
