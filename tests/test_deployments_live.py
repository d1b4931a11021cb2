"""Deployments with real processes: a rolling update under load with zero failures, a canary of a bad
version rolled back automatically while the stable version serves, sticky A/B arms, the admin API and
CLI, and a daemon restart in the middle of a rollout (resumed from its SQLite state)."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server import ADMIN, ADMIN_KEY, ROOT, NimbusServer, wait_for
from tiny_models import make_tiny_smollm2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    """Two checkpoint folders (two versions of one model: same weights, different paths)."""
    root = tmp_path_factory.mktemp("versions")
    one = make_tiny_smollm2(root / "tiny-v1")
    two = root / "tiny-v2"
    shutil.copytree(one, two)
    return str(one), str(two)


def config(*deployments: str, extra: str = "", control: str = "") -> str:
    """Fast control rounds and heartbeats; `extra` goes in [workers], `control` in [control]."""
    return (f"[control]\ninterval_s = 0.2\n{control}\n[workers]\nkv_cache_memory = \"64MiB\"\n"
            "heartbeat_interval_s = 0.5\nheartbeat_timeout_s = 3.0\n" + extra + "\n" + "\n".join(deployments))


def deployment(name: str, *versions: tuple[str, str, int, float]) -> str:
    text = f'[[deployments]]\nname = "{name}"\n'
    for version, model, replicas, weight in versions:
        text += (f'[[deployments.versions]]\nversion = "{version}"\nmodel = "{model}"\nreplicas = {replicas}\n'
                 f"weight = {weight}\n")
    return text


def admin(server: NimbusServer, method: str, path: str, body: object = None) -> httpx.Response:
    return httpx.request(method, server.url + path, headers=ADMIN, json=body, timeout=30)


def nimbus(server: NimbusServer, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args, "--url", server.url, "--admin-key", ADMIN_KEY],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def stream_completed(text: str) -> bool:
    """An SSE body that ends with [DONE] and holds no error event (a stream that fails after its headers sends an
    event with a top-level "error" key). Parsed, not searched: a generated token may well read "error"."""
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return False
    return not any("error" in json.loads(e) for e in events[:-1])


class Load:
    """Steady traffic from a few client threads; every response's status and x-nimbus-version kept."""

    def __init__(self, url: str, model: str, clients: int = 3, max_tokens: int = 6,
                 headers: dict[str, str] | None = None) -> None:
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.headers = headers or {}
        self.results: list[tuple[float, int, str, str]] = []  # (time, status, version, error text)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=60) as http:
            n = 0
            while not self.stop.is_set():
                n += 1
                body = {"model": self.model, "prompt": f"client {i} request {n}: tell me", "max_tokens": self.max_tokens,
                        "ignore_eos": True, "stream": n % 2 == 0}
                try:
                    r = http.post(self.url + "/v1/completions", json=body, headers=self.headers)
                    ok = r.status_code == 200 and (not body["stream"] or stream_completed(r.text))
                    self.results.append((time.monotonic(), r.status_code if ok else 599,
                                         r.headers.get("x-nimbus-version", ""), "" if ok else r.text[-600:]))
                except httpx.HTTPError as exc:
                    self.results.append((time.monotonic(), 0, "", repr(exc)))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def failures(self) -> list[tuple[float, int, str, str]]:
        return [r for r in self.results if r[1] != 200]


def test_rolling_update_under_load_fails_no_request(tmp_path, models):
    v1, v2 = models
    cfg = config(deployment("chat", ("v1", v1, 2, 100)))
    with NimbusServer(v1, workers=2, config=cfg, tmp=tmp_path) as server:
        assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == ["chat"]
        with Load(server.url, "chat") as load:
            wait_for(lambda: len(load.results) >= 6, 60, "traffic before the rollout")
            out = nimbus(server, "rollout", "start", "chat", "--version", "v2", "--model", v2, "--replicas", "2")
            assert out.returncode == 0, out.stderr
            assert "rolling v1 -> v2" in out.stdout
            done = wait_for(lambda: (d := admin(server, "GET", "/admin/deployments/chat").json())["rollout"]["state"]
                            in ("succeeded", "paused", "rolling_back") and d, 150, "the rolling update")
            assert done["rollout"]["state"] == "succeeded", (done, server.log())
            finished = time.monotonic()
            wait_for(lambda: sum(1 for r in load.results if r[0] > finished + 1.0) >= 6, 60, "traffic after")
        assert load.failures() == [], load.failures()[:5]
        versions = [r[2] for r in load.results]
        assert versions[0] == "v1" and versions[-1] == "v2" and set(versions) == {"v1", "v2"}
        after = [r[2] for r in load.results if r[0] > finished + 1.0]
        assert after and set(after) == {"v2"}
        assert [(v["version"], v["replicas"], v["replicas_up"]) for v in done["versions"]] == [("v2", 2, 2)]
        # the last v1 replica may still be finishing its requests when the update succeeds; then it goes
        wait_for(lambda: sorted((r["version"], r["state"]) for r in
                                admin(server, "GET", "/admin/deployments/chat").json()["replicas"])
                 == [("v2", "up"), ("v2", "up")], 30, "the old replicas released")
        # capacity never dropped: every shift kept two replicas up; each decision says so in numbers
        shifts = [d for d in done["decisions"] if d["decision"].startswith("shift")]
        assert shifts and all(sum(d["numbers"]["up"].values()) >= 2 for d in shifts), shifts
        listing = nimbus(server, "deployments", "list")
        assert listing.returncode == 0 and "chat" in listing.stdout and "2/2" in listing.stdout, listing
        # the surge worker started for the update is retired once it is a spare beyond the planned two
        wait_for(lambda: len([w for w in server.admin()["workers"] if w["state"] == "up"]) == 2, 30,
                 "the spare worker retired")


def test_canary_of_a_failing_version_rolls_back_and_stable_serves(tmp_path, models):
    v1, v2 = models
    cfg = config(deployment("chat", ("v1", v1, 1, 100)), extra="max_extra = 1\n")
    with NimbusServer(v1, workers=1, config=cfg, tmp=tmp_path) as server:
        body = {"kind": "canary", "version": {"version": "v2", "model": v2, "replicas": 1, "fault": "error-rate=1"},
                "policy": {"steps": [50, 100], "dwell_s": 60, "min_requests": 4, "slo": {"max_error_rate": 0.2}}}
        with Load(server.url, "chat", clients=2) as load:
            wait_for(lambda: len(load.results) >= 4, 60, "traffic before the canary")
            r = admin(server, "POST", "/admin/deployments/chat/rollouts", body)
            assert r.status_code == 200, r.text
            started = time.monotonic()
            done = wait_for(lambda: (d := admin(server, "GET", "/admin/deployments/chat").json())["rollout"]["state"]
                            not in ("pending", "running") and d, 150, "the canary's verdict")
            rolled_back = time.monotonic()
            wait_for(lambda: sum(1 for x in load.results if x[0] > rolled_back + 1.0) >= 6, 60, "traffic after")
        assert done["rollout"]["state"] == "rolled_back", done
        decision = next(d for d in done["decisions"] if d["decision"].startswith("rollback"))
        assert decision["numbers"]["canary"]["error_rate"] > 0.2, decision
        assert any("error_rate" in b for b in decision["numbers"]["breaches"])
        weights = {v["version"]: v["weight"] for v in done["versions"]}
        assert weights.get("v2", 0) == 0 and weights["v1"] > 0  # rolled back: weight 0, then removed
        # the stable version served throughout; only requests sent to the canary failed, and none after
        assert all(status == 200 for _, status, version, _ in load.results if version == "v1")
        assert any(version == "v2" for _, _, version, _ in load.results)
        failed = [x for x in load.failures() if x[0] > started]
        assert failed and all(x[2] == "v2" for x in failed), load.failures()[:5]
        late = [x for x in load.results if x[0] > rolled_back + 1.0]
        assert late and all(x[1] == 200 and x[2] == "v1" for x in late)
        wait_for(lambda: [(x["version"], x["state"]) for x in
                          admin(server, "GET", "/admin/deployments/chat").json()["replicas"]] == [("v1", "up")],
                 30, "the canary's replica released")
        status = nimbus(server, "rollout", "status", "chat")
        assert status.returncode == 0 and "rolled_back" in status.stdout and "rollback: SLO breached" in status.stdout


def test_sticky_ab_split_and_several_deployments(tmp_path, models):
    v1, v2 = models
    cfg = config(deployment("ab", ("a", v1, 1, 50), ("b", v2, 1, 50)), deployment("solo", ("only", v1, 1, 100)))
    with NimbusServer(v1, workers=3, config=cfg, tmp=tmp_path) as server, httpx.Client(timeout=30) as http:
        ids = [m["id"] for m in http.get(server.url + "/v1/models").json()["data"]]
        assert ids == ["ab", "solo"]
        seen: dict[str, set[str]] = collections.defaultdict(set)
        for round_ in range(3):
            for k in range(16):
                body = {"model": "ab", "prompt": "Hi", "max_tokens": 2, "stream": round_ == 1}
                if k % 2:
                    r = http.post(server.url + "/v1/completions", json=body,
                                  headers={"x-nimbus-variant-key": f"key-{k}"})
                else:
                    r = http.post(server.url + "/v1/completions", json={**body, "user": f"key-{k}"})
                assert r.status_code == 200, r.text
                seen[f"key-{k}"].add(r.headers["x-nimbus-version"])
        assert all(len(v) == 1 for v in seen.values()), seen  # each key always on one arm
        arms = collections.Counter(next(iter(v)) for v in seen.values())
        assert set(arms) == {"a", "b"}, arms  # 16 keys at 50/50: both arms get some (1 in 2^15 to fail)
        r = http.post(server.url + "/v1/completions", json={"model": "solo", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-nimbus-version"] == "only"
        r = http.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "Hi"})
        assert r.status_code == 404 and "'ab', 'solo'" in r.json()["error"]["message"]
        metrics = http.get(server.url + "/metrics", headers=ADMIN).text
        for arm in arms:
            assert f'nimbus_requests_total{{deployment="ab",status="length",version="{arm}"}}' in metrics
        assert 'nimbus_requests_total{deployment="solo",status="length",version="only"}' in metrics


def test_admin_api_validates_and_edits_at_run_time(tmp_path, models):
    v1, v2 = models
    cfg = config(deployment("chat", ("v1", v1, 1, 100)), extra="max_extra = 1\n")
    with NimbusServer(v1, workers=1, config=cfg, tmp=tmp_path) as server:
        assert admin(server, "GET", "/admin/deployments/none").status_code == 404
        r = httpx.get(server.url + "/admin/deployments", timeout=10)
        assert r.status_code in (401, 403)  # the admin key is required
        bad = admin(server, "POST", "/admin/deployments", {"name": "x", "versions": [{"version": "v", "model": v1,
                                                                                      "replicas": 0}]})
        assert bad.status_code == 400 and "weight" in bad.json()["error"]["message"]
        bad = admin(server, "POST", "/admin/deployments", {"name": "x", "versions": [{"version": "v",
                                                                                      "model": "/no/such/model"}]})
        assert bad.status_code == 400 and "/no/such/model" in bad.json()["error"]["message"]
        dup = admin(server, "POST", "/admin/deployments", {"name": "chat", "versions": [{"version": "v", "model": v1}]})
        assert dup.status_code == 409
        assert admin(server, "POST", "/admin/deployments/chat/rollout/pause").status_code == 409  # no rollout
        # a new deployment at run time: it gets a worker (a second local one) and serves
        r = admin(server, "POST", "/admin/deployments", {"name": "second", "versions": [{"version": "s1", "model": v2}]})
        assert r.status_code == 200, r.text
        wait_for(lambda: httpx.get(server.url + "/ready").status_code == 200, 60, "the new deployment up")
        r = httpx.post(server.url + "/v1/completions", json={"model": "second", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-nimbus-version"] == "s1"
        # a checkpoint change is a rollout, not an edit
        r = admin(server, "PUT", "/admin/deployments/second", {"versions": [{"version": "s1", "model": v1}]})
        assert r.status_code == 400 and "rollout" in r.json()["error"]["message"]
        r = admin(server, "DELETE", "/admin/deployments/second")
        assert r.status_code == 200
        r = httpx.post(server.url + "/v1/completions", json={"model": "second", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 404
        assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == ["chat"]


def test_restart_mid_rollout_resumes_from_the_state_database(tmp_path, models):
    v1, v2 = models
    db = tmp_path / "state.db"
    cfg = config(deployment("chat", ("v1", v1, 1, 100)), extra="max_extra = 1\n", control=f'state_db = "{db}"')
    body = {"kind": "canary", "version": {"version": "v2", "model": v2, "replicas": 1},
            "policy": {"steps": [25, 100], "dwell_s": 3600, "min_requests": 1000}}
    with NimbusServer(v1, workers=1, config=cfg, tmp=tmp_path) as server:
        assert admin(server, "POST", "/admin/deployments/chat/rollouts", body).status_code == 200
        before = wait_for(lambda: (d := admin(server, "GET", "/admin/deployments/chat").json())["rollout"]
                          ["weight_percent"] == 25 and d, 60, "the canary's first step")
        assert nimbus(server, "rollout", "pause", "chat").returncode == 0
    with NimbusServer(v1, workers=1, config=cfg, tmp=tmp_path) as server:
        after = wait_for(lambda: (d := admin(server, "GET", "/admin/deployments/chat").json())["replicas"]
                         and all(r["state"] == "up" for r in d["replicas"]) and len(d["replicas"]) == 2 and d,
                         90, "both versions' replicas back")
        assert after["rollout"]["id"] == before["rollout"]["id"]
        assert after["rollout"]["state"] == "paused" and after["rollout"]["weight_percent"] == 25
        assert {v["version"]: v["weight"] for v in after["versions"]} == \
            {v["version"]: v["weight"] for v in before["versions"]}
        assert any(d["decision"] == "paused by operator" for d in after["decisions"])
        out = nimbus(server, "rollout", "abort", "chat")
        assert out.returncode == 0 and "aborted" in out.stdout
        r = nimbus(server, "rollout", "abort", "chat")
        assert r.returncode == 1 and "409" in r.stderr
    assert Path(db).exists()
