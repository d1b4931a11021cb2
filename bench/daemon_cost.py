"""The daemon's own cost (issue 7): what scheduling, messaging, detokenization and SSE streaming cost the head.

Three parts, each against a real `nimbus serve` on a free loopback port, sampled from /proc:
  steps   null-model workers (each step answered at once), 256 streaming clients holding 256 running
          sequences: steps/s (the daemon's /metrics step count) and daemon CPU per step.
          Target: >= 1,000 steps/s, <= 1 ms of daemon CPU per step.
  real    the default model (SmolLM2-135M), a burst of 64 requests x 256 prompt tokens x 128 output tokens
          (ignore_eos): the daemon's CPU time over the run's wall time. Target: < 10% of one core. Also the
          worker's RSS against the weights and KV pool it logs: idle, peak during the burst (the activation
          workspace on top), after it, and after a second identical burst (nothing may grow per request).
  memory  null-model workers, 24,000 warm-up requests (the prefix cache fills its pool and turns over once),
          then 2 x 10,000 more at 256 in flight: RSS during and after.
          Target: < 250 MB with 256 running sequences; after 10k within 5% of after the warm-up.

The load comes from lean clients (raw asyncio sockets, no JSON parsing of chunks) in several processes, so the
client does not limit what is measured; their CPU is reported too. The machine may be shared: CPU time per step
is the steadier figure, wall-clock steps/s the one the target names; both are printed, with the CPU others took.

    .venv/bin/python bench/daemon_cost.py [--parts steps,real,memory] [--json PATH] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
_USAGE = re.compile(rb'"completion_tokens": *(\d+)')


# --------------------------------------------------------------------------------------------------- /proc
def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a live process."""
    text = Path(f"/proc/{pid}/stat").read_text()
    rest = text[text.rindex(")") + 2:].split()  # the command name may hold spaces: skip past it
    return (int(rest[11]) + int(rest[12])) / TICK


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


def machine_busy_s() -> float:
    """CPU seconds all cores have been busy since boot (all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------- daemon
class Daemon:
    """One `nimbus serve` with one local worker (null model or the default model); always cleaned up."""

    def __init__(self, out: Path, null_model: bool, profile: bool = False, dtype: str | None = None) -> None:
        self.out, self.null_model, self.profile, self.dtype = out, null_model, profile, dtype
        self.port = free_port()
        self.name = f"{'null' if null_model else 'model'}-{self.port}"
        self.admin_key = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.spy: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Daemon:
        config = self.out / f"{self.name}.toml"
        config.write_text(f'[server]\nadmin_keys = ["{self.admin_key}"]\nmetrics_public = true\n'
                          f'[workers]\nruntime_dir = "{self.out}/run-{self.port}"\n'
                          f'null_model = {str(self.null_model).lower()}\n'
                          + (f'dtype = "{self.dtype}"\n' if self.dtype else ''))
        log = (self.out / f"{self.name}.log").open("w")
        cmd = [sys.executable, "-m", "daemon.cli", "serve", "--port", str(self.port), "--workers", "1",
               "--config", str(config), "--log-format", "text"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"nimbus serve exited ({self.proc.returncode}); see {log.name}")
                with contextlib.suppress(OSError, ValueError):
                    if get_json(self.url + "/ready")["replicas"] >= 1:
                        return self
                time.sleep(0.3)
            raise TimeoutError(f"nimbus serve not ready in 300 s; see {log.name}")
        except BaseException:
            self.__exit__()
            raise

    def model(self) -> str:
        return get_json(self.url + "/v1/models")["data"][0]["id"]

    def metrics(self) -> dict[str, float]:
        """Steps so far and running sequences, from /metrics (summed over workers)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out = {"steps": 0.0, "running": 0.0}
        for line in text.splitlines():
            if line.startswith("nimbus_step_duration_seconds_count"):
                out["steps"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("nimbus_running_sequences{"):
                out["running"] += float(line.rsplit(" ", 1)[1])
        return out

    def worker_pids(self) -> list[int]:
        return children(self.pid)

    def start_profile(self, name: str, seconds: float) -> None:
        """py-spy record of the daemon for `seconds` (raw folded stacks in the output folder)."""
        spy = Path(sys.executable).parent / "py-spy"
        self.spy = subprocess.Popen([str(spy), "record", "-p", str(self.pid), "-d", str(int(seconds)), "-r", "250",
                                     "--nonblocking", "--format", "raw", "-o", str(self.out / f"{name}.txt")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __exit__(self, *exc: object) -> None:
        if self.spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.spy.wait(timeout=30)
            if self.spy.poll() is None:
                self.spy.kill()
                self.spy.wait()
            self.spy = None
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # the whole session: the daemon and its workers
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


# --------------------------------------------------------------------------------------------------- client
@dataclass
class ClientSpec:
    port: int
    model: str
    streams: int  # concurrent requests of this process
    requests: int | None  # in all, or None: until duration_s
    duration_s: float
    max_tokens: int
    prompts: list[list[int]]  # cycled; with unique=True each request's first token makes it unique
    unique: bool = True
    offset: int = 0  # this process' share of the unique ids


@dataclass
class ClientResult:
    completed: int = 0
    failed: int = 0
    cut: int = 0  # still streaming when the duration ended
    tokens: int = 0  # completion tokens of the completed requests (from their usage chunk)
    short: int = 0  # completed with fewer tokens than max_tokens
    chunks: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    cpu_s: float = 0.0


async def _one(spec: ClientSpec, prompt: list[int], res: ClientResult) -> None:
    body = json.dumps({"model": spec.model, "prompt": prompt, "max_tokens": spec.max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.0}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", spec.port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        tail, chunks, size = b"", 0, 0
        while data := await reader.read(1 << 16):
            size += len(data)
            joined = tail + data
            chunks += joined.count(b"data: ") - tail.count(b"data: ")
            tail = joined[-512:]
        res.chunks += chunks
        res.bytes += size
        if not head.startswith(b"HTTP/1.1 200") or b"[DONE]" not in tail:
            res.failed += 1
            if len(res.errors) < 5:
                res.errors.append((head.split(b"\r\n", 1)[0] + b" " + tail[-200:]).decode(errors="replace"))
            return
        match = _USAGE.findall(tail)
        tokens = int(match[-1]) if match else 0
        res.completed += 1
        res.tokens += tokens
        res.short += tokens < spec.max_tokens
    finally:
        writer.close()


async def run_client(spec: ClientSpec) -> ClientResult:
    res = ClientResult()
    deadline = time.monotonic() + spec.duration_s
    counter = iter(range(spec.offset, 1 << 30))
    sent = 0

    async def stream() -> None:
        nonlocal sent
        while time.monotonic() < deadline and (spec.requests is None or sent < spec.requests):
            sent += 1
            i = next(counter)
            prompt = spec.prompts[i % len(spec.prompts)]
            if spec.unique:  # no prefix-cache hits across requests: ids 1000..40999 are ordinary tokens
                prompt = [1000 + i % 40000, *prompt[1:]]
            try:
                await _one(spec, prompt, res)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                res.failed += 1
                if len(res.errors) < 5:
                    res.errors.append(f"{type(exc).__name__}: {exc}")

    tasks = [asyncio.ensure_future(stream()) for _ in range(spec.streams)]
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()) + 0.5)
    res.cut = len(pending)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return res


def client_main(spec_path: str) -> int:
    import uvloop

    spec = ClientSpec(**json.loads(Path(spec_path).read_text()))
    res = uvloop.run(run_client(spec))
    usage = os.times()
    res.cpu_s = usage.user + usage.system
    print(json.dumps(res.__dict__), flush=True)
    return 0


class Clients:
    """Several client processes sharing one workload; results summed when they end."""

    def __init__(self, out: Path, daemon: Daemon, procs: int, streams: int, requests: int | None,
                 duration_s: float, max_tokens: int, prompts: list[list[int]], unique: bool = True) -> None:
        model = daemon.model()
        self.procs: list[subprocess.Popen] = []
        for k in range(procs):
            share = None if requests is None else requests // procs + (k < requests % procs)
            spec = ClientSpec(daemon.port, model, streams // procs + (k < streams % procs), share, duration_s,
                              max_tokens, prompts, unique, offset=k * 10_000_000 + secrets.randbelow(1 << 20))
            path = out / f"client-{daemon.port}-{k}-{time.monotonic_ns()}.json"
            path.write_text(json.dumps(spec.__dict__))
            self.procs.append(subprocess.Popen([sys.executable, __file__, "--client", str(path)], cwd=ROOT,
                                               stdout=subprocess.PIPE, text=True))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait(self, timeout: float) -> ClientResult:
        total = ClientResult()
        try:
            for p in self.procs:
                out, _ = p.communicate(timeout=timeout)
                r = json.loads(out.strip().splitlines()[-1])
                for k, v in r.items():
                    setattr(total, k, getattr(total, k) + v)
        finally:
            self.kill()
        return total

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------------------------------- sampling
@dataclass
class Sample:
    t: float
    daemon_cpu_s: float
    worker_cpu_s: float
    client_cpu_s: float
    machine_cpu_s: float
    rss_mb: float
    steps: float
    running: float


def sample(daemon: Daemon, clients: Clients | None) -> Sample:
    m = daemon.metrics()
    workers = 0.0
    for pid in daemon.worker_pids():
        with contextlib.suppress(OSError):
            workers += cpu_s(pid)
    client = 0.0
    for pid in clients.pids if clients else ():
        with contextlib.suppress(OSError):
            client += cpu_s(pid)
    return Sample(time.monotonic(), cpu_s(daemon.pid), workers, client, machine_busy_s(), rss_mb(daemon.pid),
                  m["steps"], m["running"])


def delta(a: Sample, b: Sample) -> dict[str, float]:
    wall = b.t - a.t
    steps = b.steps - a.steps
    cpu = b.daemon_cpu_s - a.daemon_cpu_s
    return {"wall_s": wall, "steps": steps, "steps_per_s": steps / wall, "daemon_cpu_s": cpu,
            "daemon_cpu_ms_per_step": 1000 * cpu / steps if steps else float("nan"),
            "daemon_core_share": cpu / wall, "worker_cpu_s": b.worker_cpu_s - a.worker_cpu_s,
            "client_cpu_s": b.client_cpu_s - a.client_cpu_s,
            # others: what the rest of the machine took meanwhile (a shared box is noisy: say how noisy)
            "others_cpu_s": (b.machine_cpu_s - a.machine_cpu_s) - cpu - (b.worker_cpu_s - a.worker_cpu_s)
            - (b.client_cpu_s - a.client_cpu_s)}


# --------------------------------------------------------------------------------------------------- prompts
def token_prompts(count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` ids of real text, cut from nimbus bench's corpus with the default model's
    tokenizer (so the detokenizer sees real context)."""
    from daemon.bench import build_prompts
    from daemon.models import resolve_model
    from daemon.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(resolve_model(None))
    return [p.token_ids for p in build_prompts(tok, count, length, seed=secrets.randbelow(1000))]


# --------------------------------------------------------------------------------------------------- parts
def part_steps(out: Path, quick: bool, profile: bool, procs: int) -> dict[str, Any]:
    """256 running sequences on null-model workers: steps/s and daemon CPU per step in steady state."""
    streams, window = (64, 3.0) if quick else (256, 10.0)
    # 32 + 8000 tokens each (the model's 8,192 at most): 256 of them fill 128,512 of the null worker's 131,072
    # blocks, so nobody is preempted, and at 1,000 steps/s the window still holds about 7 s of steady decoding
    prompt_len, max_tokens = 32, 8000
    prompts = token_prompts(streams, prompt_len)
    with Daemon(out, null_model=True) as daemon:
        clients = Clients(out, daemon, procs, streams, None, 60.0 + window, max_tokens, prompts)
        try:
            deadline = time.monotonic() + 60
            while daemon.metrics()["running"] < streams and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
            samples = [sample(daemon, clients)]
            if profile:
                daemon.start_profile("steps-profile", window)
            while samples[-1].t - samples[0].t < window:
                time.sleep(0.25)
                samples.append(sample(daemon, clients))
                if samples[-1].running < streams and samples[-1].t - samples[0].t >= 2:
                    samples.pop()  # the first sequences are finishing: the window ends at the sample before
                    break
        finally:
            clients.kill()
        row = delta(samples[0], samples[-1])
        row.update(part="steps", sequences=streams, client_procs=procs,
                   running_min=min(s.running for s in samples), running_mean=sum(s.running for s in samples) / len(
                       samples), rss_mb_max=max(s.rss_mb for s in samples), rss_mb_end=samples[-1].rss_mb)
    return row


class RssPeak:
    """The largest RSS a process reaches while the block runs, sampled every 50 ms from a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(0.05)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def worker_footprint(log: Path) -> tuple[float, float]:
    """(weights MiB, KV pool MiB) from the worker's "loaded ..." log line."""
    m = re.search(r"weights ([\d.]+) MiB, \d+ KV blocks of \d+ tokens \(([\d.]+) MiB\)", log.read_text())
    return (float(m.group(1)), float(m.group(2))) if m else (float("nan"), float("nan"))


def part_real(out: Path, quick: bool, profile: bool, dtype: str | None) -> dict[str, Any]:
    """A burst on the default model: the daemon's share of one core over the run, and the worker's memory."""
    requests, prompt_len, max_tokens = (16, 64, 32) if quick else (64, 256, 128)
    prompts = token_prompts(requests, prompt_len)
    with Daemon(out, null_model=False, dtype=dtype) as daemon:
        # warm-up: the first forward passes are slower (allocation, lazy init), and not what is measured
        Clients(out, daemon, 1, 2, 2, 120, 8, token_prompts(2, 32)).wait(180)
        (worker,) = daemon.worker_pids()
        worker_idle = rss_mb(worker)
        first = sample(daemon, None)
        with RssPeak(worker) as peak:
            clients = Clients(out, daemon, 1, requests, requests, 900, max_tokens, prompts, unique=False)
            if profile:
                daemon.start_profile("real-profile", 60)
            res = clients.wait(1000)
        last = sample(daemon, None)
        worker_after = rss_mb(worker)
        # the same burst again: a worker whose memory grows per request shows it here
        with RssPeak(worker) as peak2:
            again = Clients(out, daemon, 1, requests, requests, 900, max_tokens, token_prompts(requests, prompt_len),
                            unique=False).wait(1000)
        worker_after_second = rss_mb(worker)
        weights, kv = worker_footprint(out / f"{daemon.name}.log")
        row = delta(first, last)
        row.update(part="real", requests=requests, prompt_tokens=prompt_len, max_tokens=max_tokens, dtype=dtype,
                   completed=res.completed, failed=res.failed, short=res.short, tokens=res.tokens,
                   output_tokens_per_s=res.tokens / row["wall_s"], client_cpu_s=res.cpu_s, errors=res.errors,
                   rss_mb_end=last.rss_mb, second_completed=again.completed, second_failed=again.failed,
                   worker_weights_mb=weights, worker_kv_mb=kv, worker_rss_mb_idle=worker_idle,
                   worker_rss_mb_peak=max(peak.peak, peak2.peak), worker_rss_mb_after=worker_after,
                   worker_rss_mb_after_second=worker_after_second)
    return row


def part_memory(out: Path, quick: bool, procs: int) -> dict[str, Any]:
    """RSS after a warm-up that fills the prefix cache, after 10,000 more requests (256 in flight) and after
    another 10,000, sampled throughout: growth after the warm-up is not the cache filling toward its pool."""
    # 256 + 16 tokens, prompts unique per client process: about 9 new blocks cached a request (two processes
    # count alike). The cache's dict grows to its final table when it turns over: at about 175,000 blocks cached
    # (2^18 slots full) it is rebuilt at 2^19 slots (10.5 MB; tracemalloc showed this +5.2 MB step after a
    # 9,000-request warm-up) and stays there, the pool (131,072 blocks) bounding its entries. The warm-up
    # (24,000 requests, about 216,000 blocks) goes past that, so what grows after it is not the cache.
    warm, total, streams = (100, 1000, 64) if quick else (24_000, 10_000, 256)
    prompt_len, max_tokens = 256, 16
    prompts = token_prompts(256, prompt_len)
    rss: list[tuple[float, float, float]] = []  # (s since the warm-up ended, MB, running sequences)
    results = []
    with Daemon(out, null_model=True) as daemon:
        idle = rss_mb(daemon.pid)

        def load(requests: int, t0: float) -> Sample:
            clients = Clients(out, daemon, procs, streams, requests, 1800, max_tokens, prompts)
            try:
                while clients.running():
                    s = sample(daemon, clients)
                    rss.append((s.t - t0, s.rss_mb, s.running))
                    time.sleep(0.5)
                results.append(clients.wait(60))
            finally:
                clients.kill()
            time.sleep(1.0)  # idle again: what stays is what the daemon keeps
            return sample(daemon, None)

        after_warm = load(warm, time.monotonic())
        rss.clear()
        after_first = load(total, after_warm.t)
        after_second = load(total, after_warm.t)
    cpu = after_second.daemon_cpu_s - after_warm.daemon_cpu_s
    done = sum(r.completed for r in results)
    return {"part": "memory", "requests_warm_up": warm, "requests": total, "streams": streams,
            "completed": done, "failed": sum(r.failed for r in results), "short": sum(r.short for r in results),
            "errors": [e for r in results for e in r.errors][:5], "rss_mb_idle_start": idle,
            "rss_mb_after_warm_up": after_warm.rss_mb, "rss_mb_after": after_first.rss_mb,
            "rss_mb_after_second": after_second.rss_mb, "rss_mb_max": max(r[1] for r in rss),
            "rss_drift": (after_first.rss_mb - after_warm.rss_mb) / after_warm.rss_mb,
            "rss_drift_second": (after_second.rss_mb - after_first.rss_mb) / after_first.rss_mb,
            "wall_s": after_second.t - after_warm.t, "daemon_cpu_s": cpu,
            "daemon_cpu_ms_per_request": 1000 * cpu / max(1, done - results[0].completed),
            "rss_samples": [tuple(round(x, 2) for x in r) for r in rss[:: max(1, len(rss) // 60)]]}


# --------------------------------------------------------------------------------------------------- report
def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        if r["part"] == "steps":
            lines += [
                f"steps   {r['sequences']} sequences (running min {r['running_min']:.0f}, mean {r['running_mean']:.0f})",
                f"        {r['steps_per_s']:8.0f} steps/s         (target >= 1000)",
                f"        {r['daemon_cpu_ms_per_step']:8.3f} ms daemon CPU/step (target <= 1.0; "
                f"{1000 / r['daemon_cpu_ms_per_step']:.0f} steps/s on a whole core)",
                f"        {100 * r['daemon_core_share']:8.1f} % of a core: daemon; clients {r['client_cpu_s']:.1f} s, "
                f"workers {r['worker_cpu_s']:.1f} s, others {r['others_cpu_s']:.1f} s of {r['wall_s']:.1f} s",
                f"        {r['rss_mb_max']:8.1f} MB daemon RSS with them running (target < 250)"]
        elif r["part"] == "real":
            lines += [
                f"real    {r['requests']} x {r['prompt_tokens']} in / {r['max_tokens']} out: {r['completed']} done, "
                f"{r['failed']} failed, {r['tokens']} tokens in {r['wall_s']:.1f} s ({r['output_tokens_per_s']:.1f}/s)",
                f"        {100 * r['daemon_core_share']:8.2f} % of a core: daemon ({r['daemon_cpu_s']:.2f} s; target < 10)",
                f"        workers {r['worker_cpu_s']:.1f} s, client {r['client_cpu_s']:.1f} s, others "
                f"{r['others_cpu_s']:.1f} s",
                f"        worker RSS MB: weights {r['worker_weights_mb']:.0f} + KV pool {r['worker_kv_mb']:.0f}; idle "
                f"{r['worker_rss_mb_idle']:.0f}, peak {r['worker_rss_mb_peak']:.0f}, after the burst "
                f"{r['worker_rss_mb_after']:.0f}, after a second ({r['second_completed']} done, "
                f"{r['second_failed']} failed) {r['worker_rss_mb_after_second']:.0f}"]
        elif r["part"] == "memory":
            lines += [
                f"memory  {r['requests_warm_up']} warm-up + 2 x {r['requests']} requests ({r['completed']} done, "
                f"{r['failed']} failed) in {r['wall_s']:.1f} s, {r['daemon_cpu_ms_per_request']:.2f} ms daemon CPU each",
                f"        RSS MB: idle {r['rss_mb_idle_start']:.1f}, after warm-up {r['rss_mb_after_warm_up']:.1f}, "
                f"max {r['rss_mb_max']:.1f}, after {r['requests']} more {r['rss_mb_after']:.1f}: drift "
                f"{100 * r['rss_drift']:+.1f}% (target within 5%)",
                f"        after {r['requests']} more again {r['rss_mb_after_second']:.1f}: drift "
                f"{100 * r['rss_drift_second']:+.1f}%"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="steps,real,memory", help="which of steps, real, memory to run")
    parser.add_argument("--json", default=None, help="write the results here (default: OUT/daemon_cost.json)")
    parser.add_argument("--out", default=None, help="folder for logs and profiles (default: a new temp dir)")
    parser.add_argument("--quick", action="store_true", help="small workloads: a smoke test of this script")
    parser.add_argument("--profile", action="store_true", help="py-spy record the daemon during steps and real")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes for steps and memory")
    parser.add_argument("--dtype", default=None, help="the workers' dtype in the real part (default: theirs)")
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)  # internal: run one client process
    args = parser.parse_args()
    if args.client:
        return client_main(args.client)
    out = Path(args.out or tempfile.mkdtemp(prefix="nimbus-daemon-cost-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"results in {out}", flush=True)
    rows = []
    for part in args.parts.split(","):
        if part == "steps":
            rows.append(part_steps(out, args.quick, args.profile, args.client_procs))
        elif part == "real":
            rows.append(part_real(out, args.quick, args.profile, args.dtype))
        elif part == "memory":
            rows.append(part_memory(out, args.quick, args.client_procs))
        else:
            parser.error(f"unknown part {part!r}")
        print(table(rows[-1:]), flush=True)
    report = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cores": os.cpu_count(),
              "load_avg_1m": os.getloadavg()[0], "rows": rows}
    Path(args.json or out / "daemon_cost.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
