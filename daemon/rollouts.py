"""Rollout state machines, pure: rolling update and canary. `step(now, observation) -> actions`; they edit
only desired state (weights, replica counts) and `reconcile` turns that into replica actions.

`now` is wall-clock seconds (time.time()): a rollout's timers must survive a daemon restart.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

from daemon.deployments import (
    LIVE_STATES,
    Action,
    CanaryPolicy,
    DeploymentSpec,
    Log,
    Observation,
    RemoveVersion,
    ReplicaState,
    RollingPolicy,
    SetReplicas,
    SetWeight,
    Verdict,
    VersionSpec,
    VersionStats,
    apply_actions,
    judge,
    parse_policy,
    reconcile,
)


class RolloutError(ValueError):
    """A rollout cannot start, or a verb does not apply in its current state (the admin API's 409)."""


class RolloutState(enum.StrEnum):
    PENDING = "pending"  # created and saved, not stepped yet
    RUNNING = "running"
    PAUSED = "paused"  # holds desired state; a canary still rolls back on a breach
    ROLLING_BACK = "rolling_back"  # an aborted rolling update, running in reverse with the same capacity rule
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"  # a canary breached its SLO
    ABORTED = "aborted"


TERMINAL = frozenset({RolloutState.SUCCEEDED, RolloutState.ROLLED_BACK, RolloutState.ABORTED})


# each holds a worker; DRAINED ones do not count: this very tick's reconcile releases them
_OCCUPYING = (*LIVE_STATES, ReplicaState.DRAINING)


@dataclass(slots=True, kw_only=True)
class Rollout:
    """What both machines share: identity, the two versions, state, verbs, serialisation."""

    kind: ClassVar[str] = ""
    id: str
    deployment: str
    from_version: str  # the version being replaced (the canary's stable)
    to_version: str
    target: int  # replicas of to_version at the end
    base_weight: float  # from_version's weight at the start; to_version ends with it
    created_at: float
    state: RolloutState = RolloutState.PENDING
    paused_from: RolloutState | None = None
    updated_at: float = 0.0
    last_decision: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.state not in TERMINAL

    @property
    def window_start(self) -> float | None:
        """Start of the window the engine's VersionStats must cover; None: no stats wanted."""
        return None

    def step(self, now: float, obs: Observation) -> list[Action]:
        raise NotImplementedError

    def pause(self, now: float) -> list[Action]:
        self._require(RolloutState.PENDING, RolloutState.RUNNING, RolloutState.ROLLING_BACK, verb="pause")
        self.paused_from, self.state = self.state, RolloutState.PAUSED
        return [self._log(now, "paused by operator")]

    def resume(self, now: float) -> list[Action]:
        self._require(RolloutState.PAUSED, verb="resume")
        self.state, self.paused_from = self.paused_from or RolloutState.RUNNING, None
        return [self._log(now, "resumed by operator")]

    def abort(self, now: float) -> list[Action]:
        raise NotImplementedError

    def promote(self, now: float) -> list[Action]:
        raise RolloutError(f"a {self.kind} cannot be promoted; it completes by itself")

    def progress(self, now: float) -> dict[str, Any]:
        """For /admin/deployments."""
        return {"id": self.id, "kind": self.kind, "state": str(self.state), "from_version": self.from_version,
                "to_version": self.to_version, "target_replicas": self.target, "last_decision": self.last_decision}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    def _require(self, *states: RolloutState, verb: str) -> None:
        if self.state not in states:
            raise RolloutError(f"cannot {verb} a rollout that is {self.state}")

    def _log(self, now: float, decision: str, **numbers: Any) -> Log:
        self.updated_at = now
        self.last_decision = {"at": now, "decision": decision, "numbers": numbers}
        return Log(decision, numbers, self.deployment, now)

    def _start(self, now: float) -> list[Action]:
        if self.state is not RolloutState.PENDING:
            return []
        self.state = RolloutState.RUNNING
        return [self._log(now, f"{self.kind} {self.from_version} -> {self.to_version} started",
                          target=self.target, base_weight=self.base_weight)]


@dataclass(slots=True, kw_only=True)
class RollingUpdate(Rollout):
    """Replace from_version by to_version a replica at a time: start one (within max_surge), wait until it
    is up, shift weight to it, drain an old one. Invariant: its own drains never take healthy replicas of
    the two versions below `floor` (a death may; the dead one is replaced before anything else drains)."""

    kind: ClassVar[str] = "rolling"
    from_replicas: int
    floor: int
    policy: RollingPolicy = field(default_factory=RollingPolicy)
    desired: dict[str, int] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    dead: list[str] = field(default_factory=list)  # replicas of the version being brought up, seen dead
    dead_forgiven: int = 0  # deaths an operator has seen (by resuming) and no longer count

    def step(self, now: float, obs: Observation) -> list[Action]:
        actions = self._start(now)
        if self.state not in (RolloutState.RUNNING, RolloutState.ROLLING_BACK):
            return actions
        actions += self._note_deaths(now, obs)
        if self.state is RolloutState.PAUSED:
            return actions
        src, dst, dst_target = self._roles()
        up_src, up_dst = obs.count(src, ReplicaState.UP), obs.count(dst, ReplicaState.UP)
        new_dst = min(dst_target, self.desired[dst] + self._room(obs, src, dst))
        # src may shrink only to what keeps `floor` healthy, counting dst replicas that are up *now*
        new_src = min(self.desired[src], max(0, min(self.floor, dst_target) - up_dst))
        changes = self._set_counts(src, new_src, dst, new_dst) + self._set_weights(src, min(up_src, new_src), dst, up_dst)
        if up_dst >= dst_target and new_src == 0:
            return actions + changes + self._finish(now, src, dst, dst_target)
        if changes:
            changes.append(self._log(now, f"shift: {dst} {up_dst}/{dst_target} up, {src} down to {new_src}",
                                     up={src: up_src, dst: up_dst}, desired=dict(self.desired),
                                     weights=dict(self.weights), floor=self.floor))
        return actions + changes

    def _note_deaths(self, now: float, obs: Observation) -> list[Action]:
        """Replicas of the version being brought up that died; too many pause the walk for an operator
        (a checkpoint that cannot load would otherwise crash-loop workers forever)."""
        dst = self._roles()[1]
        died = [r.replica_id for r in obs.replicas
                if r.version == dst and r.state is ReplicaState.DEAD and r.replica_id not in self.dead]
        if not died:
            return []
        self.dead += died  # every change to the machine comes with an action: "no actions" = "nothing to save"
        out: list[Action] = [self._log(now, f"{dst} replica(s) died: {', '.join(died)}", dead=list(self.dead))]
        if len(self.dead) - self.dead_forgiven > self.policy.max_new_failures:
            self.paused_from, self.state = self.state, RolloutState.PAUSED
            out.append(self._log(now, f"paused: {len(self.dead)} {dst} replicas died", dead=list(self.dead),
                                 max_new_failures=self.policy.max_new_failures))
        return out

    def resume(self, now: float) -> list[Action]:
        self.dead_forgiven = len(self.dead)  # the operator resumed knowing about these
        return Rollout.resume(self, now)

    def abort(self, now: float) -> list[Action]:
        self._require(RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED, verb="abort")
        if self.paused_from is RolloutState.ROLLING_BACK:
            raise RolloutError("this rollout is already rolling back")
        self.state, self.paused_from = RolloutState.ROLLING_BACK, None
        return [self._log(now, f"aborted by operator: rolling back to {self.from_version}")]

    def progress(self, now: float) -> dict[str, Any]:
        return {**Rollout.progress(self, now), "desired": dict(self.desired), "weights": dict(self.weights),
                "floor": self.floor, "dead_replicas": len(self.dead)}

    def _roles(self) -> tuple[str, str, int]:
        # rolling back is the same walk in reverse, under the same capacity rule
        rolling_back = self.state is RolloutState.ROLLING_BACK
        if rolling_back:
            return self.to_version, self.from_version, self.from_replicas
        return self.from_version, self.to_version, self.target

    def _room(self, obs: Observation, src: str, dst: str) -> int:
        limit = max(self.from_replicas, self.target) + self.policy.max_surge
        # a start the engine has not shown yet still takes a slot: count the larger of seen and desired
        occupied = obs.count(src, *_OCCUPYING) + max(obs.count(dst, *_OCCUPYING), self.desired[dst])
        return max(0, limit - occupied)

    def _set_counts(self, src: str, new_src: int, dst: str, new_dst: int) -> list[Action]:
        out: list[Action] = []
        for version, count in ((dst, new_dst), (src, new_src)):
            if self.desired[version] != count:
                self.desired[version] = count
                out.append(SetReplicas(version, count))
        return out

    def _set_weights(self, src: str, rot_src: int, dst: str, rot_dst: int) -> list[Action]:
        if rot_src + rot_dst == 0:
            return []  # nothing serves: keep the weights rather than invent a split
        share = {dst: self.base_weight * rot_dst / (rot_src + rot_dst)}
        share[src] = self.base_weight - share[dst]
        changed: list[Action] = [SetWeight(v, w) for v, w in share.items() if self.weights.get(v) != w]
        self.weights.update(share)
        return changed

    def _finish(self, now: float, src: str, dst: str, dst_target: int) -> list[Action]:
        self.state = RolloutState.SUCCEEDED if dst == self.to_version else RolloutState.ABORTED
        return [SetWeight(dst, self.base_weight), SetReplicas(dst, dst_target), RemoveVersion(src),
                self._log(now, f"{self.state}: {dst} serves with {dst_target} replicas", desired=dict(self.desired))]


@dataclass(slots=True, kw_only=True)
class Canary(Rollout):
    """Step the canary's share of traffic through policy.steps, each for dwell_s, while its SLO holds.
    The stable version keeps all its replicas until the end, so a rollback is instant."""

    kind: ClassVar[str] = "canary"
    policy: CanaryPolicy = field(default_factory=CanaryPolicy)
    step_index: int = 0  # the step being worked toward
    weight_index: int = -1  # the step whose weight is applied (-1: none yet)
    step_started: float | None = None  # when weight_index's weight was applied
    held: bool = False  # a hold was logged for this step
    promoting: bool = False
    desired: int = 0

    @property
    def window_start(self) -> float | None:
        return self.step_started

    def step(self, now: float, obs: Observation) -> list[Action]:
        actions = self._start(now)
        if self.state not in (RolloutState.RUNNING, RolloutState.PAUSED):
            return actions
        if self.promoting:  # the operator has judged: no SLO checks, just scale up and finish
            return actions if self.state is RolloutState.PAUSED else actions + self._promote_step(now, obs)
        verdict = None
        if self.step_started is not None:
            verdict = judge(self.policy.slo, obs.stats.get(self.to_version, VersionStats()),
                            obs.stats.get(self.from_version), self.policy.min_requests)
            if verdict.outcome == "breach":  # even while paused: safety does not wait for an operator
                return actions + self._back(now, RolloutState.ROLLED_BACK, "rollback: SLO breached",
                                            breaches=list(verdict.breaches), **verdict.numbers)
        if self.state is RolloutState.PAUSED:
            return actions
        return actions + self._advance(now, obs, verdict)

    def abort(self, now: float) -> list[Action]:
        self._require(RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED, verb="abort")
        return self._back(now, RolloutState.ABORTED, "aborted by operator")

    def promote(self, now: float) -> list[Action]:
        self._require(RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED, verb="promote")
        self.state, self.paused_from, self.promoting = RolloutState.RUNNING, None, True
        return [self._log(now, f"promote by operator: scaling {self.to_version} to {self.target} replicas")]

    def progress(self, now: float) -> dict[str, Any]:
        steps = self.policy.steps
        left = None
        if self.step_started is not None and self.weight_index == self.step_index:
            left = max(0.0, self.policy.dwell_s - (now - self.step_started))
        return {**Rollout.progress(self, now), "step": self.step_index + 1, "steps": list(steps),
                "weight_percent": steps[self.weight_index] if self.weight_index >= 0 else 0.0,
                "dwell_left_s": left, "promoting": self.promoting, "canary_replicas": self.desired}

    def _replicas_for(self, index: int) -> int:
        return max(1, math.ceil(self.policy.steps[index] * self.target / 100 - 1e-9))

    def _scale(self, count: int) -> list[Action]:
        if self.desired >= count:
            return []
        self.desired = count
        return [SetReplicas(self.to_version, count)]

    def _advance(self, now: float, obs: Observation, verdict: Verdict | None) -> list[Action]:
        need = self._replicas_for(self.step_index)
        actions = self._scale(need)
        if self.weight_index < self.step_index:  # scaling: shift weight once the replicas are up
            if obs.count(self.to_version, ReplicaState.UP) >= need:
                actions += self._apply_step(now)
            return actions
        if verdict is None or self.step_started is None or now - self.step_started < self.policy.dwell_s:
            return actions
        if verdict.outcome == "insufficient":
            if not self.held:
                self.held = True
                actions.append(self._log(now, "hold: too few requests to judge", **verdict.numbers))
            return actions
        if self.step_index == len(self.policy.steps) - 1:
            return actions + self._succeed(now, "succeeded: SLO held at every step", **verdict.numbers)
        self.step_index += 1
        actions.append(self._log(now, f"advance to {self.policy.steps[self.step_index]:g}%", **verdict.numbers))
        return actions + self._advance(now, obs, verdict)

    def _apply_step(self, now: float) -> list[Action]:
        self.weight_index, self.step_started, self.held = self.step_index, now, False
        percent = self.policy.steps[self.step_index]
        canary = self.base_weight * percent / 100
        return [SetWeight(self.to_version, canary), SetWeight(self.from_version, self.base_weight - canary),
                self._log(now, f"weight {percent:g}%", canary_weight=canary, replicas=self.desired)]

    def _promote_step(self, now: float, obs: Observation) -> list[Action]:
        actions = self._scale(self.target)
        if obs.count(self.to_version, ReplicaState.UP) >= self.target:
            actions += self._succeed(now, "succeeded: promoted by operator")
        return actions

    def _succeed(self, now: float, decision: str, **numbers: Any) -> list[Action]:
        self.state, self.step_started = RolloutState.SUCCEEDED, None
        return [SetWeight(self.to_version, self.base_weight), SetReplicas(self.to_version, self.target),
                RemoveVersion(self.from_version), self._log(now, decision, **numbers)]

    def _back(self, now: float, state: RolloutState, decision: str, **numbers: Any) -> list[Action]:
        self.state, self.paused_from, self.step_started = state, None, None
        return [SetWeight(self.from_version, self.base_weight), SetWeight(self.to_version, 0.0),
                SetReplicas(self.to_version, 0), RemoveVersion(self.to_version), self._log(now, decision, **numbers)]


KINDS: dict[str, type[Rollout]] = {RollingUpdate.kind: RollingUpdate, Canary.kind: Canary}


def rollout_from_dict(raw: Mapping[str, Any]) -> Rollout:
    """Inverse of `Rollout.to_dict` (what the store keeps)."""
    values = dict(raw)
    cls = KINDS[values.pop("kind")]
    values["state"] = RolloutState(values["state"])
    if values.get("paused_from") is not None:
        values["paused_from"] = RolloutState(values["paused_from"])
    values["policy"] = parse_policy(RollingPolicy if cls is RollingUpdate else CanaryPolicy, values["policy"])
    return cls(**values)


@dataclass(slots=True)
class Deployment:
    """One deployment's desired state and its rollout (the active one, or the last to finish, for /admin)."""

    spec: DeploymentSpec
    rollout: Rollout | None = None

    def tick(self, now: float, obs: Observation) -> list[Action]:
        """One control round: the active rollout edits the spec, then replicas are reconciled to it.
        The engine executes the replica actions, logs and persists the Log ones, and saves when the spec
        or the rollout changed."""
        actions = self.rollout.step(now, obs) if self.rollout is not None and self.rollout.active else []
        self.spec = apply_actions(self.spec, actions)
        return [*actions, *reconcile(self.spec, obs.replicas)]

    def command(self, verb: str, now: float) -> list[Action]:
        """pause, resume, abort or promote the rollout (RolloutError when it does not apply)."""
        if self.rollout is None:
            raise RolloutError(f"deployment {self.spec.name} has no rollout")
        verbs = {"pause": self.rollout.pause, "resume": self.rollout.resume,
                 "abort": self.rollout.abort, "promote": self.rollout.promote}
        if verb not in verbs:
            raise RolloutError(f"unknown rollout command {verb!r} (known: {', '.join(verbs)})")
        actions = verbs[verb](now)
        self.spec = apply_actions(self.spec, actions)
        return actions


def begin_rollout(dep: Deployment, kind: str, version: VersionSpec, now: float, rollout_id: str,
                  policy: Mapping[str, Any] | None = None, from_version: str | None = None) -> Rollout:
    """Add `version` to the deployment (no replicas, no weight yet) and attach a new rollout toward it.
    `version.replicas` is its replica count at the end; its weight is ignored (it inherits the source's)."""
    if dep.rollout is not None and dep.rollout.active:
        raise RolloutError(f"deployment {dep.spec.name} already has rollout {dep.rollout.id} ({dep.rollout.state})")
    if kind not in KINDS:
        raise RolloutError(f"unknown rollout kind {kind!r} (known: {', '.join(KINDS)})")
    source = _source(dep.spec, from_version)
    if version.version in dep.spec.weights():
        raise RolloutError(f"deployment {dep.spec.name} already has a version {version.version}")
    if version.replicas < 1:
        raise RolloutError("the new version needs replicas >= 1")
    common = dict(id=rollout_id, deployment=dep.spec.name, from_version=source.version, to_version=version.version,
                  target=version.replicas, base_weight=source.weight, created_at=now, updated_at=now)
    rollout: Rollout
    if kind == RollingUpdate.kind:
        rollout = _rolling(dep.spec, source, parse_policy(RollingPolicy, policy), common)
    else:
        rollout = Canary(policy=parse_policy(CanaryPolicy, policy), **common)
    dep.spec = DeploymentSpec(dep.spec.name, (*dep.spec.versions, replace(version, replicas=0, weight=0.0)),
                              dep.spec.min_replicas)
    dep.rollout = rollout
    return rollout


def _source(spec: DeploymentSpec, name: str | None) -> VersionSpec:
    """The version a rollout replaces: the one named, or the only one taking traffic."""
    serving = [v for v in spec.versions if v.weight > 0 and v.replicas > 0]
    if name is None and len(serving) != 1:
        raise RolloutError(f"deployment {spec.name} serves {len(serving)} versions: name the one to replace")
    if name is not None and name not in spec.weights():
        raise RolloutError(f"deployment {spec.name} has no version {name}")
    source = serving[0] if name is None else spec.version(name)
    if source not in serving:
        raise RolloutError(f"version {name} serves no traffic; there is nothing to roll from")
    return source


def _rolling(spec: DeploymentSpec, source: VersionSpec, policy: RollingPolicy, common: dict[str, Any]) -> RollingUpdate:
    floor = source.replicas if spec.min_replicas is None else min(spec.min_replicas, source.replicas)
    if policy.max_surge == 0 and common["target"] <= source.replicas and floor >= source.replicas:
        # every slot taken and no replica allowed out of rotation: the update (or, after an abort, its
        # walk back) could never move
        raise RolloutError("max_surge 0 needs min_replicas below the replaced version's replica count")
    return RollingUpdate(from_replicas=source.replicas, floor=floor, policy=policy,
                         desired={source.version: source.replicas, common["to_version"]: 0}, **common)
