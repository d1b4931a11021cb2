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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NimbusServer:
    def __init__(self, model: str | Path, workers: int = 1, config: str = "", tmp: Path | None = None,
                 extra_args: tuple[str, ...] = (), startup_timeout: float = 120.0) -> None:
        self.port = free_port()
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
        cfg.write_text(self.config_text + f'\n[workers]\nruntime_dir = "{self.tmp}/run"\n'
                       if "[workers]" not in self.config_text else self.config_text)
        self.log_path = self.tmp / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "daemon.cli", "serve", self.model, "--port", str(self.port),
               "--workers", str(self.workers), "--config", str(cfg), *self.extra_args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nimbus serve exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(self.url + "/ready", timeout=2)
                if r.status_code == 200 and r.json()["replicas"] >= self.workers:
                    return self
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"nimbus serve not ready in {self.startup_timeout}s:\n{self.log()}")

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
