"""Rollout state machines (daemon/rollouts.py), driven by a hand-played engine: no processes, no sleeping."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.deployments import (
    SLO,
    Action,
    DeploymentSpec,
    DrainReplica,
    Log,
    RemoveVersion,
    ReplicaState,
    ReplicaView,
    SetReplicas,
    SetWeight,
    StartReplica,
    StopReplica,
    VersionSpec,
    VersionStats,
)
from daemon.rollouts import (
    Canary,
    Deployment,
    Observation,
    RollingUpdate,
    RolloutError,
    RolloutState,
    begin_rollout,
    rollout_from_dict,
)

UP, PENDING, LOADING = ReplicaState.UP, ReplicaState.PENDING, ReplicaState.LOADING
DRAINING, DRAINED, DEAD = ReplicaState.DRAINING, ReplicaState.DRAINED, ReplicaState.DEAD
GOOD = VersionStats(requests=500, errors=0, p99_ttft_s=0.2, p99_itl_s=0.02)


class World:
    """The engine, played by hand: executes actions on a replica table; tests choose what happens next."""

    def __init__(self, dep: Deployment, ready: bool = True) -> None:
        self.dep = dep
        self.replicas: dict[str, ReplicaView] = {}
        self.ids = itertools.count()
        self.logs: list[Log] = []
        self.stats: dict[str, VersionStats] = {}
        if ready:  # the deployment's replicas are up before the test begins
            self.execute(dep.tick(0.0, self.observe()))
            self.all_up()

    def observe(self) -> Observation:
        return Observation(tuple(self.replicas.values()), dict(self.stats))

    def tick(self, now: float) -> list[Action]:
        obs = self.observe()
        for r in obs.replicas:  # a dead replica is reported once, then forgotten
            if r.state is DEAD:
                del self.replicas[r.replica_id]
        actions = self.dep.tick(now, obs)
        self.execute(actions)
        return actions

    def command(self, verb: str, now: float) -> list[Action]:
        actions = self.dep.command(verb, now)
        self.execute(actions)
        return actions

    def execute(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, StartReplica):
                rid = f"{a.version}-{next(self.ids)}"
                self.replicas[rid] = ReplicaView(rid, a.version, PENDING)
            elif isinstance(a, DrainReplica):
                assert self.replicas[a.replica_id].state is UP
                self.set(a.replica_id, DRAINING)
            elif isinstance(a, StopReplica):
                assert self.replicas[a.replica_id].state in (PENDING, LOADING, DRAINED)
                del self.replicas[a.replica_id]
            elif isinstance(a, Log):
                self.logs.append(a)

    def set(self, rid: str, state: ReplicaState) -> None:
        self.replicas[rid] = ReplicaView(rid, self.replicas[rid].version, state)

    def ids_in(self, version: str | None, *states: ReplicaState) -> list[str]:
        return sorted(r.replica_id for r in self.replicas.values()
                      if (version is None or r.version == version) and r.state in states)

    def count(self, version: str | None, *states: ReplicaState) -> int:
        return len(self.ids_in(version, *states))

    def all_up(self) -> None:
        for rid in self.ids_in(None, PENDING, LOADING):
            self.set(rid, UP)

    def all_drained(self) -> None:
        for rid in self.ids_in(None, DRAINING):
            self.set(rid, DRAINED)

    def settle(self, now: float, rounds: int = 100) -> float:
        """Let every load and drain finish, tick after tick, until nothing changes."""
        for _ in range(rounds):
            self.all_up()
            self.all_drained()
            if not self.tick(now) and not self.ids_in(None, PENDING, LOADING, DRAINING, DRAINED):
                return now
            now += 1
        raise AssertionError("did not settle")


def deployment(replicas: int = 3, min_replicas: int | None = None) -> Deployment:
    return Deployment(DeploymentSpec("chat", (VersionSpec("v1", "/m/1", replicas, 100),), min_replicas))


def rolling(replicas: int = 3, target: int | None = None, min_replicas: int | None = None,
            **policy) -> tuple[World, RollingUpdate]:
    dep = deployment(replicas, min_replicas)
    world = World(dep)
    rollout = begin_rollout(dep, "rolling", VersionSpec("v2", "/m/2", target or replicas), 0.0, "r1", policy)
    assert isinstance(rollout, RollingUpdate)
    return world, rollout


# ------------------------------------------------------------------------------------------- rolling update
def test_rolling_update_one_replica_at_a_time():
    world, rollout = rolling(3)
    assert rollout.state is RolloutState.PENDING and world.dep.spec.weights() == {"v1": 100.0, "v2": 0.0}
    actions = world.tick(1)
    assert rollout.state is RolloutState.RUNNING
    assert SetReplicas("v2", 1) in actions and StartReplica("chat", "v2") in actions
    assert not any(isinstance(a, DrainReplica) for a in actions)
    assert world.tick(2) == []  # loading: nothing else moves (max_surge 1)
    world.all_up()
    actions = world.tick(3)  # v2-3 is up: weight shifts to it and exactly one v1 drains
    assert [a for a in actions if isinstance(a, DrainReplica)] == [DrainReplica("v1-0")]
    assert world.dep.spec.weights() == pytest.approx({"v1": 200 / 3, "v2": 100 / 3})
    assert world.tick(4) == []  # the old replica is still draining: no slot for the next new one
    world.all_drained()
    actions = world.tick(5)
    assert StopReplica("v1-0") in actions and actions.count(StartReplica("chat", "v2")) == 1
    world.settle(6)
    assert rollout.state is RolloutState.SUCCEEDED
    assert world.dep.spec.versions == (VersionSpec("v2", "/m/2", 3, 100),)
    assert world.count(None, UP) == 3 == world.count("v2", UP) and not world.replicas.keys() - set(world.ids_in("v2", UP))
    assert world.logs[-1].decision.startswith("succeeded")


def test_rolling_update_can_change_the_replica_count():
    world, rollout = rolling(2, target=4)
    world.settle(1)
    assert rollout.state is RolloutState.SUCCEEDED and world.count("v2", UP) == 4 and world.count("v1", UP) == 0


def test_replicas_up_out_of_order():
    world, rollout = rolling(3, max_surge=2)
    world.tick(1)
    first, second = world.ids_in("v2", PENDING)
    world.set(second, UP)  # the later start is ready first
    actions = world.tick(2)
    assert [type(a) for a in actions if isinstance(a, DrainReplica)] == [DrainReplica]
    world.set(first, LOADING)
    assert not any(isinstance(a, DrainReplica) for a in world.tick(3))
    world.set(first, UP)
    assert sum(isinstance(a, DrainReplica) for a in world.tick(4)) == 1
    world.settle(5)
    assert rollout.state is RolloutState.SUCCEEDED


def test_a_new_replica_dying_is_replaced_and_nothing_old_drains_meanwhile():
    world, rollout = rolling(3)
    world.tick(1)
    (new,) = world.ids_in("v2", PENDING)
    world.set(new, DEAD)
    actions = world.tick(2)
    assert actions[0].decision == f"v2 replica(s) died: {new}"  # type: ignore[union-attr]
    assert actions[1:] == [StartReplica("chat", "v2")]  # reconcile replaces it; no drain, no weight move
    assert world.count("v1", UP) == 3 and world.dep.spec.weights()["v2"] == 0
    world.settle(3)
    assert rollout.state is RolloutState.SUCCEEDED and rollout.dead == [new]


def test_too_many_new_deaths_pause_for_an_operator_then_resume():
    world, rollout = rolling(2, max_new_failures=1)
    now = 1.0
    for _ in range(2):
        world.tick(now)
        world.set(world.ids_in("v2", PENDING)[0], DEAD)
        now += 1
    world.tick(now)
    assert rollout.state is RolloutState.PAUSED and "2 v2 replicas died" in world.logs[-1].decision
    assert world.count("v1", UP) == 2
    world.command("resume", now + 1)
    world.settle(now + 2)
    assert rollout.state is RolloutState.SUCCEEDED


def test_min_replicas_below_count_lets_it_run_without_spare_workers():
    world, rollout = rolling(3, min_replicas=2, max_surge=0)
    actions = world.tick(1)  # no spare slot: one old drains first, which the floor of 2 allows
    assert [a for a in actions if isinstance(a, DrainReplica)] == [DrainReplica("v1-0")]
    assert not any(isinstance(a, StartReplica) for a in actions)
    world.all_drained()
    assert StartReplica("chat", "v2") in world.tick(2)
    world.settle(3)
    assert rollout.state is RolloutState.SUCCEEDED


def test_pause_holds_and_resume_continues():
    world, rollout = rolling(2)
    world.tick(1)
    world.command("pause", 2)
    world.all_up()
    assert world.tick(3) == []  # up, but not shifted in while paused
    assert world.dep.spec.weights()["v2"] == 0
    world.command("resume", 4)
    assert any(isinstance(a, DrainReplica) for a in world.tick(5))
    with pytest.raises(RolloutError):
        world.command("resume", 6)


def test_abort_rolls_back_under_the_same_capacity_rule():
    world, rollout = rolling(3)
    now = 1.0
    for _ in range(4):  # part-way: some v2 up, some v1 drained
        world.all_up()
        world.all_drained()
        world.tick(now)
        now += 1
    assert world.count("v2", UP) >= 1
    world.command("abort", now)
    assert rollout.state is RolloutState.ROLLING_BACK
    with pytest.raises(RolloutError):
        world.command("abort", now)
    world.settle(now + 1)
    assert rollout.state is RolloutState.ABORTED
    assert world.dep.spec.versions == (VersionSpec("v1", "/m/1", 3, 100),)
    assert world.count("v1", UP) == 3 and world.count("v2", UP, PENDING, LOADING) == 0


def test_rolling_verbs_that_do_not_apply():
    world, rollout = rolling(1)
    with pytest.raises(RolloutError, match="cannot be promoted"):
        world.command("promote", 1)
    with pytest.raises(RolloutError, match="unknown"):
        world.command("jump", 1)
    world.settle(1)
    for verb in ("pause", "resume", "abort"):
        with pytest.raises(RolloutError):
            world.command(verb, 100)


def test_begin_rollout_refuses_what_cannot_work():
    dep = deployment(2)
    with pytest.raises(RolloutError, match="kind"):
        begin_rollout(dep, "blue-green", VersionSpec("v2", "/m/2", 2), 0, "x")
    with pytest.raises(RolloutError, match="already has a version"):
        begin_rollout(dep, "rolling", VersionSpec("v1", "/m/2", 2), 0, "x")
    with pytest.raises(RolloutError, match="max_surge 0"):
        begin_rollout(dep, "rolling", VersionSpec("v2", "/m/2", 2), 0, "x", {"max_surge": 0})
    with pytest.raises(RolloutError, match="replicas >= 1"):
        begin_rollout(dep, "canary", VersionSpec("v2", "/m/2", 0), 0, "x")
    begin_rollout(dep, "canary", VersionSpec("v2", "/m/2", 2), 0, "x")
    with pytest.raises(RolloutError, match="already has rollout"):
        begin_rollout(dep, "rolling", VersionSpec("v3", "/m/3", 2), 0, "y")
    ab = Deployment(DeploymentSpec("ab", (VersionSpec("a", "m", 1, 50), VersionSpec("b", "m", 1, 50))))
    with pytest.raises(RolloutError, match="name the one"):
        begin_rollout(ab, "rolling", VersionSpec("c", "m", 1), 0, "z")
    with pytest.raises(RolloutError, match="no version"):
        begin_rollout(ab, "rolling", VersionSpec("c", "m", 1), 0, "z", from_version="q")
    begin_rollout(ab, "rolling", VersionSpec("c", "m", 1), 0, "z", from_version="b")
    idle = Deployment(DeploymentSpec("i", (VersionSpec("a", "m", 1, 100), VersionSpec("b", "m", 0, 0))))
    with pytest.raises(RolloutError, match="serves no traffic"):
        begin_rollout(idle, "canary", VersionSpec("c", "m", 1), 0, "w", from_version="b")


def test_ab_arms_not_in_the_rollout_keep_their_share():
    dep = Deployment(DeploymentSpec("ab", (VersionSpec("a", "m", 1, 30), VersionSpec("b", "m", 2, 70))))
    world = World(dep)
    rollout = begin_rollout(dep, "rolling", VersionSpec("b2", "m2", 2), 0, "r", from_version="b")
    world.tick(1)
    world.all_up()
    world.tick(2)
    weights = dep.spec.weights()
    assert weights["a"] == 30 and weights["b"] + weights["b2"] == pytest.approx(70) and weights["b2"] > 0
    world.settle(3)
    assert rollout.state is RolloutState.SUCCEEDED and dep.spec.weights() == {"a": 30, "b2": 70}
    assert world.count("a", UP) == 1


events = st.lists(st.tuples(st.sampled_from(["tick", "load", "drain", "kill_new", "kill_old", "abort"]),
                            st.integers(0, 7)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 4), st.integers(0, 2), events)
def test_rolling_never_drains_below_the_floor(old, new, min_replicas, surge, script):
    """Whatever order loads, drains and deaths come in, the machine's own drains never take healthy
    replicas below the floor, and once the world calms down it finishes with the right replicas."""
    if surge == 0 and new <= old:
        min_replicas = min(min_replicas, old - 1)  # otherwise nothing could move (begin_rollout refuses)
    dep = deployment(old, min_replicas)
    world = World(dep)
    rollout = begin_rollout(dep, "rolling", VersionSpec("v2", "/m/2", new), 0, "r", {"max_surge": surge})
    assert isinstance(rollout, RollingUpdate)
    now = 1.0
    for event, pick in script:
        now += 1
        if event == "tick":
            healthy = world.count(None, UP)
            going_to = old if rollout.state is RolloutState.ROLLING_BACK else new
            world.tick(now)
            assert world.count(None, UP) >= min(healthy, rollout.floor, going_to)
        elif event == "abort":
            if rollout.state in (RolloutState.RUNNING, RolloutState.PENDING):
                world.command("abort", now)
        else:
            _happen(world, event, pick)
    for _ in range(3):  # deaths may have paused it (max_new_failures): an operator resumes
        if rollout.state is RolloutState.PAUSED:
            world.command("resume", now)
        now = world.settle(now + 1)
    end = "v2" if rollout.state is RolloutState.SUCCEEDED else "v1"
    assert rollout.state in (RolloutState.SUCCEEDED, RolloutState.ABORTED)
    assert world.count(end, UP) == (new if end == "v2" else old) == world.count(None, UP)
    assert [v.version for v in dep.spec.versions] == [end]


def _happen(world: World, event: str, pick: int) -> None:
    state_of = {"load": (PENDING, LOADING), "drain": (DRAINING,), "kill_new": (PENDING, LOADING, UP),
                "kill_old": (UP,)}[event]
    version = {"kill_new": "v2", "kill_old": "v1"}.get(event)
    ids = world.ids_in(version, *state_of)
    if not ids:
        return
    rid = ids[pick % len(ids)]
    state = world.replicas[rid].state
    nxt = {PENDING: LOADING, LOADING: UP, DRAINING: DRAINED}
    world.set(rid, DEAD if event.startswith("kill") else nxt[state])


# --------------------------------------------------------------------------------------------------- canary
def canary(replicas: int = 4, **policy) -> tuple[World, Canary]:
    dep = deployment(replicas)
    world = World(dep)
    policy = {"steps": [5, 25, 50, 100], "dwell_s": 60, "min_requests": 100, **policy}
    rollout = begin_rollout(dep, "canary", VersionSpec("v2", "/m/2", replicas), 0.0, "c1", policy)
    assert isinstance(rollout, Canary)
    return world, rollout


def weight_of(world: World, version: str) -> float:
    return world.dep.spec.weights().get(version, 0.0)


def test_canary_waits_for_its_replica_before_taking_traffic():
    world, rollout = canary()
    actions = world.tick(0)
    assert SetReplicas("v2", 1) in actions and weight_of(world, "v2") == 0 and rollout.window_start is None
    world.all_up()
    actions = world.tick(1)
    assert SetWeight("v2", 5) in actions and SetWeight("v1", 95) in actions and rollout.window_start == 1


def test_canary_advances_through_its_steps_and_succeeds():
    world, rollout = canary()
    world.stats = {"v2": GOOD, "v1": GOOD}
    world.tick(0)
    world.all_up()
    world.tick(1)
    assert world.tick(60) == []  # dwell not over (started at 1)
    world.tick(61)  # 25%: still one replica (ceil(25% of 4)), so the weight moves at once
    assert weight_of(world, "v2") == 25 and rollout.window_start == 61
    world.tick(121)  # 50% needs 2 replicas: scale first, weight after
    assert weight_of(world, "v2") == 25 and world.dep.spec.version("v2").replicas == 2
    world.all_up()
    world.tick(122)
    assert weight_of(world, "v2") == 50 and rollout.progress(122)["step"] == 3
    world.tick(182)
    world.all_up()
    world.tick(183)
    assert weight_of(world, "v2") == 100 and weight_of(world, "v1") == 0 and world.count("v2", UP) == 4
    assert world.count("v1", UP) == 4  # the stable keeps its replicas until the end: rollback stays instant
    world.tick(243)
    assert rollout.state is RolloutState.SUCCEEDED
    assert world.dep.spec.versions == (VersionSpec("v2", "/m/2", 4, 100),)
    assert world.count("v1", DRAINING) == 4
    decisions = [log.decision for log in world.logs]
    assert decisions[-1].startswith("succeeded") and "advance to 25%" in decisions


def test_canary_holds_without_enough_requests():
    world, rollout = canary()
    world.tick(0)
    world.all_up()
    world.tick(1)
    world.stats = {"v2": VersionStats(requests=99)}
    world.tick(100)
    world.tick(200)
    holds = [log for log in world.logs if log.decision.startswith("hold")]
    assert len(holds) == 1 and holds[0].numbers["canary"]["requests"] == 99  # logged once per step
    assert weight_of(world, "v2") == 5
    world.stats = {"v2": GOOD}
    world.tick(201)
    assert weight_of(world, "v2") == 25


BREACHES = [
    ("error rate", SLO(max_error_rate=0.01), VersionStats(500, 10, 0.2, 0.02), GOOD),
    ("p99 ttft", SLO(max_p99_ttft_s=0.5), VersionStats(500, 0, 0.6, 0.02), GOOD),
    ("p99 itl", SLO(max_p99_itl_s=0.05), VersionStats(500, 0, 0.2, 0.06), GOOD),
    ("error rate vs stable", SLO(None, error_rate_vs_stable=2.0), VersionStats(500, 5, 0.2, 0.02),
     VersionStats(500, 2, 0.2, 0.02)),
    ("ttft vs stable", SLO(None, p99_ttft_vs_stable=1.5), VersionStats(500, 0, 0.31, 0.02), GOOD),
    ("itl vs stable", SLO(None, p99_itl_vs_stable=1.5), VersionStats(500, 0, 0.2, 0.031), GOOD),
]


@pytest.mark.parametrize("name, slo, bad, stable", BREACHES, ids=[b[0] for b in BREACHES])
def test_canary_rolls_back_on_each_kind_of_breach(name, slo, bad, stable):
    world, rollout = canary(slo=slo)
    world.stats = {"v2": GOOD, "v1": stable}
    world.tick(0)
    world.all_up()
    world.tick(1)
    world.tick(61)  # a good first step
    assert weight_of(world, "v2") == 25
    world.stats["v2"] = bad
    actions = world.tick(70)  # mid-dwell: a breach does not wait for the dwell to end
    assert rollout.state is RolloutState.ROLLED_BACK
    assert SetWeight("v2", 0) in actions and SetWeight("v1", 100) in actions and RemoveVersion("v2") in actions
    assert world.dep.spec.versions == (VersionSpec("v1", "/m/1", 4, 100),)
    assert world.count("v2", DRAINING) == 1 and world.count("v1", UP) == 4
    log = world.logs[-1]
    assert log.decision.startswith("rollback") and log.numbers["breaches"] and log.numbers["canary"]["requests"] == 500


def test_within_slo_relative_limits_do_not_roll_back():
    world, rollout = canary(slo=SLO(None, p99_ttft_vs_stable=1.5))
    world.stats = {"v2": VersionStats(500, 0, 0.29, 0.02), "v1": GOOD}
    world.tick(0)
    world.all_up()
    world.tick(1)
    world.tick(61)
    assert rollout.state is RolloutState.RUNNING and weight_of(world, "v2") == 25


def test_rollback_stops_canary_replicas_still_loading():
    world, rollout = canary()
    world.stats = {"v2": GOOD, "v1": GOOD}
    world.tick(0)
    world.all_up()
    world.tick(1)
    world.tick(61)
    world.tick(121)  # scaling to 2 replicas for 50%
    (loading,) = world.ids_in("v2", PENDING)
    world.stats["v2"] = VersionStats(500, 100, 0.2, 0.02)
    actions = world.tick(122)  # the 25% window still counts while scaling
    assert rollout.state is RolloutState.ROLLED_BACK and StopReplica(loading) in actions


def test_pause_stops_advancing_but_not_rolling_back():
    world, rollout = canary()
    world.stats = {"v2": GOOD, "v1": GOOD}
    world.tick(0)
    world.all_up()
    world.tick(1)
    world.command("pause", 2)
    world.tick(100)
    assert weight_of(world, "v2") == 5 and rollout.state is RolloutState.PAUSED
    world.command("resume", 101)
    world.tick(102)  # the dwell passed (and held its SLO) while paused: it advances at once
    assert weight_of(world, "v2") == 25
    world.command("pause", 103)
    world.stats["v2"] = VersionStats(500, 500, 0.2, 0.02)
    world.tick(104)
    assert rollout.state is RolloutState.ROLLED_BACK


def test_abort_returns_all_traffic_to_stable():
    world, rollout = canary()
    world.tick(0)
    world.all_up()
    world.tick(1)
    world.command("abort", 2)
    assert rollout.state is RolloutState.ABORTED and weight_of(world, "v1") == 100
    assert "v2" not in world.dep.spec.weights()
    world.tick(3)
    assert world.count("v2", DRAINING) == 1
    with pytest.raises(RolloutError):
        world.command("promote", 4)


def test_promote_scales_the_canary_up_then_finishes_without_judging():
    world, rollout = canary()
    world.tick(0)
    world.all_up()
    world.tick(1)
    world.stats = {"v2": VersionStats(500, 500, 9, 9)}  # the operator has decided; the SLO is not consulted
    world.command("pause", 2)
    world.command("promote", 3)
    actions = world.tick(4)
    assert SetReplicas("v2", 4) in actions and rollout.state is RolloutState.RUNNING
    world.command("pause", 5)
    world.all_up()
    assert world.tick(6) == []  # paused: promotion waits too
    world.command("resume", 7)
    world.tick(8)
    assert rollout.state is RolloutState.SUCCEEDED and world.dep.spec.weights() == {"v2": 100}
    assert world.count("v1", DRAINING) == 4


def test_rollouts_round_trip_through_dict():
    world, rollout = canary()
    world.tick(0)
    world.all_up()
    world.tick(1)
    copy = rollout_from_dict(rollout.to_dict())
    assert copy == rollout and copy.progress(10) == rollout.progress(10)
    world2, rolling_update = rolling(3)
    world2.tick(1)
    world2.command("pause", 2)
    assert rollout_from_dict(rolling_update.to_dict()) == rolling_update


def test_without_a_rollout_a_tick_only_reconciles():
    world = World(deployment(2))
    world.set("v1-0", DEAD)
    assert world.tick(1) == [StartReplica("chat", "v1")]
    assert world.tick(2) == []


def test_a_dead_canary_replica_is_replaced_and_the_canary_goes_on():
    world, rollout = canary()
    world.stats = {"v2": GOOD, "v1": GOOD}
    world.tick(0)
    world.all_up()
    world.tick(1)
    (replica,) = world.ids_in("v2", UP)
    world.set(replica, DEAD)
    assert world.tick(30) == [StartReplica("chat", "v2")]
    world.all_up()
    world.tick(61)
    assert rollout.state is RolloutState.RUNNING and weight_of(world, "v2") == 25
