"""The SQLite state file (daemon/store.py): round trips, and a daemon restart mid-rollout that ends exactly
where an uninterrupted run ends."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_rollouts import GOOD, LOADING, PENDING, UP, World

from daemon.deployments import DeploymentSpec, Log, ReplicaState, VersionSpec
from daemon.rollouts import Deployment, RolloutState, begin_rollout
from daemon.store import SCHEMA_VERSION, Store, StoreConfig, StoreError, default_db_path, merge_config

CHAT = DeploymentSpec("chat", (VersionSpec("v1", "/m/1", 3, 100, 4096, "bfloat16"),), min_replicas=2)
EMBED = DeploymentSpec("embed", (VersionSpec("a", "/m/a", 1, 30), VersionSpec("b", "/m/b", 2, 70)))


def test_specs_round_trip_in_order(tmp_path):
    with Store(tmp_path / "s" / "nimbus.db") as store:
        store.save(Deployment(EMBED))
        store.save(Deployment(CHAT))
        store.save(Deployment(EMBED))  # a re-save keeps its place
    with Store(tmp_path / "s" / "nimbus.db") as store:
        loaded = store.load()
    assert list(loaded) == ["embed", "chat"]
    assert loaded["chat"] == Deployment(CHAT) and loaded["embed"].spec == EMBED


def test_decisions_are_kept_newest_first_and_delete_forgets_everything(tmp_path):
    dep = Deployment(CHAT)
    begin_rollout(dep, "canary", VersionSpec("v2", "/m/2", 3), 10.0, "c1")
    with Store(tmp_path / "db") as store:
        store.save(dep, [Log("weight 5%", {"canary_weight": 5.0}, "chat", 11.0)])
        store.save(dep, [Log("advance to 25%", {"canary": {"requests": 500}}, "chat", 12.0)])
        got = store.decisions("chat")
        assert [d["decision"] for d in got] == ["advance to 25%", "weight 5%"]
        assert got[0] == {"rollout_id": "c1", "at": 12.0, "decision": "advance to 25%",
                          "numbers": {"canary": {"requests": 500}}}
        assert len(store.decisions("chat", limit=1)) == 1
        store.delete("chat")
        assert store.load() == {} and store.decisions("chat") == []


def test_the_latest_rollout_is_the_one_loaded(tmp_path):
    dep = Deployment(CHAT)
    world = World(dep)
    begin_rollout(dep, "rolling", VersionSpec("v2", "/m/2", 3), 1.0, "first")
    world.command("abort", 2.0)
    world.settle(3.0)
    begin_rollout(dep, "canary", VersionSpec("v3", "/m/3", 3), 50.0, "second")
    with Store(tmp_path / "db") as store:
        store.save(dep)
        loaded = store.load()["chat"]
    assert loaded.rollout is not None and loaded.rollout.id == "second" and loaded == dep


def test_a_newer_schema_is_refused(tmp_path):
    Store(tmp_path / "db").close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema"):
        Store(tmp_path / "db")


def test_default_path_follows_systemd_then_xdg_then_home(tmp_path, monkeypatch):
    assert default_db_path({"STATE_DIRECTORY": "/var/lib/nimbus:/other"}) == Path("/var/lib/nimbus/nimbus.db")
    assert default_db_path({"XDG_STATE_HOME": "/x"}) == Path("/x/nimbus/nimbus.db")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_db_path({}) == tmp_path / ".local/state/nimbus/nimbus.db"
    assert StoreConfig("~/n.db").resolve() == tmp_path / "n.db"


def test_config_seeds_and_the_database_wins():
    stored = {"chat": Deployment(DeploymentSpec("chat", (VersionSpec("v2", "/m/2", 3, 100),)))}
    merged, differs = merge_config([EMBED, CHAT], stored)
    assert list(merged) == ["chat", "embed"] and merged["chat"] is stored["chat"]
    assert merged["embed"].spec == EMBED and differs == ["chat"]


# ------------------------------------------------------------------------------ restart in the middle of it
def progress_world(world: World) -> None:
    """One stage a round: pending -> loading -> up, draining -> drained."""
    for rid, view in list(world.replicas.items()):
        nxt = {PENDING: LOADING, LOADING: UP, ReplicaState.DRAINING: ReplicaState.DRAINED}.get(view.state)
        if nxt is not None:
            world.set(rid, nxt)


def run(kind: str, db: Path, restart_at: int | None, rounds: int = 25) -> tuple[Deployment, list, list]:
    """Drive a rollout to its end, saving after every tick; at `restart_at`, drop the daemon's objects and
    carry on from what the file holds (the workers, and so the replicas, outlive the daemon)."""
    store = Store(db, durable=False)  # a restart here is a process restart: fsync plays no part
    dep = Deployment(CHAT)
    world = World(dep)
    world.stats = {"v1": GOOD, "v2": GOOD}
    begin_rollout(dep, kind, VersionSpec("v2", "/m/2", 3), 0.0, "r1", {"dwell_s": 60, "min_requests": 10}
                  if kind == "canary" else None)
    store.save(dep)
    seen = []
    for i in range(rounds):
        if i == restart_at:
            store.close()
            store = Store(db, durable=False)
            world.dep = store.load()["chat"]
        now = 1.0 + 30 * i
        if i in (3, 5):  # an operator's command is saved at once, like every change
            logs = world.command("pause" if i == 3 else "resume", now)
            store.save(world.dep, logs, now)
            seen += logs
        actions = world.tick(now)
        seen += actions
        if actions:  # the machines change nothing without saying so in an action
            store.save(world.dep, [a for a in actions if isinstance(a, Log)], now)
        progress_world(world)
    decisions = store.decisions("chat", limit=1000)
    store.close()
    return world.dep, seen, decisions


# restart rounds inside each run (rolling ends at round 7, canary at 15), one of them while paused
@pytest.mark.parametrize("kind, restart_at", [("rolling", 1), ("rolling", 2), ("rolling", 4), ("rolling", 6),
                                              ("canary", 2), ("canary", 4), ("canary", 7), ("canary", 12)])
def test_a_restart_mid_rollout_ends_where_an_uninterrupted_run_ends(tmp_path, kind, restart_at):
    straight = run(kind, tmp_path / "a.db", None)
    restarted = run(kind, tmp_path / "b.db", restart_at)
    assert straight[0].rollout is not None and straight[0].rollout.state is RolloutState.SUCCEEDED
    assert restarted[0] == straight[0]  # the spec and every field of the machine
    assert restarted[1] == straight[1]  # the same actions, in the same order
    assert restarted[2] == straight[2]  # the same decision log
    assert straight[0].spec.versions == (VersionSpec("v2", "/m/2", 3, 100),)
