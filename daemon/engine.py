"""The engine: worker registry, routing, health (heartbeats, step deadlines) and zero-loss failover.

It owns the ROUTER socket and one `Replica` per registered worker. When a worker dies, its sequences
(which keep every prompt and generated token here) move to another replica, or wait for one, and
their clients' streams simply continue. Clocks are monotonic only.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from daemon.metrics import Metrics
from daemon.replica import Replica, RequestStream, Track
from daemon.scheduler import SchedulerConfig, Sequence, StepPlan
from daemon.tokenizer import IncrementalDetokenizer, StopMatcher, Tokenizer
from protocol.messages import (
    Drain,
    Error,
    Heartbeat,
    Hello,
    ProtocolError,
    Shutdown,
    StepResult,
    Welcome,
    decode,
)
from protocol.transport import RouterEndpoint

log = logging.getLogger("nimbus.engine")
# a sequence whose steps were in flight when this many workers died or failed is a poison request
POISON_FAILURES = 2


@dataclass(frozen=True, slots=True)
class HealthConfig:
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    step_timeout_s: float = 120.0
    placement_timeout_s: float = 30.0  # a sequence with no live replica waits this long, then fails (503)
    check_interval_s: float = 0.2


@dataclass(slots=True)
class Orphan:
    track: Track
    deadline: float


class Engine:
    def __init__(self, endpoint: RouterEndpoint, model_path: str, tokenizer: Tokenizer,
                 scheduler_config: SchedulerConfig, health: HealthConfig | None = None,
                 max_model_len: int | None = None, deployment: str = "", metrics: Metrics | None = None) -> None:
        self.endpoint = endpoint
        self.deployment = deployment or model_path
        self.metrics = metrics
        self._retired_prefix: dict[str, tuple[int, int]] = {}  # prefix-cache counts of replicas gone
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.health = health or HealthConfig()
        self.max_model_len_cap = max_model_len
        self.replicas: dict[str, Replica] = {}
        self.orphans: list[Orphan] = []
        self.epoch = uuid.uuid4().hex[:12]
        self._incarnations = itertools.count(1)
        self._seq_ids = itertools.count(1)
        self.replica_added = asyncio.Event()
        self.counters = dict(bad_frames=0, stale_frames=0, worker_deaths=0, failovers=0, poisoned=0)
        # called with (worker_id, pid, reason) when a worker is declared dead: the supervisor kills it
        self.on_dead: Callable[[str, int, str], None] | None = None

    # ------------------------------------------------------------------ state
    @property
    def ready(self) -> bool:
        return any(r.alive for r in self.replicas.values())

    def live(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.alive]

    @property
    def max_model_len(self) -> int:
        # the KV pool is a context limit too: the scheduler ends longer sequences with "length"
        lens = [r.scheduler.max_seq_len for r in self.live()]
        cap = min(lens) if lens else 0
        return min(cap, self.max_model_len_cap) if self.max_model_len_cap else cap

    def prefix_totals(self) -> dict[str, tuple[int, int]]:
        """Prompt tokens looked up and found in each worker's prefix cache, over all its lives."""
        totals = dict(self._retired_prefix)
        for r in self.live():
            q, h = totals.get(r.worker_id, (0, 0))
            totals[r.worker_id] = (q + r.scheduler.blocks.prefix_queries, h + r.scheduler.blocks.prefix_hits)
        return totals

    def num_waiting(self) -> int:
        return sum(r.scheduler.num_waiting for r in self.live()) + len(self.orphans)

    def num_active(self) -> int:
        return sum(len(r.tracks) for r in self.live()) + len(self.orphans)

    # ------------------------------------------------------------------ the wire
    async def receive_loop(self) -> None:
        while True:
            identity, frame = await self.endpoint.recv()
            try:
                msg = decode(frame, self.endpoint.max_bytes)
            except ProtocolError as exc:
                self.counters["bad_frames"] += 1
                log.warning("bad frame from %r: %s", identity[:64], exc)
                continue
            try:
                self._dispatch(identity, msg)
            except Exception:  # a bug handling one message must not stop the daemon hearing its workers
                log.exception("error handling %s from %r", type(msg).__name__, identity[:64])

    def _dispatch(self, identity: bytes, msg: object) -> None:
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(identity, msg)
        elif isinstance(msg, StepResult | Error):
            replica = self.replicas.get(identity.decode(errors="replace"))
            if replica is None or replica.identity != identity or not replica.alive:
                self.counters["stale_frames"] += 1
            elif isinstance(msg, StepResult) and msg.incarnation != replica.incarnation:
                self.counters["stale_frames"] += 1  # from an earlier life of this worker
            elif msg.step_id is not None:
                stale = replica.stale_frames
                replica.on_result(msg)
                self.counters["stale_frames"] += replica.stale_frames - stale
            else:
                log.warning("worker %s reports %s: %s", replica.worker_id, msg.code, msg.message)
        elif isinstance(msg, Hello):
            self._register(identity, msg)
        else:
            self.counters["bad_frames"] += 1  # a daemon->worker message sent to the daemon

    def _on_heartbeat(self, identity: bytes, beat: Heartbeat) -> None:
        if identity != f"{beat.worker_id}/hb".encode():
            return
        replica = self.replicas.get(beat.worker_id)
        if replica is None or not replica.alive or beat.incarnation != replica.incarnation:
            # a worker this daemon does not know (it restarted, or declared that life dead): re-register
            with contextlib.suppress(zmq.ZMQError):
                self.endpoint.send(identity, Error(code="unknown_worker", message="register again"))
            return
        replica.last_heartbeat = time.monotonic()
        with contextlib.suppress(zmq.ZMQError):
            self.endpoint.send(identity, beat)  # the echo renews the worker's lease

    def _register(self, identity: bytes, hello: Hello) -> None:
        if identity != hello.worker_id.encode():
            log.warning("Hello from %r claims id %r; ignored", identity[:64], hello.worker_id)
            return
        if hello.model != self.model_path:
            log.warning("worker %s holds %s, not %s; ignored", hello.worker_id, hello.model, self.model_path)
            with contextlib.suppress(zmq.ZMQError):
                self.endpoint.send(identity, Error(code="wrong_model", message=f"this daemon serves {self.model_path}"))
            return
        old = self.replicas.get(hello.worker_id)
        if old is not None and old.alive and old.hello.pid == hello.pid and hello.incarnation != old.incarnation:
            # A Hello the same process sent before its current Welcome reached it (queued while no daemon
            # listened): it is registered already, and re-registering would drop its work for nothing.
            return
        try:
            replica = Replica(hello, identity, self.endpoint, self.scheduler_config, next(self._incarnations),
                          self.metrics, self.deployment)
        except ValueError as exc:  # a KV pool or context length the scheduler cannot use: refuse it, keep serving
            log.warning("worker %s: unusable Hello: %s", hello.worker_id, exc)
            with contextlib.suppress(zmq.ZMQError):
                self.endpoint.send(identity, Error(code="bad_hello", message=str(exc)))
            return
        self.replicas[hello.worker_id] = replica
        if old is not None and old.alive:  # it came back (new process, or lost its lease): its old state is gone
            self._fail_replica(old, "registered again", kill=False)
        with contextlib.suppress(zmq.ZMQError):  # gone already: its heartbeats stop, and it is failed then
            self.endpoint.send(identity, Welcome(worker_id=hello.worker_id, incarnation=replica.incarnation,
                                                 epoch=self.epoch, heartbeat_interval=self.health.heartbeat_interval_s))
        replica.task = asyncio.get_running_loop().create_task(replica.run(self._on_step_error),
                                                              name=f"replica-{hello.worker_id}")
        log.info("worker %s registered as incarnation %d (pid %d on %s, %s, %d blocks of %d, max len %d)",
                 hello.worker_id, replica.incarnation, hello.pid, hello.host, hello.device, hello.num_blocks,
                 hello.block_size, hello.max_model_len)
        self.replica_added.set()
        self._place_orphans()
        # A block pool is up to millions of long-lived objects: keep full collections from walking them
        # again and again (each walk stalled every stream for ~0.1 s in a profile). Registrations are
        # rare, so collect once first, which also frees the pools of replicas that are gone.
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    # ------------------------------------------------------------------ health and failover
    async def health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health.check_interval_s)
            try:
                self.check_health(time.monotonic())
            except Exception:  # keep watching: one bad check must not end failure detection for good
                log.exception("health check failed")

    def check_health(self, now: float) -> None:
        for replica in self.live():
            silent = now - replica.last_heartbeat
            flight = replica.in_flight
            if silent > self.health.heartbeat_timeout_s:
                self._fail_replica(replica, f"no heartbeat for {silent:.1f}s")
            elif flight is not None and now - flight.started > self.health.step_timeout_s:
                self._fail_replica(replica, f"step {flight.plan.step.step_id} running for "
                                            f"{now - flight.started:.1f}s (hung)")
        self._place_orphans()
        expired = [o for o in self.orphans if now > o.deadline]
        for orphan in expired:
            self.orphans.remove(orphan)
            orphan.track.stream.fail("no replica of this model came back in time; retry later", status=503)

    def worker_exited(self, worker_id: str, how: str) -> None:
        """The supervisor saw the process end."""
        replica = self.replicas.get(worker_id)
        if replica is not None and replica.alive:
            self._fail_replica(replica, f"process {how}", kill=False)

    def _fail_replica(self, replica: Replica, reason: str, kill: bool = True) -> None:
        log.error("worker %s (incarnation %d) is dead: %s; moving its %d sequences", replica.worker_id,
                  replica.incarnation, reason, len(replica.tracks))
        self.counters["worker_deaths"] += 1
        q, h = self._retired_prefix.get(replica.worker_id, (0, 0))
        blocks = replica.scheduler.blocks
        self._retired_prefix[replica.worker_id] = (q + blocks.prefix_queries, h + blocks.prefix_hits)
        tracks = replica.fail(reason)
        self._reassign(tracks)  # first: a failing callback below must not lose these sequences
        if kill and self.on_dead is not None:
            self.on_dead(replica.worker_id, replica.hello.pid, reason)

    def _on_step_error(self, replica: Replica, plan: StepPlan, exc: BaseException) -> None:
        if isinstance(exc, zmq.ZMQError):
            # The step never reached the worker (EHOSTUNREACH: it is gone): that says nothing about these
            # sequences, so nobody is blamed (fail() blames the step in flight) and they move elsewhere.
            replica.in_flight = None
            self._fail_replica(replica, f"unreachable: {exc}")
            return
        # The worker answered but the step failed (it reset itself): recompute everything it held,
        # blaming the sequences of this step.
        log.error("worker %s: step %d failed: %s", replica.worker_id, plan.step.step_id, exc)
        for seq_id in plan.scheduled:
            if seq_id in replica.tracks:
                replica.tracks[seq_id].failures += 1
                replica.tracks[seq_id].seq.suspect = True
        replica.scheduler.requeue_all()
        for track in [t for t in replica.tracks.values() if t.failures >= POISON_FAILURES]:
            replica.abort(track.seq.seq_id)
            self._poison(track)

    def _poison(self, track: Track) -> None:
        self.counters["poisoned"] += 1
        log.error("sequence %d failed %d steps on workers; failing its request only", track.seq.seq_id,
                  track.failures)
        track.stream.fail("this request failed repeatedly on the model workers and was stopped; "
                          "the server is fine, but this input cannot be served", status=500)

    def _reassign(self, tracks: list[Track]) -> None:
        deadline = time.monotonic() + self.health.placement_timeout_s
        for track in tracks:
            if track.failures >= POISON_FAILURES:
                self._poison(track)
                continue
            self.counters["failovers"] += 1
            self.orphans.append(Orphan(track, deadline))
        self._place_orphans()

    def _place_orphans(self) -> None:
        if not self.orphans or not self.live():
            return
        waiting, self.orphans = self.orphans, []
        for orphan in waiting:
            if orphan.track.stream.finished:
                continue
            try:
                self.pick_replica(orphan.track.seq.all_token_ids).add(orphan.track)
            except ValueError as exc:  # it no longer fits anywhere live (a smaller pool): end it cleanly
                orphan.track.stream.fail(f"cannot continue this request: {exc}", status=500)

    # ------------------------------------------------------------------ requests
    def pick_replica(self, prompt: list[int]) -> Replica:
        """Least queued tokens, but a replica whose prefix cache holds this prompt's start wins unless it
        is far busier (recomputing a long prefix costs more than a short queue)."""
        live = self.live()
        if not live:
            raise LookupError("no live replica")
        least = min(live, key=lambda r: r.scheduler.queued_tokens)
        best = max(live, key=lambda r: r.scheduler.prefix_match_tokens(prompt))
        hit = best.scheduler.prefix_match_tokens(prompt)
        slack = self.scheduler_config.max_num_batched_tokens
        if hit and best.scheduler.queued_tokens - least.scheduler.queued_tokens <= max(hit, slack):
            return best
        return least

    def submit(self, stream: RequestStream, prompt: list[int], seq: Sequence, stops: list[str],
               index: int, created: float | None = None) -> Track:
        """Queue one sequence (one choice of one prompt) on the best replica, feeding `stream`."""
        replica = self.pick_replica(prompt)
        detok = IncrementalDetokenizer(self.tokenizer, prompt)
        track = Track(seq, index, stream, detok, StopMatcher(stops) if stops else None,
                      created=created if created is not None else time.monotonic())
        replica.add(track)
        return track

    def new_seq_id(self) -> int:
        return next(self._seq_ids)

    def abort(self, seq_id: int) -> None:
        """A client left: free the sequence wherever it is now (it may have moved since it was placed)."""
        for replica in self.live():
            if seq_id in replica.tracks:
                replica.abort(seq_id)
                return
        self.orphans = [o for o in self.orphans if o.track.seq.seq_id != seq_id]

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

    async def drain(self, timeout: float) -> bool:
        """Let in-flight requests finish (new ones are refused by the API); True if all did in time."""
        for replica in self.live():
            with contextlib.suppress(zmq.ZMQError):
                self.endpoint.send(replica.identity, Drain(deadline_s=timeout))
        deadline = time.monotonic() + timeout
        while self.num_active() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.num_active() == 0

    def shutdown_workers(self) -> None:
        for replica in self.replicas.values():
            replica.alive = False
            with contextlib.suppress(zmq.ZMQError):
                self.endpoint.send(replica.identity, Shutdown())

