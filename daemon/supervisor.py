"""Local worker processes: how many, with which devices and threads, started as `nimbus worker` children."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from daemon.config import WorkersConfig

log = logging.getLogger("nimbus.supervisor")


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


class LocalWorkers:
    """Starts and stops the daemon's own worker processes."""

    def __init__(self, config: WorkersConfig, address: str, model: str, max_model_len: int | None) -> None:
        self.config = config
        self.address = address
        self.model = model
        self.max_model_len = max_model_len
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    def command(self, spec: WorkerSpec) -> list[str]:
        cmd = [sys.executable, "-m", "daemon.cli", "worker", "--connect", self.address, "--model", self.model,
               "--worker-id", spec.worker_id, "--device", spec.device, "--parent-pid", str(os.getpid()),
               "--kv-cache-memory", self.config.kv_cache_memory, "--block-size", str(self.config.block_size)]
        if spec.threads:
            cmd += ["--threads", str(spec.threads)]
        if self.config.dtype:
            cmd += ["--dtype", self.config.dtype]
        if self.config.null_model:
            cmd.append("--null-model")
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        return cmd

    async def start(self) -> None:
        for spec in plan_workers(self.config):
            env = dict(os.environ)
            if spec.threads:  # keep OpenMP from spawning a thread per core in every worker
                env["OMP_NUM_THREADS"] = str(spec.threads)
            proc = await asyncio.create_subprocess_exec(*self.command(spec), env=env)
            self.procs[spec.worker_id] = proc
            log.info("started worker %s (pid %d, %s)", spec.worker_id, proc.pid, spec.device)

    async def stop(self, grace_s: float = 5.0) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.terminate()
        for worker_id, proc in self.procs.items():
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                log.warning("worker %s did not stop; killing it", worker_id)
                proc.kill()
                await proc.wait()
