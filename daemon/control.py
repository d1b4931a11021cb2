"""The deployments control plane: desired state (specs and rollouts) against what the engine runs.

Once a second it builds each deployment's Observation from the engine, lets the deployment's rollout and
`reconcile` decide (daemon/rollouts.py, pure), executes the replica actions on the engine, logs and
persists decisions, and saves changed state to SQLite. It also routes each request to a version and
serves the admin API's operations. Model names are resolved (and pulled) off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from daemon.deployments import (
    Action,
    DeploymentError,
    DeploymentSpec,
    DrainReplica,
    Log,
    Observation,
    ReplicaState,
    ReplicaView,
    StartReplica,
    StopReplica,
    VersionSpec,
    check_servable,
    check_spec_update,
    reconcile,
)
from daemon.engine import Engine, Target
from daemon.rollouts import Deployment, RolloutError, begin_rollout
from daemon.routing import StatsWindow, choose_version
from daemon.store import Store, merge_config
from daemon.tokenizer import Tokenizer

log = logging.getLogger("nimbus.control")
decision_log = logging.getLogger("nimbus.rollout")


class UnknownDeployment(LookupError):
    """No deployment of that name (the admin API's 404)."""


class Control:
    """Deployments, their rollouts and routing; one per daemon, driven by `run` (or `tick` in tests)."""

    def __init__(self, engine: Engine, store: Store | None, resolve: Callable[[str], Path],
                 clock: Callable[[], float] = time.time, stats_horizon_s: float = 3600.0) -> None:
        self.engine = engine
        self.store = store
        self.resolve = resolve  # model name or folder -> checkpoint folder (may pull: slow, runs on a thread)
        self.clock = clock  # wall clock: rollout timers survive a restart
        self.deployments: dict[str, Deployment] = {}
        self.retiring: dict[str, DeploymentSpec] = {}  # deleted: replicas drain, then they are forgotten
        self.stats: dict[str, StatsWindow] = {}
        self.stats_horizon_s = stats_horizon_s
        self.rng = random.Random()
        self._tokenizers: dict[str, Tokenizer] = {}  # folder -> tokenizer, shared by versions of one checkpoint
        # The deployment made from [model] when none is configured grows with the workers operators attach
        # (remote workers that hold no model, or hold its model): `elastic` names it, `is_remote` tells
        # attached workers from the daemon's own (whose number workers.count fixes).
        self.elastic: str | None = None
        self.elastic_base = 0
        self.is_remote: Callable[[str], bool] = lambda worker_id: True
        self._lock = asyncio.Lock()  # admin operations await (resolving models): one at a time

    # ------------------------------------------------------------------ set-up
    async def start(self, configured: tuple[DeploymentSpec, ...]) -> None:
        """Configured deployments merged with the database's (which wins), every version made servable."""
        stored = self.store.load() if self.store is not None else {}
        merged, differs = merge_config(configured, stored)
        for name in differs:
            log.warning("deployment %s: the state database differs from the config file and wins (it holds "
                        "run-time changes); change a running deployment through /admin/deployments", name)
        for dep in merged.values():
            for version in dep.spec.versions:
                try:
                    await self._prepare(dep.spec.name, version)
                except DeploymentError as exc:  # its replicas report dead; the rest of the deployment serves
                    log.error("deployment %s: %s", dep.spec.name, exc)
            self.deployments[dep.spec.name] = dep
            self.stats[dep.spec.name] = StatsWindow(self.stats_horizon_s)

    async def _prepare(self, deployment: str, version: VersionSpec) -> Target:
        """Resolve the version's checkpoint and tokenizer and tell the engine what its replicas hold."""
        try:
            folder = str(await asyncio.to_thread(self.resolve, version.model))
            tokenizer = self._tokenizers.get(folder)
            if tokenizer is None:
                tokenizer = await asyncio.to_thread(Tokenizer.from_folder, Path(folder))
        except Exception as exc:  # a missing folder, an unknown name, a failed pull, a broken tokenizer
            raise DeploymentError(f"version {version.version}: cannot use model {version.model!r}: {exc}") from None
        self._tokenizers[folder] = tokenizer
        target = Target(deployment, version.version, folder, tokenizer, version.dtype, version.max_model_len,
                        version.fault)
        self.engine.set_target(target)
        return target

    # ------------------------------------------------------------------ the control loop
    async def run(self, interval_s: float = 1.0) -> None:
        """A round every `interval_s`, and one as soon as the engine reports a change (a worker came, went
        or failed to load), so replicas are replaced and workers put to use without waiting for the timer."""
        changed = asyncio.Event()
        self.engine.on_change = changed.set
        while True:
            try:
                self.tick()
            except Exception:  # keep controlling: one bad round must not end rollouts for good
                log.exception("control round failed")
            changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):  # (wait_for here could swallow a cancel on 3.11)
                    await changed.wait()

    def tick(self) -> None:
        now = self.clock()
        self._size_elastic()
        for dep in list(self.deployments.values()):
            if (dep.rollout is None or not dep.rollout.active) and self.stats[dep.spec.name].size:
                self.stats[dep.spec.name] = StatsWindow(self.stats_horizon_s)  # judged: free the samples
            before = (dep.spec, self._rollout_state(dep))
            actions = dep.tick(now, self.observe(dep))
            self._execute(dep, actions, changed=(dep.spec, self._rollout_state(dep)) != before)
        for name, spec in list(self.retiring.items()):
            views = self._views(name)
            if not views:
                del self.retiring[name]
                log.info("deployment %s is gone", name)
                continue
            self._execute(None, reconcile(spec, views), changed=False)

    def _size_elastic(self) -> None:
        """The elastic deployment's one serving version has `elastic_base` replicas (the daemon's own workers)
        plus one per attached worker registered now, so attaching a worker adds a replica and losing one
        removes it (not persisted: it follows the workers present, not an operator's decision)."""
        dep = self.deployments.get(self.elastic or "")
        if dep is None or (dep.rollout is not None and dep.rollout.active):
            return
        serving = [v for v in dep.spec.versions if v.weight > 0]
        if len(serving) != 1:
            return
        attached = sum(1 for w in [*self.engine.idle, *(r.worker_id for r in self.engine.live())] if self.is_remote(w))
        version, wanted = serving[0], self.elastic_base + attached
        if version.replicas != wanted:
            dep.spec = replace(dep.spec, versions=tuple(
                replace(v, replicas=wanted) if v is version else v for v in dep.spec.versions))
            log.info("deployment %s: version %s has %d replicas (%d attached workers)", dep.spec.name,
                     version.version, wanted, attached)

    @staticmethod
    def _rollout_state(dep: Deployment) -> dict[str, Any] | None:
        return dep.rollout.to_dict() if dep.rollout is not None else None

    def _views(self, name: str) -> list[ReplicaView]:
        views = [ReplicaView(rid, version, ReplicaState(state)) for rid, version, state in
                 self.engine.replica_views(name)]
        return views + [ReplicaView(rid, version, ReplicaState.DEAD) for rid, version in self.engine.take_dead(name)]

    def observe(self, dep: Deployment) -> Observation:
        name = dep.spec.name
        stats = {}
        rollout = dep.rollout
        if rollout is not None and rollout.active and (since := rollout.window_start) is not None:
            window = self.stats[name]
            stats = {v: window.stats(v, since) for v in dep.spec.weights()}
        return Observation(tuple(self._views(name)), stats)

    def _execute(self, dep: Deployment | None, actions: list[Action], changed: bool) -> None:
        decisions: list[Log] = []
        for action in actions:
            if isinstance(action, StartReplica):
                if (action.deployment, action.version) in self.engine.targets:
                    self.engine.start_replica(action.deployment, action.version)
                else:  # its checkpoint could not be resolved: the replica is dead at once (rollouts react)
                    self.engine.dead.append((action.deployment, action.version, f"unresolved-{uuid.uuid4().hex[:8]}"))
            elif isinstance(action, DrainReplica):
                self.engine.drain_replica(action.replica_id)
            elif isinstance(action, StopReplica):
                self.engine.stop_replica(action.replica_id)
            elif isinstance(action, Log):
                decisions.append(action)
                decision_log.info("%s: %s", action.deployment, action.decision,
                                  extra={"fields": {"deployment": action.deployment, "decision": action.decision,
                                                    "numbers": dict(action.numbers)}})
        if dep is not None and (changed or decisions):
            self._save(dep, decisions)

    def _save(self, dep: Deployment, decisions: list[Log] = ()) -> None:
        if self.store is None:
            return
        try:
            self.store.save(dep, decisions, now=self.clock())
        except Exception:  # the disk is full or gone: keep serving, say so loudly
            log.exception("cannot save deployment %s to %s", dep.spec.name, self.store.path)

    # ------------------------------------------------------------------ requests
    def route(self, model: str, key: str | None) -> str | None:
        """The version of `model` this request goes to (None: no replica of it is up yet).
        UnknownDeployment if no deployment has that name."""
        dep = self.deployments.get(model)
        if dep is None:
            raise UnknownDeployment(model)
        up = self.engine.versions_up(model)
        weights = {v: w for v, w in dep.spec.weights().items() if v in up and w > 0}
        if not weights:  # only versions without traffic weight are up: serving beats failing
            weights = {v: 1.0 for v in dep.spec.weights() if v in up}
        return choose_version(weights, key, self.rng) if weights else None

    def record(self, deployment: str, version: str, ok: bool, ttft_s: float | None, itl_s: list[float]) -> None:
        """One finished request, for canary judgement: kept only while a rollout that judges by them runs
        (so the daemon's memory does not grow with requests otherwise)."""
        dep = self.deployments.get(deployment)
        if dep is None or dep.rollout is None or not dep.rollout.active or dep.rollout.window_start is None:
            return
        self.stats[deployment].record(version, self.clock(), ok, ttft_s, itl_s)

    @property
    def ready(self) -> bool:
        """Every deployment has a replica up."""
        return bool(self.deployments) and all(self.engine.versions_up(n) for n in self.deployments)

    # ------------------------------------------------------------------ admin
    def _get(self, name: str) -> Deployment:
        dep = self.deployments.get(name)
        if dep is None:
            raise UnknownDeployment(name)
        return dep

    async def create(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        async with self._lock:
            spec = DeploymentSpec.from_dict(raw)
            check_servable(spec)
            if spec.name in self.deployments or spec.name in self.retiring:
                raise RolloutError(f"deployment {spec.name} exists" +
                                   (" (still draining after a delete)" if spec.name in self.retiring else ""))
            for version in spec.versions:
                await self._prepare(spec.name, version)
            dep = Deployment(spec)
            self.deployments[spec.name] = dep
            self.stats[spec.name] = StatsWindow(self.stats_horizon_s)
            self._save(dep, [Log("created", {"spec": spec.to_dict()}, spec.name, self.clock())])
            log.info("deployment %s created with versions %s", spec.name, ", ".join(spec.weights()))
            return self.view(spec.name)

    async def update(self, name: str, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Weights, replica counts and min_replicas of a deployment; new versions may be added."""
        async with self._lock:
            dep = self._get(name)
            spec = DeploymentSpec.from_dict({"name": name, **raw})
            check_spec_update(dep.spec, spec)
            if dep.rollout is not None and dep.rollout.active:
                raise RolloutError(f"deployment {name} has rollout {dep.rollout.id} running; pause or abort it first"
                                   if dep.rollout.state != "paused" else
                                   f"deployment {name} has a paused rollout {dep.rollout.id}; abort it first")
            for version in spec.versions:
                if (name, version.version) not in self.engine.targets:
                    await self._prepare(name, version)
            old, dep.spec = dep.spec, spec
            self._save(dep, [Log("updated", {"before": old.to_dict(), "after": spec.to_dict()}, name, self.clock())])
            return self.view(name)

    async def delete(self, name: str) -> None:
        async with self._lock:
            dep = self._get(name)
            del self.deployments[name]
            self.retiring[name] = replace(dep.spec, versions=tuple(replace(v, replicas=0) for v in dep.spec.versions))
            if self.store is not None:
                self.store.delete(name)
            log.info("deployment %s deleted; its replicas drain", name)

    async def start_rollout(self, name: str, raw: Mapping[str, Any]) -> dict[str, Any]:
        async with self._lock:
            dep = self._get(name)
            if not isinstance(raw, Mapping):
                raise DeploymentError("the body must be a JSON object")
            unknown = sorted(set(raw) - {"kind", "version", "policy", "from_version"})
            if unknown:
                raise DeploymentError(f"unknown field(s) {', '.join(unknown)} (known: kind, version, policy, "
                                      "from_version)")
            if not isinstance(raw.get("version"), Mapping):
                raise DeploymentError("version must be an object: {version, model, replicas, ...}")
            version = VersionSpec.from_dict(raw["version"])
            policy = raw.get("policy")
            if policy is not None and not isinstance(policy, Mapping):
                raise DeploymentError("policy must be an object")
            from_version = raw.get("from_version")
            if from_version is not None and not isinstance(from_version, str):
                raise DeploymentError("from_version must be a string")
            if dep.rollout is not None and dep.rollout.active:  # before the slow part: fail fast
                raise RolloutError(f"deployment {name} already has rollout {dep.rollout.id} ({dep.rollout.state})")
            await self._prepare(name, version)
            rollout = begin_rollout(dep, str(raw.get("kind", "")), version, self.clock(),
                                    uuid.uuid4().hex[:12], policy, from_version)
            self._save(dep)
            log.info("deployment %s: %s rollout %s to version %s started", name, rollout.kind, rollout.id,
                     version.version)
            return self.view(name)

    def command(self, name: str, verb: str) -> dict[str, Any]:
        dep = self._get(name)
        actions = dep.command(verb, self.clock())
        self._execute(dep, actions, changed=True)
        return self.view(name)

    def view(self, name: str) -> dict[str, Any]:
        """One deployment for /admin/deployments: versions, replicas and their states, rollout, decisions."""
        dep = self._get(name)
        now = self.clock()
        views = self.engine.replica_views(name)
        workers = {r.replica_id: r for r in self.engine.replicas.values() if r.replica_id is not None}
        replicas = []
        for rid, version, state in views:
            r = workers.get(rid)
            pending = self.engine.pending.get(rid)
            replicas.append({"id": rid, "version": version, "state": state,
                             "worker": r.worker_id if r else (pending.worker_id if pending else None),
                             "running": len(r.tracks) if r else 0})
        versions = []
        for v in dep.spec.versions:
            target = self.engine.targets.get((name, v.version))
            versions.append({**v.to_dict(), "folder": target.folder if target else None,
                             "replicas_up": sum(1 for _, ver, st in views if ver == v.version and st == "up")})
        rollout = None
        if dep.rollout is not None:
            rollout = dep.rollout.progress(now)
            rollout["created_at"] = dep.rollout.created_at
        decisions = self.store.decisions(name, 20) if self.store is not None else []
        return {"name": name, "min_replicas": dep.spec.min_replicas, "versions": versions, "replicas": replicas,
                "rollout": rollout, "decisions": decisions, "ready": bool(self.engine.versions_up(name))}

    def list(self) -> list[dict[str, Any]]:
        return [self.view(name) for name in self.deployments]
