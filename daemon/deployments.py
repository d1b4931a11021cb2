"""Deployments as data: specs (what clients name in `model`, and its versions), rollout policies, what the
engine observes, and the actions it executes. Desired state (`DeploymentSpec`) is kept apart from observed
state (`ReplicaView`): `reconcile` turns the gap into replica actions, so rollouts only edit desired state.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

# Names travel in HTTP headers, metric labels and log lines: keep them short and plain.
_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
DTYPES = ("float32", "bfloat16", "float16")  # what worker/runner.py can load


class DeploymentError(ValueError):
    """A deployment or version definition (config file or admin API) that Nimbus cannot use."""


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is an int subclass; `replicas = true` is a mistake, not 1


def _is_number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class VersionSpec:
    """One version of a deployment: a checkpoint, how many replicas serve it, its relative traffic weight."""

    version: str
    model: str  # a checkpoint folder or a name `nimbus pull` knows
    replicas: int = 1
    weight: float = 100.0  # relative to the deployment's other versions; 0 = no traffic
    max_model_len: int | None = None
    dtype: str | None = None
    fault: str | None = None  # fault injection for this version's replicas: drills and tests (worker/faults.py)

    def __post_init__(self) -> None:
        if not isinstance(self.version, str) or not _VERSION_NAME.fullmatch(self.version):
            raise DeploymentError(f"version name {self.version!r} must match {_VERSION_NAME.pattern}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise DeploymentError(f"version {self.version}: model must be a non-empty string")
        if not _is_int(self.replicas) or self.replicas < 0:
            raise DeploymentError(f"version {self.version}: replicas must be an int >= 0, got {self.replicas!r}")
        if not _is_number(self.weight) or self.weight < 0:
            raise DeploymentError(f"version {self.version}: weight must be a finite number >= 0, got {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))
        if self.max_model_len is not None and (not _is_int(self.max_model_len) or self.max_model_len < 1):
            raise DeploymentError(f"version {self.version}: max_model_len must be a positive int")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise DeploymentError(f"version {self.version}: dtype must be one of {', '.join(DTYPES)}")
        if self.fault is not None:
            from worker.faults import Faults  # no torch: the daemon may check a fault spec

            if not isinstance(self.fault, str):
                raise DeploymentError(f"version {self.version}: fault must be a string")
            try:
                Faults.parse(self.fault)
            except ValueError as exc:
                raise DeploymentError(f"version {self.version}: fault: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> VersionSpec:
        return cls(**_known_keys(cls, raw, f"version {raw.get('version', '?')!r}"))


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """Desired state of one deployment. `min_replicas`: healthy replicas a rollout keeps in rotation
    (None: as many as the version being replaced has, so rollouts surge and never shrink capacity)."""

    name: str
    versions: tuple[VersionSpec, ...]
    min_replicas: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _DEPLOYMENT_NAME.fullmatch(self.name):
            raise DeploymentError(f"deployment name {self.name!r} must match {_DEPLOYMENT_NAME.pattern}")
        object.__setattr__(self, "versions", tuple(self.versions))
        if not self.versions:
            raise DeploymentError(f"deployment {self.name}: needs at least one version")
        names = [v.version for v in self.versions]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DeploymentError(f"deployment {self.name}: duplicate version(s) {', '.join(dupes)}")
        # weights are relative; all zero would leave clients nowhere to go
        if not any(v.weight > 0 for v in self.versions):
            raise DeploymentError(f"deployment {self.name}: at least one version needs a weight > 0")
        if self.min_replicas is not None and (not _is_int(self.min_replicas) or self.min_replicas < 0):
            raise DeploymentError(f"deployment {self.name}: min_replicas must be an int >= 0")

    def version(self, name: str) -> VersionSpec:
        for v in self.versions:
            if v.version == name:
                return v
        raise KeyError(name)

    def weights(self) -> dict[str, float]:
        """Version -> weight, in the spec's order (routing's stable order)."""
        return {v.version: v.weight for v in self.versions}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "min_replicas": self.min_replicas, "versions": [v.to_dict() for v in self.versions]}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DeploymentSpec:
        values = _known_keys(cls, raw, f"deployment {raw.get('name', '?')!r}")
        versions = values.get("versions")
        if not isinstance(versions, list | tuple):
            raise DeploymentError(f"deployment {values.get('name')!r}: versions must be a list of tables")
        values["versions"] = tuple(VersionSpec.from_dict(_table(v, "version")) for v in versions)
        return cls(**values)


def _table(raw: object, what: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise DeploymentError(f"each {what} must be a table, got {type(raw).__name__}")
    return raw


def _known_keys(cls: type, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING}
    unknown, missing = sorted(set(_table(raw, where)) - names), sorted(required - set(raw))
    if unknown:
        raise DeploymentError(f"{where}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    if missing:
        raise DeploymentError(f"{where}: missing {', '.join(missing)}")
    return dict(raw)


def parse_deployments(raw: object) -> tuple[DeploymentSpec, ...]:
    """The `[[deployments]]` array of the config file (or an admin API body) into checked specs."""
    if not isinstance(raw, list | tuple):
        raise DeploymentError("deployments must be an array of tables ([[deployments]])")
    specs = tuple(DeploymentSpec.from_dict(_table(item, "deployment")) for item in raw)
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DeploymentError(f"duplicate deployment name(s): {', '.join(dupes)}")
    for spec in specs:
        check_servable(spec)
    return specs


def check_servable(spec: DeploymentSpec) -> None:
    """What an operator writes must route somewhere: a version with traffic needs replicas."""
    for v in spec.versions:
        if v.weight > 0 and v.replicas == 0:
            raise DeploymentError(f"deployment {spec.name}: version {v.version} has weight {v.weight:g} but 0 replicas")


def check_spec_update(old: DeploymentSpec, new: DeploymentSpec) -> None:
    """An admin edit may change weights and replica counts; a new checkpoint is a new version (a rollout)."""
    check_servable(new)
    if old.name != new.name:
        raise DeploymentError(f"cannot rename deployment {old.name} to {new.name}")
    for v in new.versions:
        try:
            before = old.version(v.version)
        except KeyError:
            continue
        if (before.model, before.dtype, before.max_model_len, before.fault) != (v.model, v.dtype, v.max_model_len,
                                                                                v.fault):
            raise DeploymentError(f"deployment {new.name}: version {v.version} already names {before.model}; "
                                  "serve a different checkpoint or setting as a new version (start a rollout)")


# --------------------------------------------------------------------------------------------- observed
class ReplicaState(enum.StrEnum):
    PENDING = "pending"  # asked for; no worker assigned yet
    LOADING = "loading"  # a worker was sent `Load` and has not said it is ready
    UP = "up"  # loaded and healthy: serves its version's share of traffic
    DRAINING = "draining"  # out of rotation, finishing its in-flight requests
    DRAINED = "drained"  # out of rotation and idle: waits for StopReplica to free its worker
    DEAD = "dead"  # failed (heartbeats stopped, load failed); the engine reports it, then forgets it


LIVE_STATES = (ReplicaState.PENDING, ReplicaState.LOADING, ReplicaState.UP)  # count toward `replicas`


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What the engine knows of one replica of this deployment, for rollouts and `reconcile`."""

    replica_id: str
    version: str
    state: ReplicaState


@dataclass(frozen=True, slots=True)
class VersionStats:
    """One version's requests that finished in a window. `errors`: server-side failures only (5xx, worker
    failures, poisoned requests), not client errors or disconnects. p99s are None without samples."""

    requests: int = 0
    errors: int = 0
    p99_ttft_s: float | None = None
    p99_itl_s: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True, slots=True)
class Observation:
    """What the engine knows now: this deployment's replicas, and per-version stats over the requests
    that finished in [rollout.window_start, now] (only a canary asks for stats)."""

    replicas: tuple[ReplicaView, ...] = ()
    stats: Mapping[str, VersionStats] = field(default_factory=dict)

    def count(self, version: str, *states: ReplicaState) -> int:
        return sum(1 for r in self.replicas if r.version == version and r.state in states)


# --------------------------------------------------------------------------------------------- policies
def parse_policy(cls: type, raw: Mapping[str, Any] | None) -> Any:
    """A policy dataclass (RollingPolicy, CanaryPolicy, SLO) from its TOML/JSON table."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - {f.name for f in fields(cls)})
    if unknown:
        raise DeploymentError(f"unknown {cls.__name__} setting(s): {', '.join(unknown)}")
    if isinstance(raw.get("slo"), Mapping):
        raw["slo"] = parse_policy(SLO, raw["slo"])
    if isinstance(raw.get("steps"), list):
        raw["steps"] = tuple(raw["steps"])
    return cls(**raw)


@dataclass(frozen=True, slots=True)
class SLO:
    """A canary's limits over its step's window; None = unchecked. `*_vs_stable` are multiples of the stable
    version's figure over the same window, checked only when the stable served >= min_requests there (at
    100% it serves none, so only absolute limits apply). A stable with no errors makes any canary error
    breach `error_rate_vs_stable`: pair it with `max_error_rate` or leave it off."""

    max_error_rate: float | None = 0.01
    max_p99_ttft_s: float | None = None
    max_p99_itl_s: float | None = None
    error_rate_vs_stable: float | None = None
    p99_ttft_vs_stable: float | None = 1.5
    p99_itl_vs_stable: float | None = 1.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (type(value) not in (int, float) or not 0 <= value < math.inf):
                raise DeploymentError(f"slo.{f.name} must be a finite number >= 0 or absent, got {value!r}")


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: str  # "ok", "breach" or "insufficient" (too few canary requests in the window to judge)
    breaches: tuple[str, ...] = ()
    numbers: dict[str, Any] = field(default_factory=dict)


_CHECKS = (("error_rate", "max_error_rate", "error_rate_vs_stable"),
           ("p99_ttft_s", "max_p99_ttft_s", "p99_ttft_vs_stable"),
           ("p99_itl_s", "max_p99_itl_s", "p99_itl_vs_stable"))


def _figures(stats: VersionStats | None) -> dict[str, Any] | None:
    return None if stats is None else {**asdict(stats), "error_rate": stats.error_rate}


def judge(slo: SLO, canary: VersionStats, stable: VersionStats | None, min_requests: int) -> Verdict:
    """The canary's window against its SLO, with the numbers behind the verdict (they go in the log)."""
    numbers = {"canary": _figures(canary), "stable": _figures(stable), "min_requests": min_requests}
    if canary.requests < min_requests:
        return Verdict("insufficient", (), numbers)
    comparable = stable is not None and stable.requests >= min_requests
    breaches = []
    for metric, absolute, relative in _CHECKS:
        value, limit, ratio = getattr(canary, metric), getattr(slo, absolute), getattr(slo, relative)
        base = getattr(stable, metric) if comparable else None
        if value is not None and limit is not None and value > limit:
            breaches.append(f"{metric} {value:.4g} > {limit:.4g}")
        if value is not None and ratio is not None and base is not None and value > ratio * base:
            breaches.append(f"{metric} {value:.4g} > {ratio:g}x stable {base:.4g}")
    return Verdict("breach" if breaches else "ok", tuple(breaches), numbers)


@dataclass(frozen=True, slots=True)
class RollingPolicy:
    max_surge: int = 1  # replicas above the larger version's count while rolling (needs spare workers)
    max_new_failures: int = 3  # new-version replicas that may die before the update pauses for an operator

    def __post_init__(self) -> None:
        if type(self.max_surge) is not int or self.max_surge < 0:
            raise DeploymentError("max_surge must be an int >= 0")
        if type(self.max_new_failures) is not int or self.max_new_failures < 0:
            raise DeploymentError("max_new_failures must be an int >= 0")


@dataclass(frozen=True, slots=True)
class CanaryPolicy:
    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)  # canary's share of the stable weight, percent
    dwell_s: float = 300.0
    min_requests: int = 100  # in the window, before the canary may advance (or be judged at all)
    slo: SLO = field(default_factory=SLO)

    def __post_init__(self) -> None:
        steps = tuple(self.steps) if isinstance(self.steps, list | tuple) else ()
        if not steps or not all(_is_number(s) for s in steps) or steps[-1] != 100 or steps[0] <= 0 \
                or any(a >= b for a, b in zip(steps, steps[1:])):
            raise DeploymentError(f"canary steps must rise strictly within (0, 100] and end at 100, got {self.steps}")
        object.__setattr__(self, "steps", tuple(float(s) for s in steps))
        if not _is_number(self.dwell_s) or self.dwell_s < 0:
            raise DeploymentError(f"canary dwell_s must be a number >= 0, got {self.dwell_s!r}")
        if not _is_int(self.min_requests) or self.min_requests < 1:
            raise DeploymentError(f"canary min_requests must be an int >= 1, got {self.min_requests!r}")


# ---------------------------------------------------------------------------------------------- actions
@dataclass(frozen=True, slots=True)
class SetWeight:
    version: str
    weight: float


@dataclass(frozen=True, slots=True)
class SetReplicas:
    version: str
    replicas: int


@dataclass(frozen=True, slots=True)
class RemoveVersion:
    """Take the version out of the spec; any replicas it still has drain (reconcile sees them as surplus)."""

    version: str


@dataclass(frozen=True, slots=True)
class StartReplica:
    """Find a worker and send it `Load` for this version; report it PENDING/LOADING from the next observation."""

    deployment: str
    version: str


@dataclass(frozen=True, slots=True)
class DrainReplica:
    """Out of rotation now; let in-flight requests finish; then report it DRAINED."""

    replica_id: str


@dataclass(frozen=True, slots=True)
class StopReplica:
    """Release the replica's worker (it holds no requests: it is drained, or has not loaded yet)."""

    replica_id: str


@dataclass(frozen=True, slots=True)
class Log:
    """A rollout decision with the numbers behind it: log it, persist it, show it in /admin/deployments."""

    decision: str
    numbers: Mapping[str, Any]
    deployment: str = ""
    at: float = 0.0


SpecAction = SetWeight | SetReplicas | RemoveVersion
ReplicaAction = StartReplica | DrainReplica | StopReplica
Action = SpecAction | ReplicaAction | Log


def apply_actions(spec: DeploymentSpec, actions: Iterable[Action]) -> DeploymentSpec:
    """The spec after the desired-state actions in `actions` (others are ignored); built once, at the end,
    so a batch is checked as a whole. KeyError for a version not in the spec (a bug in the caller)."""
    versions = {v.version: v for v in spec.versions}
    for action in actions:
        if isinstance(action, SetWeight):
            versions[action.version] = replace(versions[action.version], weight=action.weight)
        elif isinstance(action, SetReplicas):
            versions[action.version] = replace(versions[action.version], replicas=action.replicas)
        elif isinstance(action, RemoveVersion):
            versions.pop(action.version, None)
    return replace(spec, versions=tuple(versions.values()))


def reconcile(spec: DeploymentSpec, replicas: Sequence[ReplicaView]) -> list[ReplicaAction]:
    """Replica actions that move the observed replicas toward the spec's counts.

    Surplus goes cheapest first: replicas not yet serving are stopped before a serving one is drained.
    Drained replicas are always released (so they hold no slot a rollout counts on). Replicas of versions
    no longer in the spec are surplus. Dead ones are ignored: they are already gone."""
    # releases first, starts last: an engine executing in order frees a worker before it needs one
    releases: list[ReplicaAction] = [StopReplica(r.replica_id) for r in replicas if r.state is ReplicaState.DRAINED]
    starts: list[ReplicaAction] = []
    wanted = {v.version: v.replicas for v in spec.versions}
    for version in dict.fromkeys([*wanted, *(r.version for r in replicas)]):
        live = [r for r in replicas if r.version == version and r.state in LIVE_STATES]
        missing = wanted.get(version, 0) - len(live)
        starts += [StartReplica(spec.name, version) for _ in range(missing)]
        releases += _shed(live, -missing)
    return releases + starts


def _shed(live: list[ReplicaView], count: int) -> list[ReplicaAction]:
    order = {ReplicaState.PENDING: 0, ReplicaState.LOADING: 1, ReplicaState.UP: 2}
    victims = sorted(live, key=lambda r: (order[r.state], r.replica_id))[:max(0, count)]
    return [DrainReplica(r.replica_id) if r.state is ReplicaState.UP else StopReplica(r.replica_id) for r in victims]
