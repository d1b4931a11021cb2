"""A worker on "another host": two network namespaces joined by a veth pair, the daemon in one, workers
in the other attaching over TCP with CURVE. Needs root and `ip netns` (CI runs as root); skips otherwise.

The addresses (a /30 in 10.231.0.0) exist only inside the test's own namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from server import ADMIN_KEY, ROOT, free_port
from test_curve import make_keys

NS1_ADDR, NS2_ADDR = "10.231.0.1", "10.231.0.2"

# runs inside the daemon's namespace, where its HTTP port lives on 127.0.0.1
PROBE = """
import json, sys, time, httpx
url, admin, action, arg, timeout = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
deadline = time.monotonic() + timeout
def workers():
    r = httpx.get(url + "/admin/workers", headers={"Authorization": "Bearer " + admin}, timeout=5)
    return {w["id"]: w["state"] for w in r.json()["workers"]}
while True:
    try:
        if action == "health":
            out = httpx.get(url + "/health", timeout=2).json()
        elif action == "workers":
            out = workers()
            if arg and arg not in out:
                raise LookupError(arg)
        else:
            body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 4}
            r = httpx.post(url + "/v1/completions", json=body, timeout=30)
            out = {"status": r.status_code, "body": r.json()}
        print(json.dumps(out))
        break
    except (httpx.HTTPError, LookupError, ValueError) as exc:
        if time.monotonic() > deadline:
            print(json.dumps({"timeout": repr(exc)}))
            break
        time.sleep(0.3)
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def _netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs the suite as root)"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    probe = f"nimbus-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def namespaces():
    """(daemon namespace, worker namespace), joined by a veth pair; deleted afterwards."""
    if (reason := _netns_unavailable()) is not None:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    ns1, ns2 = f"nimbus-head-{tag}", f"nimbus-wrk-{tag}"
    made: list[str] = []
    try:
        for ns in (ns1, ns2):
            _ip("netns", "add", ns)
            made.append(ns)
        veth = _ip("link", "add", f"nh{tag}", "netns", ns1, "type", "veth", "peer", "name", f"nw{tag}",
                   "netns", ns2, check=False)
        if veth.returncode != 0:
            pytest.skip(f"cannot create a veth pair here: {veth.stderr.strip()}")
        for ns, dev, addr in ((ns1, f"nh{tag}", NS1_ADDR), (ns2, f"nw{tag}", NS2_ADDR)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield ns1, ns2
    finally:
        for ns in made:  # the veth pair goes with its namespaces
            _ip("netns", "del", ns, check=False)


def _in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def _probe(ns: str, url: str, action: str, arg: str = "", timeout: float = 30) -> dict:
    out = subprocess.run(_in_ns(ns, sys.executable, "-c", PROBE, url, ADMIN_KEY, action, arg, str(timeout)),
                         capture_output=True, text=True, timeout=timeout + 30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_worker_in_another_namespace_attaches_over_curve(namespaces, tmp_path):
    from daemon.models import pull

    ns1, ns2 = namespaces
    model = pull()
    folders = make_keys(tmp_path / "keys")
    port, http_port = free_port(), free_port()  # free on the host: the namespaces start empty anyway
    address = f"tcp://{NS1_ADDR}:{port}"
    config = tmp_path / "nimbus.toml"
    config.write_text(f'[server]\nadmin_keys = ["{ADMIN_KEY}"]\n[workers]\ndevice = "cpu"\nnull_model = true\n'
                      f'runtime_dir = "{tmp_path}/run"\nbind = "{address}"\nkeys_dir = "{folders["server"]}"\n')
    url = f"http://127.0.0.1:{http_port}"
    procs: list[subprocess.Popen] = []

    def start(ns: str, name: str, *args: str) -> None:
        log = (tmp_path / f"{name}.log").open("w")
        procs.append(subprocess.Popen(_in_ns(ns, sys.executable, "-m", "daemon.cli", *args), cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))

    try:
        start(ns1, "daemon", "serve", str(model), "--port", str(http_port), "--workers", "0",
              "--config", str(config))
        assert _probe(ns1, url, "health", timeout=60) == {"status": "ok"}, logs()
        worker = ("worker", "--connect", address, "--model", str(model), "--null-model", "--orphan-timeout", "60")
        start(ns2, "good", *worker, "--worker-id", "netns-good", "--keys", str(folders["good"]))
        start(ns2, "stranger", *worker, "--worker-id", "netns-stranger", "--keys", str(folders["stranger"]))
        assert "netns-good" in _probe(ns1, url, "workers", "netns-good", timeout=60), logs()
        # garbage from the worker's namespace at the worker port: dropped, the daemon goes on
        garbage = f"import os, socket; socket.create_connection(('{NS1_ADDR}', {port}), timeout=5).sendall(os.urandom(50000))"
        subprocess.run(_in_ns(ns2, sys.executable, "-c", garbage), check=True, timeout=30)
        time.sleep(3)  # the stranger has had several seconds more than the good worker needed
        assert _probe(ns1, url, "workers") == {"netns-good": "up"}, logs()
        done = _probe(ns1, url, "complete")
        assert done["status"] == 200 and done["body"]["usage"]["completion_tokens"] == 4, (done, logs())
        assert "refused this worker's key" in (tmp_path / "stranger.log").read_text()
        assert all(p.poll() is None for p in procs), logs()
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def test_skip_reason_is_clear_when_unprivileged(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in _netns_unavailable()
