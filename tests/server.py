"""Starts a real `nimbus serve` process on loopback for integration tests, and always cleans it up."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "test-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def with_setting(config: str, section: str, line: str) -> str:
    """Adds `line` to [section] of a TOML text (creating the section), unless that key is already set."""
    key = line.split("=", 1)[0].strip()
    header = f"[{section}]"
    if header not in config:
        return f"{config}\n{header}\n{line}\n"
    head, _, rest = config.partition(header)
    body, nxt, tail = rest.partition("\n[")
    if any(ln.split("=", 1)[0].strip() == key for ln in body.splitlines()):
        return config
    return f"{head}{header}\n{line}{body}{nxt}{tail}"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Polls `predicate` until it returns something truthy (returned), or fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            assert value, f"timed out after {timeout}s waiting for {what}"
            return value
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NimbusServer:
    def __init__(self, model: str | Path, workers: int = 1, config: str = "", tmp: Path | None = None,
                 extra_args: tuple[str, ...] = (), startup_timeout: float = 120.0, port: int | None = None,
                 wait_ready: bool = True) -> None:
        self.wait_ready = wait_ready  # False: return once HTTP answers, workers or not
        self.port = port or free_port()
        self.model = str(model)
        self.workers = workers
        self.config_text = config
        self.tmp = tmp
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> NimbusServer:
        assert self.tmp is not None
        cfg = self.tmp / f"nimbus-{self.port}.toml"
        text = with_setting(self.config_text, "workers", f'runtime_dir = "{self.tmp}/run"')
        # each server its own state database: deployments saved by one test must not reach another
        text = with_setting(text, "control", f'state_db = "{self.tmp}/state-{self.port}.db"')
        cfg.write_text(with_setting(text, "server", f'admin_keys = ["{ADMIN_KEY}"]'))
        self.log_path = self.tmp / f"serve-{self.port}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "daemon.cli", "serve", self.model, "--port", str(self.port),
               "--workers", str(self.workers), "--config", str(cfg), *self.extra_args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nimbus serve exited with {self.proc.returncode}:\n{self.log()}")
            if self.ready() if self.wait_ready else self.alive():
                return self
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"nimbus serve not ready in {self.startup_timeout}s:\n{self.log()}")

    def alive(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        return False

    def ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = httpx.get(self.url + "/ready", timeout=2)
            return r.status_code == 200 and r.json()["replicas"] >= self.workers
        return False

    def admin(self, path: str = "/admin/workers") -> dict:
        r = httpx.get(self.url + path, headers=ADMIN, timeout=5)
        r.raise_for_status()
        return r.json()

    def workers_info(self) -> dict[str, dict]:
        return {w["id"]: w for w in self.admin()["workers"]}

    def log(self) -> str:
        return self.log_path.read_text()[-5000:] if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        # the whole session: the daemon and every worker it started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> NimbusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
