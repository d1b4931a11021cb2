"""Local worker processes: planning (devices, threads), starting, watching, restarting with backoff.

A worker that dies is restarted after 1, 2, 4, ... seconds; one that keeps dying soon after each start
is left down and reported as crash-looping. Workers left running by an earlier daemon (they outlive
it) are adopted instead of started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from daemon.config import WorkersConfig
from protocol.keys import local_keys_dir

log = logging.getLogger("nimbus.supervisor")
# a worker that dies within this many seconds of starting counts as a quick failure
QUICK_FAILURE_S = 60.0
MAX_BACKOFF_S = 30.0


def visible_gpus() -> int:
    """GPUs this host shows, without importing torch (the daemon never does)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    worker_id: str
    device: str
    threads: int | None


def plan_workers(config: WorkersConfig) -> list[WorkerSpec]:
    """One worker per visible GPU on a GPU host; on a CPU host `count` workers (default 1) sharing the cores."""
    device = config.device
    gpus = visible_gpus() if device in (None, "cuda") else 0
    if device and device.startswith("cuda:"):
        return [WorkerSpec(f"local-{i}", device, None) for i in range(config.count or 1)]
    if gpus and device != "cpu":
        return [WorkerSpec(f"local-{i}", f"cuda:{i % gpus}", None) for i in range(config.count or gpus)]
    count = 1 if config.count is None else config.count
    threads = config.threads or max(1, cpu_cores() // max(count, 1))
    return [WorkerSpec(f"local-{i}", "cpu", threads) for i in range(count)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Slot:
    spec: WorkerSpec
    pid: int | None = None
    proc: asyncio.subprocess.Process | None = None
    state: str = "starting"  # starting | running | backoff | crashloop | stopped
    started_at: float = 0.0
    restarts: int = 0
    quick_failures: int = 0
    last_exit: str = ""
    task: asyncio.Task | None = field(default=None, repr=False)


class LocalWorkers:
    """Starts, watches and restarts the daemon's own worker processes."""

    def __init__(self, config: WorkersConfig, address: str, on_exit: Callable[[str, str], None] | None = None,
                 log_format: str = "json", count: int | None = None) -> None:
        self.config = config
        self.log_format = log_format
        self.address = address
        self.on_exit = on_exit
        planned = plan_workers(replace(config, count=config.count if config.count is not None else count))
        self.slots = {spec.worker_id: Slot(spec) for spec in planned}
        self.planned = len(planned)
        # extra workers a rollout may start (a surge replica) on a CPU host; GPU hosts have one per device
        extra = config.max_extra if config.max_extra is not None else int(bool(planned) and planned[0].device == "cpu")
        self.max_count = self.planned + extra
        self.stopping = False

    def command(self, spec: WorkerSpec) -> list[str]:
        c = self.config
        # workers start holding no model: the daemon sends each the model its deployments need (Load)
        cmd = [sys.executable, "-m", "daemon.cli", "worker", "--connect", self.address, "--idle",
               "--worker-id", spec.worker_id, "--device", spec.device, "--kv-cache-memory", c.kv_cache_memory,
               "--block-size", str(c.block_size), "--lease", str(c.lease_s),
               "--orphan-timeout", str(c.orphan_timeout_s), "--log-format", self.log_format]
        if spec.threads:
            cmd += ["--threads", str(spec.threads)]
        if c.dtype:
            cmd += ["--dtype", c.dtype]
        if c.kv_cache_dtype != "auto":
            cmd += ["--kv-cache-dtype", c.kv_cache_dtype]
        if c.null_model:
            cmd.append("--null-model")
        if c.fault:
            cmd += ["--fault", c.fault]
        if c.keys_dir:  # the daemon's socket speaks CURVE: the pair it keeps beside the socket (daemon/serve.py)
            cmd += ["--keys", str(local_keys_dir(self.address.removeprefix("ipc://")))]
        return cmd

    async def start(self, adopted: dict[str, int] | None = None) -> None:
        """Start every planned worker, except those already running (id -> pid) from an earlier daemon."""
        for worker_id, slot in list(self.slots.items()):
            pid = (adopted or {}).get(worker_id)
            if pid is not None:
                slot.pid, slot.state, slot.started_at = pid, "running", time.monotonic()
                slot.task = asyncio.create_task(self._watch_adopted(slot), name=f"watch-{worker_id}")
                log.info("adopted worker %s (pid %d) left running by an earlier daemon", worker_id, pid)
            else:
                await self._spawn(slot)

    async def _spawn(self, slot: Slot) -> None:
        env = dict(os.environ, NIMBUS_SUPERVISED="1")
        if slot.spec.threads:  # keep OpenMP from starting a thread per core in every worker
            env["OMP_NUM_THREADS"] = str(slot.spec.threads)
        proc = await asyncio.create_subprocess_exec(*self.command(slot.spec), env=env)
        slot.proc, slot.pid, slot.state, slot.started_at = proc, proc.pid, "running", time.monotonic()
        slot.task = asyncio.create_task(self._watch_child(slot, proc), name=f"watch-{slot.spec.worker_id}")
        log.info("started worker %s (pid %d, %s)", slot.spec.worker_id, proc.pid, slot.spec.device)

    async def _watch_child(self, slot: Slot, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        how = f"exited with code {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
        await self._exited(slot, how)

    async def _watch_adopted(self, slot: Slot) -> None:
        while slot.pid is not None and _pid_alive(slot.pid):
            await asyncio.sleep(0.5)
        await self._exited(slot, "exited")

    async def _exited(self, slot: Slot, how: str) -> None:
        worker_id = slot.spec.worker_id
        slot.last_exit, slot.pid, slot.proc = how, None, None
        if self.on_exit is not None:
            self.on_exit(worker_id, how)
        if self.stopping:
            slot.state = "stopped"
            return
        quick = time.monotonic() - slot.started_at < QUICK_FAILURE_S
        slot.quick_failures = slot.quick_failures + 1 if quick else 1
        if slot.quick_failures > self.config.max_restarts:
            slot.state = "crashloop"
            log.error("worker %s %s; it failed %d times in a row soon after starting: leaving it down",
                      worker_id, how, slot.quick_failures)
            return
        delay = min(self.config.restart_backoff_s * 2 ** (slot.quick_failures - 1), MAX_BACKOFF_S)
        slot.state = "backoff"
        log.warning("worker %s %s; restarting in %.1fs", worker_id, how, delay)
        await asyncio.sleep(delay)
        if not self.stopping:
            slot.restarts += 1
            await self._spawn(slot)

    async def add(self) -> str | None:
        """Start one more local worker (a replica is waiting for one); None at the `max_count` cap."""
        if self.stopping or len(self.slots) >= self.max_count:
            return None
        first = next(iter(self.slots.values())).spec if self.slots else plan_workers(replace(self.config, count=1))[0]
        n = len(self.slots)
        while f"local-{n}" in self.slots:
            n += 1
        spec = WorkerSpec(f"local-{n}", first.device, first.threads)
        self.slots[spec.worker_id] = slot = Slot(spec)
        await self._spawn(slot)
        return spec.worker_id

    async def retire(self, worker_id: str) -> None:
        """Stop a worker for good (a spare beyond the planned count): it is not restarted."""
        slot = self.slots.pop(worker_id, None)
        if slot is None:
            return
        log.info("retiring spare worker %s", worker_id)
        if slot.task is not None:
            slot.task.cancel()
        if slot.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGTERM)
        if slot.proc is not None:
            try:
                await asyncio.wait_for(slot.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.proc.pid, signal.SIGKILL)
                await slot.proc.wait()

    def kill(self, worker_id: str, pid: int, reason: str) -> None:
        """Kill a worker declared dead (hung, silent); its watcher then restarts it."""
        slot = self.slots.get(worker_id)
        if slot is not None and slot.pid == pid:
            log.warning("killing worker %s (pid %d): %s", worker_id, pid, reason)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def status(self) -> dict[str, dict[str, object]]:
        return {wid: {"pid": s.pid, "state": s.state, "restarts": s.restarts, "last_exit": s.last_exit}
                for wid, s in self.slots.items()}

    async def stop(self, grace_s: float = 5.0) -> None:
        self.stopping = True
        for slot in self.slots.values():
            if slot.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for slot in self.slots.values():
            while slot.pid is not None and _pid_alive(slot.pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if slot.pid is not None and _pid_alive(slot.pid):
                log.warning("worker %s did not stop; killing it", slot.spec.worker_id)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)
            if slot.task is not None:
                slot.task.cancel()
            if slot.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    await slot.proc.wait()
