"""Deployments' durable state in an embedded SQLite file: specs, rollouts (their whole machine, as JSON) and
the decision log, so a daemon restart resumes exactly where it was, mid-rollout included."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.deployments import DeploymentSpec, Log, VersionSpec
from daemon.rollouts import Deployment, rollout_from_dict

SCHEMA_VERSION = 2  # 2: versions.fault
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL,              -- order of /v1/models
    min_replicas INTEGER,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    version TEXT NOT NULL,
    position INTEGER NOT NULL,              -- order within the deployment (routing's stable order)
    model TEXT NOT NULL,
    replicas INTEGER NOT NULL,
    weight REAL NOT NULL,
    max_model_len INTEGER,
    dtype TEXT,
    fault TEXT,
    PRIMARY KEY (deployment, version)
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    machine TEXT NOT NULL                   -- Rollout.to_dict() as JSON: all it needs to resume
);
CREATE INDEX IF NOT EXISTS rollouts_by_deployment ON rollouts (deployment, created_at);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    rollout_id TEXT,
    at REAL NOT NULL,
    decision TEXT NOT NULL,
    numbers TEXT NOT NULL                   -- JSON
);
CREATE INDEX IF NOT EXISTS decisions_by_deployment ON decisions (deployment, id);
"""


def default_db_path(env: Mapping[str, str] = os.environ) -> Path:
    """$STATE_DIRECTORY/nimbus.db under systemd (StateDirectory=nimbus: /var/lib/nimbus), else
    $XDG_STATE_HOME/nimbus/nimbus.db, else ~/.local/state/nimbus/nimbus.db."""
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0]) / "nimbus.db"  # systemd may list several
    base = Path(env["XDG_STATE_HOME"]) if env.get("XDG_STATE_HOME") else Path.home() / ".local" / "state"
    return base / "nimbus" / "nimbus.db"


@dataclass(frozen=True, slots=True)
class StoreConfig:
    path: str | None = None  # default: default_db_path()

    def resolve(self) -> Path:
        return Path(self.path).expanduser() if self.path else default_db_path()


class StoreError(RuntimeError):
    """The state file cannot be opened, or was written by a newer Nimbus."""


class Store:
    """One SQLite file. Every `save` is one transaction, so a crash leaves the last whole state.
    Safe to call from one worker thread (asyncio.to_thread) while the loop reads: calls are serialised."""

    def __init__(self, path: str | os.PathLike[str], durable: bool = True) -> None:
        """`durable=False` skips fsync: for tests and throwaway state, never for a daemon's own file."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            # writes are rare (a rollout step, an admin command); each must survive a power loss
            self._db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'OFF'}")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state database {self.path}: {exc}") from None
        self._lock = threading.Lock()
        self._check_schema()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _check_schema(self) -> None:
        with self._transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema {row[0]}; this Nimbus knows up to {SCHEMA_VERSION}")
            elif int(row[0]) < 2:
                db.execute("ALTER TABLE versions ADD COLUMN fault TEXT")
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def save(self, dep: Deployment, decisions: Iterable[Log] = (), now: float = 0.0) -> None:
        """Write one deployment (spec and rollout) and append `decisions`, all or nothing."""
        spec, rollout = dep.spec, dep.rollout
        with self._transaction() as db:
            db.execute("INSERT INTO deployments VALUES (?, (SELECT COALESCE(MAX(position) + 1, 0) FROM deployments), ?, ?)"
                       " ON CONFLICT (name) DO UPDATE SET min_replicas = excluded.min_replicas,"
                       " updated_at = excluded.updated_at", (spec.name, spec.min_replicas, now))
            db.execute("DELETE FROM versions WHERE deployment = ?", (spec.name,))
            db.executemany("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(spec.name, v.version, i, v.model, v.replicas, v.weight, v.max_model_len, v.dtype,
                             v.fault)
                            for i, v in enumerate(spec.versions)])
            if rollout is not None:
                db.execute("INSERT INTO rollouts VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                           " state = excluded.state, updated_at = excluded.updated_at, machine = excluded.machine",
                           (rollout.id, spec.name, rollout.kind, str(rollout.state), rollout.created_at,
                            rollout.updated_at, json.dumps(rollout.to_dict())))
            db.executemany("INSERT INTO decisions (deployment, rollout_id, at, decision, numbers) VALUES (?, ?, ?, ?, ?)",
                           [(spec.name, rollout.id if rollout else None, d.at, d.decision, json.dumps(d.numbers))
                            for d in decisions])

    def load(self) -> dict[str, Deployment]:
        """Every deployment, in the order first saved, each with its latest rollout."""
        with self._transaction() as db:
            names = [r[0] for r in db.execute("SELECT name FROM deployments ORDER BY position")]
            return {name: self._load_one(db, name) for name in names}

    def _load_one(self, db: sqlite3.Connection, name: str) -> Deployment:
        (min_replicas,) = db.execute("SELECT min_replicas FROM deployments WHERE name = ?", (name,)).fetchone()
        rows = db.execute("SELECT version, model, replicas, weight, max_model_len, dtype, fault FROM versions"
                          " WHERE deployment = ? ORDER BY position", (name,))
        spec = DeploymentSpec(name, tuple(VersionSpec(*row) for row in rows), min_replicas)
        row = db.execute("SELECT machine FROM rollouts WHERE deployment = ? ORDER BY created_at DESC, rowid DESC"
                         " LIMIT 1", (name,)).fetchone()
        return Deployment(spec, rollout_from_dict(json.loads(row[0])) if row else None)

    def delete(self, name: str) -> None:
        """Forget a deployment, its rollouts and its decisions."""
        with self._transaction() as db:
            db.execute("DELETE FROM deployments WHERE name = ?", (name,))

    def decisions(self, deployment: str, limit: int = 50) -> list[dict[str, Any]]:
        """The newest `limit` decisions of a deployment, newest first (for /admin/deployments)."""
        with self._transaction() as db:
            rows = db.execute("SELECT rollout_id, at, decision, numbers FROM decisions WHERE deployment = ?"
                              " ORDER BY id DESC LIMIT ?", (deployment, limit)).fetchall()
        return [{"rollout_id": r[0], "at": r[1], "decision": r[2], "numbers": json.loads(r[3])} for r in rows]


def merge_config(configured: Sequence[DeploymentSpec],
                 stored: Mapping[str, Deployment]) -> tuple[dict[str, Deployment], list[str]]:
    """Start-up: the database wins for every deployment it holds (it carries run-time changes and any
    rollout); configured deployments it lacks are added after them. Also returns the names whose config
    differs from what is stored, to warn about: change a running deployment through the admin API."""
    merged = dict(stored)
    differs = [s.name for s in configured if s.name in stored and stored[s.name].spec != s]
    for spec in configured:
        merged.setdefault(spec.name, Deployment(spec))
    return merged, differs
