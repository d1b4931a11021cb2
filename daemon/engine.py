"""The engine: worker registry, routing, health (heartbeats, step deadlines) and zero-loss failover.

It owns the ROUTER socket and one `Replica` per registered worker. When a worker dies, its sequences
(which keep every prompt and generated token here) move to another replica, or wait for one, and
their clients' streams simply continue. Clocks are monotonic only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from daemon.metrics import Metrics
from daemon.replica import Replica, RequestStream, Track
from daemon.routing import choose_replica
from daemon.scheduler import SchedulerConfig, Sequence, StepPlan
from daemon.tokenizer import IncrementalDetokenizer, StopMatcher, Tokenizer
from protocol.messages import (
    Drain,
    Error,
    Heartbeat,
    Hello,
    Load,
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
# a health check this much later than its interval means the daemon was not running meanwhile
STALL_FORGIVEN_S = 1.0


@dataclass(frozen=True, slots=True)
class HealthConfig:
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    step_timeout_s: float = 120.0
    placement_timeout_s: float = 30.0  # a sequence with no live replica waits this long, then fails (503)
    load_timeout_s: float = 300.0  # a worker given Load must serve (say Hello with the model) within this
    check_interval_s: float = 0.2


@dataclass(slots=True)
class Orphan:
    track: Track
    deadline: float
    deployment: str  # failover stays within the version that produced its tokens
    version: str


@dataclass(slots=True)
class Target:
    """What the replicas of one deployment version hold: the checkpoint (resolved to a folder, which is the
    name workers report in Hello), its settings, and the tokenizer that turns its requests into tokens."""

    deployment: str
    version: str
    folder: str
    tokenizer: Tokenizer
    dtype: str | None = None
    max_model_len: int | None = None
    fault: str | None = None

    def fits(self, hello: Hello) -> bool:
        """A worker that holds this checkpoint with these settings can serve it without loading."""
        return (hello.model == self.folder and (self.dtype is None or hello.dtype == self.dtype)
                and (self.max_model_len is None or hello.max_model_len <= self.max_model_len)
                and (hello.model_version or self.version) == self.version)


@dataclass(slots=True)
class Pending:
    """A replica asked for and not serving yet: waiting for a worker (PENDING), or loading on one (LOADING)."""

    replica_id: str
    target: Target
    worker_id: str | None = None
    load_sent: float = 0.0  # monotonic


@dataclass(slots=True)
class IdleWorker:
    """A registered worker holding no model: it heartbeats, and waits for `Load`."""

    identity: bytes
    hello: Hello
    incarnation: int
    last_heartbeat: float = field(default_factory=time.monotonic)

    @property
    def worker_id(self) -> str:
        return self.hello.worker_id


class Engine:
    def __init__(self, endpoint: RouterEndpoint, scheduler_config: SchedulerConfig,
                 health: HealthConfig | None = None, metrics: Metrics | None = None) -> None:
        self.endpoint = endpoint
        self.metrics = metrics
        self._retired_prefix: dict[str, tuple[int, int]] = {}  # prefix-cache counts of replicas gone
        self.scheduler_config = scheduler_config
        self.health = health or HealthConfig()
        self.targets: dict[tuple[str, str], Target] = {}  # (deployment, version) -> what its replicas hold
        self.replicas: dict[str, Replica] = {}  # worker id -> the worker, when it holds a model
        self.idle: dict[str, IdleWorker] = {}  # worker id -> a worker holding no model
        self.pending: dict[str, Pending] = {}  # replica id -> a replica not serving yet
        self.dead: list[tuple[str, str, str]] = []  # (deployment, version, replica id) died since last taken
        self.orphans: list[Orphan] = []
        self.epoch = uuid.uuid4().hex[:12]
        self._incarnations = itertools.count(1)
        self._seq_ids = itertools.count(1)
        self._replica_ids = itertools.count(1)
        self.replica_added = asyncio.Event()
        self.counters = dict(bad_frames=0, stale_frames=0, worker_deaths=0, failovers=0, poisoned=0,
                             load_failures=0, stalls_forgiven=0)
        # called with (worker_id, pid, reason) when a worker is declared dead: the supervisor kills it
        self.on_dead: Callable[[str, int, str], None] | None = None
        # called when a replica waits for a worker and none is free: the supervisor may start one
        self.on_need_worker: Callable[[], None] | None = None
        # called when workers come, go or fail to load: the control loop reacts now, not at its next round
        self.on_change: Callable[[], None] | None = None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # ------------------------------------------------------------------ state
    @property
    def ready(self) -> bool:
        """A replica serves (something)."""
        return any(r.alive and r.replica_id is not None and not r.draining for r in self.replicas.values())

    def live(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.alive]

    def serving(self, deployment: str, version: str | None = None) -> list[Replica]:
        """Replicas in rotation for the deployment (and version): alive, assigned, not draining."""
        return [r for r in self.replicas.values() if r.alive and r.replica_id is not None and not r.draining
                and r.labels[0] == deployment and (version is None or r.labels[1] == version)]

    def versions_up(self, deployment: str) -> set[str]:
        return {r.labels[1] for r in self.serving(deployment)}

    def max_model_len(self, deployment: str, version: str) -> int:
        # the KV pool is a context limit too: the scheduler ends longer sequences with "length"
        lens = [r.scheduler.max_seq_len for r in self.serving(deployment, version)]
        cap = min(lens) if lens else 0
        target = self.targets.get((deployment, version))
        return min(cap, target.max_model_len) if target is not None and target.max_model_len else cap

    def prefix_totals(self) -> dict[str, tuple[int, int]]:
        """Prompt tokens looked up and found in each worker's prefix cache, over all its lives."""
        totals = dict(self._retired_prefix)
        for r in self.live():
            q, h = totals.get(r.worker_id, (0, 0))
            totals[r.worker_id] = (q + r.scheduler.blocks.prefix_queries, h + r.scheduler.blocks.prefix_hits)
        return totals

    def num_waiting(self, deployment: str | None = None) -> int:
        mine = [r for r in self.live() if deployment is None or r.labels[0] == deployment]
        return sum(r.scheduler.num_waiting for r in mine) + sum(
            1 for o in self.orphans if deployment is None or o.deployment == deployment)

    def num_active(self) -> int:
        return sum(len(r.tracks) for r in self.live()) + len(self.orphans)

    # ------------------------------------------------------------------ the wire
    async def receive_loop(self) -> None:
        while True:
            for identity, frame in await self.endpoint.recv_batch():  # one wake-up takes all that is queued
                self._receive(identity, frame)

    def _receive(self, identity: bytes, frame: bytes) -> None:
        try:
            msg = decode(frame, self.endpoint.max_bytes)
        except ProtocolError as exc:
            self.counters["bad_frames"] += 1
            log.warning("bad frame from %r: %s", identity[:64], exc)
            return
        try:
            self._dispatch(identity, msg)
        except Exception:  # a bug handling one message must not stop the daemon hearing its workers
            log.exception("error handling %s from %r", type(msg).__name__, identity[:64])

    def _dispatch(self, identity: bytes, msg: object) -> None:
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(identity, msg)
        elif isinstance(msg, StepResult | Error):
            worker_id = identity.decode(errors="replace")
            replica = self.replicas.get(worker_id)
            if isinstance(msg, Error) and msg.code == "load_failed":
                self._load_failed(worker_id, msg.message)
            elif replica is None or replica.identity != identity or not replica.alive:
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
        known: Replica | IdleWorker | None = self.replicas.get(beat.worker_id)
        if known is None or not known.alive:  # type: ignore[union-attr]
            known = self.idle.get(beat.worker_id)
        if known is None or beat.incarnation != known.incarnation:
            # a worker this daemon does not know (it restarted, or declared that life dead): re-register
            with contextlib.suppress(zmq.ZMQError):
                self.endpoint.send(identity, Error(code="unknown_worker", message="register again"))
            return
        known.last_heartbeat = time.monotonic()
        with contextlib.suppress(zmq.ZMQError):
            self.endpoint.send(identity, beat)  # the echo renews the worker's lease

    def _register(self, identity: bytes, hello: Hello) -> None:
        if identity != hello.worker_id.encode():
            log.warning("Hello from %r claims id %r; ignored", identity[:64], hello.worker_id)
            return
        wid = hello.worker_id
        old = self.replicas.get(wid)
        old_idle = self.idle.get(wid)
        earlier = old if old is not None and old.alive else old_idle
        if earlier is not None and earlier.hello.pid == hello.pid and hello.incarnation != earlier.incarnation:
            # A Hello the same process sent before its current Welcome reached it (queued while no daemon
            # listened): it is registered already, and re-registering would drop its work for nothing.
            return
        loading = next((p for p in self.pending.values() if p.worker_id == wid), None)
        if not hello.model:
            entry = IdleWorker(identity, hello, next(self._incarnations))
            if loading is not None:  # it came back empty (restarted while loading): find it a worker again
                loading.worker_id = None
            self.idle[wid] = entry
            if old is not None and old.alive:
                self._fail_replica(old, "registered again holding no model", kill=False)
            self._welcome(identity, wid, entry.incarnation)
            log.info("worker %s registered holding no model (pid %d on %s)", wid, hello.pid, hello.host)
            self._assign_pending()
            self._changed()
            return
        try:
            replica = Replica(hello, identity, self.endpoint, self.scheduler_config, next(self._incarnations),
                              self.metrics)
        except ValueError as exc:  # a KV pool or context length the scheduler cannot use: refuse it, keep serving
            log.warning("worker %s: unusable Hello: %s", wid, exc)
            with contextlib.suppress(zmq.ZMQError):
                self.endpoint.send(identity, Error(code="bad_hello", message=str(exc)))
            return
        self.replicas[wid] = replica
        self.idle.pop(wid, None)
        if old is not None and old.alive:  # it came back (new process, lost its lease, loaded another model)
            self._fail_replica(old, "registered again", kill=False, died=loading is None)
        self._welcome(identity, wid, replica.incarnation)
        replica.task = asyncio.get_running_loop().create_task(replica.run(self._on_step_error),
                                                              name=f"replica-{wid}")
        replica.task.add_done_callback(functools.partial(self._on_loop_done, replica))
        back = None
        if old is not None and old.replica_id is not None:  # the same replica back (a lost lease, a restart)
            back = next((d for d in self.dead if d[2] == old.replica_id), None)
        target = self.targets.get(old.labels) if back is not None and old is not None else None
        if loading is not None and loading.target.fits(hello):
            self._assign(replica, loading)
        elif back is not None and target is not None and target.fits(hello):
            # Nobody acted on its death yet: it takes its place again at once, and its death goes unreported.
            self.dead.remove(back)
            self.pending[back[2]] = Pending(back[2], target)
            self._assign(replica, self.pending[back[2]])
        else:
            if loading is not None:  # it holds something else than was asked: ask again elsewhere
                loading.worker_id = None
            waiting = next((p for p in self.pending.values() if p.worker_id is None and p.target.fits(hello)), None)
            if waiting is not None:  # what a pending replica needs (a worker adopted after a daemon restart)
                self._assign(replica, waiting)
        log.info("worker %s registered as incarnation %d (pid %d on %s, %s %s, %d blocks of %d, max len %d)%s",
                 wid, replica.incarnation, hello.pid, hello.host, hello.model, hello.model_version or "",
                 hello.num_blocks, hello.block_size, hello.max_model_len,
                 f" serving {replica.labels[0]} {replica.labels[1]}" if replica.replica_id else " as a spare")
        self._assign_pending()
        self._place_orphans()
        self._changed()
        # A block pool is up to millions of long-lived objects: keep full collections from walking them
        # again and again (each walk stalled every stream for ~0.1 s in a profile). Registrations are
        # rare, so collect once first, which also frees the pools of replicas that are gone.
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    def _welcome(self, identity: bytes, worker_id: str, incarnation: int) -> None:
        with contextlib.suppress(zmq.ZMQError):  # gone already: its heartbeats stop, and it is failed then
            self.endpoint.send(identity, Welcome(worker_id=worker_id, incarnation=incarnation, epoch=self.epoch,
                                                 heartbeat_interval=self.health.heartbeat_interval_s))

    # ------------------------------------------------------------------ replicas of deployment versions
    def set_target(self, target: Target) -> None:
        self.targets[(target.deployment, target.version)] = target

    def start_replica(self, deployment: str, version: str) -> str:
        """Ask for one more replica of a version; it serves once a worker holds its model. Returns its id."""
        target = self.targets[(deployment, version)]
        replica_id = f"{deployment}/{version}#{next(self._replica_ids)}"
        self.pending[replica_id] = Pending(replica_id, target)
        self._assign_pending()
        return replica_id

    def drain_replica(self, replica_id: str) -> None:
        """Out of rotation now; its requests finish where they are."""
        for r in self.replicas.values():
            if r.replica_id == replica_id:
                r.draining = True
                log.info("replica %s (worker %s) draining %d requests", replica_id, r.worker_id, len(r.tracks))

    def stop_replica(self, replica_id: str) -> None:
        """Release the replica's worker: it stays registered as a spare (keeping its model, so a rollback or
        the next replica of the same version takes it without loading)."""
        pending = self.pending.pop(replica_id, None)
        if pending is not None:
            return  # a worker loading for it becomes a spare when it says Hello
        for r in self.replicas.values():
            if r.replica_id == replica_id:
                for track in list(r.tracks.values()):  # none when drained; never lose one anyway
                    r.abort(track.seq.seq_id)
                    self._reassign([track], r.labels)
                r.assign(None)
                log.info("replica %s stopped; worker %s is a spare", replica_id, r.worker_id)
        self._assign_pending()

    def replica_views(self, deployment: str) -> list[tuple[str, str, str]]:
        """(replica id, version, state) of a deployment: pending, loading, up, draining, drained."""
        views = [(p.replica_id, p.target.version, "pending" if p.worker_id is None else "loading")
                 for p in self.pending.values() if p.target.deployment == deployment]
        for r in self.replicas.values():
            if r.alive and r.replica_id is not None and r.labels[0] == deployment:
                state = ("drained" if r.idle else "draining") if r.draining else "up"
                views.append((r.replica_id, r.labels[1], state))
        return views

    def take_dead(self, deployment: str) -> list[tuple[str, str]]:
        """(replica id, version) of this deployment's replicas that died since the last call (reported once)."""
        mine = [(rid, version) for dep, version, rid in self.dead if dep == deployment]
        self.dead = [d for d in self.dead if d[0] != deployment]
        return mine

    def spares(self) -> list[str]:
        """Worker ids free for a new replica: idle, or holding a model no replica uses."""
        return [*self.idle, *(r.worker_id for r in self.live() if r.replica_id is None)]

    def forget(self, worker_id: str) -> None:
        """A spare worker is being retired: tell it to exit and stop tracking it (its exit is no failure)."""
        worker = self.idle.pop(worker_id, None) or self.replicas.get(worker_id)
        if worker is None:
            return
        if isinstance(worker, Replica):
            if worker.replica_id is not None or worker.tracks:
                return  # it serves: never retire a worker with work
            del self.replicas[worker_id]
            worker.alive = False
            if worker.task is not None:
                worker.task.cancel()
        self._unload(worker_id)
        with contextlib.suppress(zmq.ZMQError):
            self.endpoint.send(worker.identity, Shutdown())

    def _assign(self, replica: Replica, pending: Pending) -> None:
        del self.pending[pending.replica_id]
        replica.assign(pending.replica_id, pending.target.deployment, pending.target.version)
        log.info("replica %s is up on worker %s", pending.replica_id, replica.worker_id)
        self.replica_added.set()

    def _assign_pending(self) -> None:
        """Give each replica waiting for a worker the cheapest one: a spare already holding its model, else
        an idle worker, else a spare holding another model (both sent Load). None free: ask for one."""
        short = 0
        for pending in [p for p in self.pending.values() if p.worker_id is None]:
            target = pending.target
            spares = [r for r in self.live() if r.replica_id is None and not self._loading_on(r.worker_id)]
            holder = next((r for r in spares if target.fits(r.hello)), None)
            if holder is not None:
                self._assign(holder, pending)
                continue
            free = [w for w in self.idle.values() if not self._loading_on(w.worker_id)]
            worker: Replica | IdleWorker | None = free[0] if free else (spares[0] if spares else None)
            if worker is None:
                short += 1
                continue
            load = Load(model=target.folder, version=target.version, dtype=target.dtype,
                        max_model_len=target.max_model_len, fault=target.fault)
            try:
                self.endpoint.send(worker.identity, load)
            except zmq.ZMQError as exc:
                log.warning("cannot send Load to worker %s: %s", worker.hello.worker_id, exc)
                continue
            pending.worker_id, pending.load_sent = worker.hello.worker_id, time.monotonic()
            log.info("replica %s: worker %s loads %s", pending.replica_id, pending.worker_id, target.folder)
        if short and self.on_need_worker is not None:
            self.on_need_worker()

    def _loading_on(self, worker_id: str) -> bool:
        return any(p.worker_id == worker_id for p in self.pending.values())

    def _load_failed(self, worker_id: str, message: str) -> None:
        pending = next((p for p in self.pending.values() if p.worker_id == worker_id), None)
        if pending is None:
            self.counters["stale_frames"] += 1
            return
        self.counters["load_failures"] += 1
        log.error("replica %s: worker %s failed to load %s: %s", pending.replica_id, worker_id,
                  pending.target.folder, message)
        del self.pending[pending.replica_id]
        self.dead.append((pending.target.deployment, pending.target.version, pending.replica_id))
        self._changed()

    # ------------------------------------------------------------------ health and failover
    async def health_loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.health.check_interval_s)
            now = time.monotonic()
            stalled, last = now - last - self.health.check_interval_s, now
            try:
                if stalled > STALL_FORGIVEN_S:
                    self.forgive_stall(stalled)
                self.check_health(now)
            except Exception:  # keep watching: one bad check must not end failure detection for good
                log.exception("health check failed")

    def forgive_stall(self, stalled_s: float) -> None:
        """The daemon itself did not run for `stalled_s` (its process or host was paused: SIGSTOP, a frozen
        cgroup, a suspended VM; or its loop was blocked). Silence over that time says nothing about the
        workers, which were likely paused with it and whose beats may wait unread: every clock the health
        check compares moves on by the stall, so nothing is failed for it."""
        log.warning("the daemon did not run for %.1fs; health clocks move on by as much", stalled_s)
        self.counters["stalls_forgiven"] += 1
        for replica in self.replicas.values():
            replica.last_heartbeat += stalled_s
            for flight in replica.flights:
                flight.started += stalled_s
        for worker in self.idle.values():
            worker.last_heartbeat += stalled_s
        for pending in self.pending.values():
            pending.load_sent += stalled_s
        for orphan in self.orphans:
            orphan.deadline += stalled_s

    def check_health(self, now: float) -> None:
        for replica in self.live():
            silent = now - replica.last_heartbeat
            flight = replica.in_flight
            if silent > self.health.heartbeat_timeout_s:
                self._fail_replica(replica, f"no heartbeat for {silent:.1f}s")
            elif flight is not None and now - flight.started > self.health.step_timeout_s:
                self._fail_replica(replica, f"step {flight.plan.step.step_id} running for "
                                            f"{now - flight.started:.1f}s (hung)")
        for worker in list(self.idle.values()):
            silent = now - worker.last_heartbeat
            if silent > self.health.heartbeat_timeout_s:
                self._forget_idle(worker, f"no heartbeat for {silent:.1f}s")
        for pending in list(self.pending.values()):
            if pending.worker_id is not None and now - pending.load_sent > self.health.load_timeout_s:
                log.error("replica %s: worker %s still loading after %.0fs; giving up on it", pending.replica_id,
                          pending.worker_id, now - pending.load_sent)
                self._load_failed(pending.worker_id, "load timed out")
                worker = self.idle.get(pending.worker_id) or self.replicas.get(pending.worker_id)
                if worker is not None and self.on_dead is not None:
                    self.on_dead(worker.hello.worker_id, worker.hello.pid, "load timed out")
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
        if worker_id in self.idle:
            self._forget_idle(self.idle[worker_id], f"process {how}", kill=False)

    def _forget_idle(self, worker: IdleWorker, reason: str, kill: bool = True) -> None:
        log.error("idle worker %s is dead: %s", worker.worker_id, reason)
        del self.idle[worker.worker_id]
        self._unload(worker.worker_id)
        if kill and self.on_dead is not None:
            self.on_dead(worker.worker_id, worker.hello.pid, reason)

    def _unload(self, worker_id: str) -> None:
        """A worker is gone: a replica it was loading waits for another worker."""
        for pending in self.pending.values():
            if pending.worker_id == worker_id:
                pending.worker_id = None
        self._assign_pending()

    def _fail_replica(self, replica: Replica, reason: str, kill: bool = True, died: bool = True) -> None:
        if died:
            log.error("worker %s (incarnation %d) is dead: %s; moving its %d sequences", replica.worker_id,
                      replica.incarnation, reason, len(replica.tracks))
            self.counters["worker_deaths"] += 1
        q, h = self._retired_prefix.get(replica.worker_id, (0, 0))
        blocks = replica.scheduler.blocks
        self._retired_prefix[replica.worker_id] = (q + blocks.prefix_queries, h + blocks.prefix_hits)
        labels = replica.labels
        if replica.replica_id is not None:
            self.dead.append((*labels, replica.replica_id))
        tracks = replica.fail(reason)
        self._reassign(tracks, labels)  # first: a failing callback below must not lose these sequences
        if self.replicas.get(replica.worker_id) is replica:
            self._unload(replica.worker_id)
        if kill and self.on_dead is not None:
            self.on_dead(replica.worker_id, replica.hello.pid, reason)
        self._changed()

    def _on_loop_done(self, replica: Replica, task: asyncio.Task) -> None:
        """A replica loop that raised (a bug in the daemon) must not strand the requests it holds: say so, then
        fail the replica as if its worker died, which moves every sequence elsewhere (or fails it with a clear
        error) and restarts a local worker."""
        if task.cancelled() or task.exception() is None or not replica.alive:
            return
        exc = task.exception()
        log.error("replica loop of worker %s crashed", replica.worker_id, exc_info=exc)
        # the steps in flight keep their blame: a request that crashes the loop every time fails alone
        self._fail_replica(replica, f"replica loop crashed: {type(exc).__name__}: {exc}")

    def _on_step_error(self, replica: Replica, plan: StepPlan, exc: BaseException) -> None:
        if isinstance(exc, zmq.ZMQError):
            # The step never reached the worker (EHOSTUNREACH: it is gone): that says nothing about these
            # sequences, so nobody is blamed (fail() blames the steps in flight) and they move elsewhere.
            replica.forget_flights()
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

    def _reassign(self, tracks: list[Track], labels: tuple[str, str]) -> None:
        deadline = time.monotonic() + self.health.placement_timeout_s
        for track in tracks:
            if track.failures >= POISON_FAILURES:
                self._poison(track)
                continue
            self.counters["failovers"] += 1
            self.orphans.append(Orphan(track, deadline, *labels))
        self._place_orphans()

    def _place_orphans(self) -> None:
        if not self.orphans:
            return
        waiting, self.orphans = self.orphans, []
        for orphan in waiting:
            if orphan.track.stream.finished:
                continue
            # any live replica of its version, draining ones included: they still compute
            candidates = [r for r in self.live() if r.replica_id is not None and r.labels == (orphan.deployment,
                                                                                           orphan.version)]
            if not candidates:
                self.orphans.append(orphan)
                continue
            try:
                self.pick_replica(candidates, orphan.track.seq.all_token_ids).add(orphan.track)
            except ValueError as exc:  # it no longer fits anywhere live (a smaller pool): end it cleanly
                orphan.track.stream.fail(f"cannot continue this request: {exc}", status=500)

    # ------------------------------------------------------------------ requests
    def pick_replica(self, candidates: list[Replica], prompt: list[int]) -> Replica:
        """Least queued tokens, but a replica whose prefix cache holds this prompt's start wins unless it
        is far busier (recomputing a long prefix costs more than a short queue)."""
        return choose_replica(candidates, prompt, self.scheduler_config.max_num_batched_tokens)

    def submit(self, stream: RequestStream, deployment: str, version: str, prompt: list[int], seq: Sequence,
               stops: list[str], index: int, created: float | None = None) -> Track:
        """Queue one sequence (one choice of one prompt) on the best replica of the version, feeding `stream`."""
        detok = IncrementalDetokenizer(self.targets[(deployment, version)].tokenizer, prompt)
        track = Track(seq, index, stream, detok, StopMatcher(stops) if stops else None,
                      created=created if created is not None else time.monotonic())
        track.version = version
        # The version was routed to while a replica served it; if that replica began draining (or died)
        # since, a draining one still computes, and with none alive the request waits like a failover.
        candidates = self.serving(deployment, version) or [
            r for r in self.live() if r.replica_id is not None and r.labels == (deployment, version)]
        if candidates:
            self.pick_replica(candidates, prompt).add(track)
        else:
            self.orphans.append(Orphan(track, time.monotonic() + self.health.placement_timeout_s, deployment,
                                       version))
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

    async def wait_ready(self, timeout: float, deployment: str | None = None) -> bool:
        """Wait until a replica serves (of `deployment`, or of anything); False at the timeout."""
        deadline = time.monotonic() + timeout
        while not (self.versions_up(deployment) if deployment is not None else self.ready):
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
        for worker in self.idle.values():
            with contextlib.suppress(zmq.ZMQError):
                self.endpoint.send(worker.identity, Shutdown())

