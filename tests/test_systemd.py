"""systemd integration: sd_notify against real datagram sockets, the watchdog loop, the unit files, and
`nimbus serve` under a NOTIFY_SOCKET the test owns (the end-to-end test at the bottom)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server import ROOT, free_port

from daemon.systemd import notify, watchdog_interval, watchdog_loop

UNITS = ROOT / "systemd"
INSTALLED_NIMBUS = "/opt/nimbus/.venv/bin/nimbus"  # where systemd/README.md installs it


class NotifyListener:
    """Plays systemd's side: a bound unix datagram socket that also learns each sender's pid.

    `name` is a filesystem path or an abstract '@name', exactly as it goes into $NOTIFY_SOCKET.
    SO_PASSCRED makes the kernel attach the sender's credentials, which is how systemd enforces
    NotifyAccess=main; `receive` returns them with the message.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + name[1:] if name.startswith("@") else name)

    def receive(self, timeout: float) -> tuple[int, list[str]] | None:
        """(sender pid, its assignments) of the next datagram, or None if none comes within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        except TimeoutError:
            return None
        pid = next(struct.unpack("3i", d)[0] for level, kind, d in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        return pid, data.decode().split("\n")

    def drain(self) -> list[tuple[int, list[str]]]:
        """Every datagram already queued, without waiting."""
        out = []
        while (msg := self.receive(0.001)) is not None:
            out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path, monkeypatch) -> Iterator[NotifyListener]:
    name = str(tmp_path / "notify.sock") if request.param == "path" else f"@nimbus-test-{uuid.uuid4().hex}"
    lis = NotifyListener(name)
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    yield lis
    lis.close()


# -- notify ----------------------------------------------------------------------------------------

def test_notify_sends_one_datagram_with_every_state(listener):
    assert notify("READY=1", "STATUS=serving 2 workers") is True
    pid, states = listener.receive(2)
    assert pid == os.getpid()
    assert states == ["READY=1", "STATUS=serving 2 workers"]
    assert listener.receive(0.05) is None  # one datagram, not two


def test_notify_keeps_a_newline_from_splitting_a_state(listener):
    assert notify("STATUS=line one\nREADY=1")
    assert listener.receive(2)[1] == ["STATUS=line one READY=1"]


def test_notify_without_notify_socket_does_nothing(listener, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify("READY=1") is False
    assert listener.receive(0.05) is None


def test_notify_send_errors_are_logged_not_raised(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="nimbus.systemd")
    for target in (str(tmp_path / "nobody-listens.sock"), "@nimbus-nobody-" + uuid.uuid4().hex, "relative.sock"):
        monkeypatch.setenv("NOTIFY_SOCKET", target)
        assert notify("WATCHDOG=1") is False
    assert len([r for r in caplog.records if "sd_notify WATCHDOG" in r.getMessage()]) == 3


# -- watchdog_interval -----------------------------------------------------------------------------

@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("2000000", None, 1.0),
    ("30000000", "self", 15.0),
    ("2000000", "other", None),  # meant for our parent: a local worker inherits the environment
    (None, None, None),
    ("0", None, None),
    ("soon", None, None),
])
def test_watchdog_interval_is_half_the_timeout_for_our_pid(monkeypatch, usec, pid, expected):
    for name, value in (("WATCHDOG_USEC", usec),
                        ("WATCHDOG_PID", {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid))):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert watchdog_interval() == expected


# -- watchdog_loop ---------------------------------------------------------------------------------

def test_watchdog_loop_pings_while_healthy_and_withholds_when_not(listener):
    healthy = True

    def check() -> bool:
        if healthy is None:
            raise RuntimeError("health check broke")
        return healthy

    async def scenario() -> list[int]:
        nonlocal healthy
        counts = []
        task = asyncio.create_task(watchdog_loop(0.05, check))
        for state in (True, False, None, True):  # healthy, unhealthy, check raising, recovered
            healthy = state
            await asyncio.sleep(0.02)  # a ping already in flight for the previous state
            listener.drain()
            await asyncio.sleep(0.5)
            counts.append(len(listener.drain()))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return counts

    counts = asyncio.run(scenario())
    assert 3 <= counts[0] <= 12, counts  # every 0.05 s over 0.5 s: 10, fewer on a loaded machine
    assert counts[1] == 0 and counts[2] == 0, counts
    assert 3 <= counts[3] <= 12, counts
    assert listener.drain() == []  # cancelled: silent


# -- the unit files --------------------------------------------------------------------------------

def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if (m := re.match(r"^([A-Za-z]+)=(.*)$", line.strip())):
            settings.setdefault(m[1], []).append(m[2])
    return settings


def test_daemon_unit_keeps_workers_across_a_crash():
    unit = unit_settings(UNITS / "nimbus-daemon.service")
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["KillMode"] == ["process"]  # workers outlive a daemon crash and are re-adopted
    assert unit["RuntimeDirectory"] == ["nimbus"] and unit["RuntimeDirectoryPreserve"] == ["yes"]
    assert unit["Restart"] == ["on-failure"] and unit["WatchdogSec"] == ["30"]
    assert unit["ExecStart"] == [f"{INSTALLED_NIMBUS} serve --config /etc/nimbus/nimbus.toml"]
    assert "DynamicUser" not in unit and unit["User"] == ["nimbus"]


def test_worker_unit_is_one_instance_per_gpu():
    unit = unit_settings(UNITS / "nimbus-worker@.service")
    assert unit["ExecStart"] == [f"{INSTALLED_NIMBUS} worker --connect ${{NIMBUS_HEAD}} --idle --device cuda:%i "
                                 "--keys /etc/nimbus/keys"]
    assert unit["EnvironmentFile"] == ["/etc/nimbus/worker.env"] and unit["Restart"] == ["always"]


def nimbus_executable(tmp_path: Path) -> Path:
    """The venv's real `nimbus` script, else a stub (verify only checks that ExecStart is executable)."""
    real = Path(sys.executable).parent / "nimbus"
    if os.access(real, os.X_OK):
        return real
    stub = tmp_path / "bin" / "nimbus"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return stub


@pytest.mark.parametrize(("template", "instance"), [
    ("nimbus-daemon.service", "nimbus-daemon.service"),
    ("nimbus-worker@.service", "nimbus-worker@.service"),
    ("nimbus-worker@.service", "nimbus-worker@0.service"),
])
def test_unit_passes_systemd_analyze_verify(tmp_path, template, instance):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt install systemd)")
    # verify insists that ExecStart's binary exists: point it at this checkout's instead of /opt's
    text = (UNITS / template).read_text()
    assert INSTALLED_NIMBUS in text
    (tmp_path / template).write_text(text.replace(INSTALLED_NIMBUS, str(nimbus_executable(tmp_path))))
    result = subprocess.run([analyze, "verify", str(tmp_path / instance)], capture_output=True, text=True,
                            timeout=60)
    output = result.stdout + result.stderr
    # verify exits 0 even for unknown keys, so the clean result is also: no line about our unit
    about_ours = [line for line in output.splitlines() if "nimbus" in line or str(tmp_path) in line]
    assert result.returncode == 0, output
    assert about_ours == [], output


# -- end to end: `nimbus serve` under a NOTIFY_SOCKET ------------------------------------------------

E2E_CONFIG = """
[scheduler]
max_num_batched_tokens = 512
[workers]
kv_cache_memory = "512MiB"
runtime_dir = "{run}"
"""


def wait_for(listener: NotifyListener, proc: subprocess.Popen, state: str, timeout: float,
             seen: list[tuple[int, str]]) -> bool:
    """Collect datagrams into `seen` (pid, assignment) until `state` arrives; False on timeout or exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = listener.receive(0.2)
        if msg is not None:
            seen.extend((msg[0], s) for s in msg[1])
            if state in msg[1]:
                return True
        elif proc.poll() is not None:
            return False
    return False


def ready_over_http(port: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2)
        return r.status_code == 200 and r.json()["replicas"] >= 1
    return False


def wait_for_ready(listener: NotifyListener, proc: subprocess.Popen, port: int, seen: list[tuple[int, str]],
                   timeout: float = 180.0, grace: float = 10.0) -> str | None:
    """Wait for READY=1; None when it came after /ready said 200, else what went wrong.

    Fails fast: once /ready is 200, READY=1 must follow within `grace` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if wait_for(listener, proc, "READY=1", 0.5, seen):
            return None if ready_over_http(port) else "READY=1 came before /ready said 200"
        if proc.poll() is not None:
            return f"nimbus serve exited with {proc.returncode} before READY=1"
        if ready_over_http(port):
            deadline = min(deadline, time.monotonic() + grace)
    return "no READY=1 (is daemon/serve.py wired to daemon.systemd?)"


@pytest.mark.slow
def test_serve_speaks_sd_notify_end_to_end(tmp_path):
    """END TO END: needs daemon/serve.py wired to daemon.systemd (see systemd/README.md, "What the
    daemon tells systemd"); until then it fails at READY=1.

    Runs `nimbus serve` with one worker on the default model as systemd would: NOTIFY_SOCKET names a
    socket this test bound, WATCHDOG_USEC=2 s. Expects READY=1 only once /ready is 200 (a worker is
    registered and HTTP listens), WATCHDOG=1 about every second, STOPPING=1 on SIGTERM, then exit 0,
    and every datagram from the daemon's own pid (what NotifyAccess=main enforces).
    """
    from daemon.models import pull

    folder = pull()
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    config = tmp_path / "nimbus.toml"
    config.write_text(E2E_CONFIG.format(run=tmp_path / "run"))
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "2000000"}
    env.pop("WATCHDOG_PID", None)
    log_path = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "daemon.cli", "serve", str(folder), "--port", str(port), "--workers", "1",
           "--config", str(config)]
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    seen: list[tuple[int, str]] = []

    def log() -> str:
        return f"datagrams: {seen}\n--- serve log ---\n{log_path.read_text()[-5000:]}"

    try:
        problem = wait_for_ready(listener, proc, port, seen)
        assert problem is None, f"{problem}\n{log()}"

        time.sleep(3.5)
        seen.extend((pid, s) for pid, states in listener.drain() for s in states)
        pings = [s for _, s in seen[seen.index((proc.pid, "READY=1")):] if s == "WATCHDOG=1"]
        assert len(pings) >= 2, f"expected a WATCHDOG=1 about every second\n{log()}"

        proc.send_signal(signal.SIGTERM)
        assert wait_for(listener, proc, "STOPPING=1", 30, seen), f"no STOPPING=1 after SIGTERM\n{log()}"
        assert proc.wait(timeout=90) == 0, log()
        assert {pid for pid, _ in seen} == {proc.pid}, f"a process other than the daemon notified\n{log()}"
        assert [s for _, s in seen].count("READY=1") == 1, log()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        listener.close()
