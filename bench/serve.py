"""Reruns the serving benchmarks of docs/benchmarks.md: real `nimbus serve` processes on 127.0.0.1, driven by `nimbus bench`.

For each worker count: (a) a burst of 64 requests, 256 prompt tokens, 128 output tokens (ignore_eos), completions;
(b) time to first token at low load: 10 requests one at a time; (c) the daemon alone: the same burst and a longer
one against null-model workers (they answer each step at once), then the longer one again under a profiler (py-spy
if installed, else cProfile): where the daemon's time goes. The profiled run is separate because a profiler on two
cores slows what it watches. Every run reports steps (GET /admin/workers) and the CPU seconds of the daemon, its
workers, the bench client and everything else on the machine (how noisy the run was).

    .venv/bin/python bench/serve.py [--workers 1,2] [--quick] [--parts burst,low-load,null] [--out DIR]
                                    [--profiler py-spy|cprofile|none]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import pstats
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
SEEDS = itertools.count(1)
BURST = dict(num_requests=64, input_len=256, output_len=128)
LOW_LOAD = dict(num_requests=10, input_len=256, output_len=64, max_concurrency=1)
# A longer null-model run: the burst alone lasts well under a second, and in the profiled run serving, not
# start-up, should fill the profile.
NULL_LONG = dict(num_requests=256, input_len=256, output_len=256)
QUICK = {"burst": dict(num_requests=16, input_len=256, output_len=32),
         "low": dict(num_requests=4, input_len=256, output_len=16, max_concurrency=1),
         "long": dict(num_requests=64, input_len=256, output_len=64)}
# Frames of start-up work (imports, tokenizer load, worker registration), left out of the profile summary.
STARTUP_FRAMES = ("importlib._bootstrap", "Tokenizer.from_folder", "Engine._register", "LocalWorkers.start",
                  "TCPSite.start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
        return json.loads(resp.read())


def machine_busy_s() -> float:
    """CPU seconds all cores have been busy since boot: with our processes' share, what others took meanwhile."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK  # all but idle and iowait; guest time is in user


def proc_stat(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds user+system) of a live process, from /proc."""
    text = Path(f"/proc/{pid}/stat").read_text()
    rest = text[text.rindex(")") + 2:].split()  # the command name may hold spaces: skip past it
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / TICK


class Server:
    """One `nimbus serve` (optionally under a profiler), with its log and config in `out`."""

    def __init__(self, out: Path, workers: int, null_model: bool, profiler: str = "none", extra_config: str = "",
                 model: str | None = None) -> None:
        self.port, self.workers, self.out, self.model = free_port(), workers, out, model  # model: default if None
        self.extra_config = extra_config  # more TOML, after [server] and [workers] (e.g. a [scheduler] section)
        self.name = f"w{workers}-{'null' if null_model else 'model'}{'-' + profiler if profiler != 'none' else ''}"
        self.null_model, self.profiler = null_model, profiler
        self.proc: subprocess.Popen | None = None
        self.daemon_pid = 0
        self.admin_key = secrets.token_hex(16)  # GET /admin/workers needs one; /v1 stays open (no API keys)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        config = self.out / f"{self.name}.toml"
        config.write_text(f'[server]\nadmin_keys = ["{self.admin_key}"]\n[workers]\nruntime_dir = "{self.out}/run"\n'
                          f'null_model = {str(self.null_model).lower()}\n{self.extra_config}\n')
        serve = ["-m", "daemon.cli", "serve", *([self.model] if self.model else []), "--port", str(self.port),
                 "--workers", str(self.workers), "--config", str(config)]
        if self.profiler == "py-spy":  # py-spy launches the daemon: attaching by pid is refused in some sandboxes
            return [py_spy(), "record", "--format", "raw", "--rate", "200", "-o", str(self.out / f"{self.name}.txt"),
                    "--", sys.executable, *serve]
        if self.profiler == "cprofile":
            return [sys.executable, "-m", "cProfile", "-o", str(self.out / f"{self.name}.prof"), *serve]
        return [sys.executable, *serve]

    def __enter__(self) -> Server:
        log = (self.out / f"{self.name}.log").open("w")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nimbus serve exited ({self.proc.returncode}); see {log.name}")
            ready = False
            with contextlib.suppress(OSError, ValueError):  # not listening yet
                ready = get_json(self.url + "/ready")["replicas"] >= self.workers
            if ready:  # the workers are the daemon's children, whichever wrapper started the daemon
                self.daemon_pid = proc_stat(self.worker_pids()[0])[0]
                return self
            time.sleep(0.3)
        self.__exit__()
        raise TimeoutError(f"nimbus serve not ready in 300 s; see {log.name}")

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in get_json(self.url + "/admin/workers", self.admin_key)["workers"]]

    def counters(self) -> dict[str, float]:
        """Steps so far (all workers) and CPU seconds of the daemon and of its workers."""
        rows = get_json(self.url + "/admin/workers", self.admin_key)["workers"]
        return {"steps": sum(w["steps"] for w in rows), "daemon_cpu_s": proc_stat(self.daemon_pid)[1],
                "worker_cpu_s": sum(proc_stat(w["pid"])[1] for w in rows), "machine_cpu_s": machine_busy_s()}

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):  # the daemon itself, so a profiler wrapping it writes out
            os.kill(self.daemon_pid or self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the session: daemon and workers
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None


def py_spy() -> str:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy") or ""


def bench(server: Server, out: Path, name: str, workload: dict[str, Any]) -> dict[str, Any]:
    """Run one `nimbus bench`; return its summary with the server's steps and CPU and the client's CPU."""
    args = [sys.executable, "-m", "daemon.cli", "bench", "--base-url", server.url + "/v1"]
    warm = [*args, "--num-requests", "2", "--input-len", "32", "--output-len", "8", f"--seed={next(SEEDS)}"]
    subprocess.run(warm, cwd=ROOT, check=True, capture_output=True)
    # every invocation its own seed, hence prompts of its own: no run is served from another's prefix cache
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in workload.items()] + [f"--seed={next(SEEDS)}"]
    before, client = server.counters(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([*args, *flags, "--json", str(out / f"{name}.json")], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    after, client_after = server.counters(), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"--- {name}\n{done.stdout}", flush=True)
    summary = json.loads((out / f"{name}.json").read_text())["runs"][0]["summary"]
    delta = {k: after[k] - before[k] for k in before}
    delta["client_cpu_s"] = (client_after.ru_utime + client_after.ru_stime) - (client.ru_utime + client.ru_stime)
    # the machine is shared: CPU taken by everything else during the run says how noisy the numbers are
    delta["others_cpu_s"] = delta.pop("machine_cpu_s") - delta["daemon_cpu_s"] - delta["worker_cpu_s"] - delta[
        "client_cpu_s"]
    delta["load_avg_1m"] = os.getloadavg()[0]
    return {"name": name, **summary, **delta}


def measure(out: Path, workers: int, quick: bool, profiler: str, parts: set[str]) -> list[dict[str, Any]]:
    burst, low, long = (QUICK["burst"], QUICK["low"], QUICK["long"]) if quick else (
        BURST, LOW_LOAD, NULL_LONG)
    rows = []
    if "burst" in parts or "low-load" in parts:
        with Server(out, workers, null_model=False) as server:
            for name, workload in (("burst", burst), ("low-load", low)):
                if name in parts:
                    rows.append(bench(server, out, f"w{workers}-{name}", workload))
    if "null" in parts:
        with Server(out, workers, null_model=True) as server:
            rows.append(bench(server, out, f"w{workers}-null-burst", burst))
            rows.append(bench(server, out, f"w{workers}-null-long", long))
    if "null" in parts and profiler != "none":
        with Server(out, workers, null_model=True, profiler=profiler) as server:
            rows.append(bench(server, out, f"w{workers}-null-long-profiled", long))
        row = rows[-1]
        row["profile"] = profile_report(server, out, row["daemon_cpu_s"], row["steps"], row["output_tokens"])
        print(rows[-1]["profile"])
    return [{"workers": workers, **r} for r in rows]


def profile_report(server: Server, out: Path, cpu_s: float, steps: int, tokens: int, top: int = 25) -> str:
    if server.profiler == "cprofile":
        path = out / f"{server.name}.top.txt"
        with path.open("w") as f:
            pstats.Stats(str(out / f"{server.name}.prof"), stream=f).sort_stats("cumulative").print_stats(top)
        return path.read_text()
    return summarize_py_spy(out / f"{server.name}.txt", cpu_s, steps, tokens, top)


# Where a sample of the daemon belongs: the first area (in this order) with a marker in any frame of its stack.
AREAS = (
    ("SSE write to the socket (aiohttp StreamResponse.write)", ("StreamResponse.write",)),
    ("SSE chunk as JSON (Response._chunk)", ("Response._chunk",)),
    ("detokenization (IncrementalDetokenizer)", ("IncrementalDetokenizer.",)),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("prompt tokenization (Tokenizer.encode)", ("Tokenizer.encode",)),
    ("scheduler: update (append tokens, stop checks, commit blocks)", ("Scheduler.update",)),
    ("scheduler: schedule (build the step)", ("Scheduler.schedule",)),
    ("ZeroMQ and msgpack (send step, receive result)", ("zmq/", "msgpack", "protocol/")),
    ("rest of the step loop (Replica.run, _emit, stream wake-ups)", ("Replica.",)),
    ("rest of streaming (Response.stream, RequestStream.get)", ("Response.stream", "RequestStream.")),
    ("request admission (parse, validate, route, submit)", ("_generate",)),
    ("HTTP server (aiohttp request handling, auth)", ("aiohttp/", "daemon/auth.py", "daemon/httpserver.py")),
    ("uvloop's C code (no Python frame)", ("(uvloop, no Python frame)",)),
)


def _area(names: list[str]) -> str:
    for area, markers in AREAS:
        if any(marker in name for name in names for marker in markers):
            return area
    return "other"


def summarize_py_spy(path: Path, cpu_s: float = 0.0, steps: int = 1, tokens: int = 1, top: int = 25) -> str:
    """Shares of the daemon's samples by area, by file and by function, without start-up. Areas also get the
    daemon's measured CPU time (cpu_s over the run's steps and output tokens) split by those shares."""
    own, inclusive, by_file, areas, total, startup = Counter(), Counter(), Counter(), Counter(), 0, 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        if any(marker in f for f in frames for marker in STARTUP_FRAMES):
            startup += n
            continue
        total += n
        # drop line numbers; a sample without Python frames is uvloop's own C code (polling, transports)
        names = [f.split(":")[0] + ")" if ":" in f else f for f in frames if f] or ["(uvloop, no Python frame)"]
        own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
        by_file[_file_of(names[-1])] += n
        areas[_area(names)] += n
    lines = [f"py-spy: {total} samples of the daemon's busy threads while serving, {startup} more in start-up "
             f"({path})", "", f"by area: share, daemon CPU ms per step ({1000 * cpu_s / steps:.2f} in all), "
             f"µs per output token ({1e6 * cpu_s / tokens:.1f} in all):"]
    lines += [f"  {100 * n / total:5.1f}%  {1000 * cpu_s * n / total / steps:6.2f} ms  "
              f"{1e6 * cpu_s * n / total / tokens:5.1f} µs  {name}" for name, n in areas.most_common()]
    lines += ["", "self time by file:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in by_file.most_common(top)]
    lines += ["", "self time by function:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive time by function:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def _file_of(frame: str) -> str:
    inside = frame[frame.rfind("(") + 1: -1]
    return inside.split("site-packages/")[-1] if "site-packages/" in inside else inside


def markdown(rows: list[dict[str, Any]]) -> str:
    def ms(d: dict[str, float | None], *stats: str) -> str:  # None: nothing completed
        return " / ".join("-" if d[s] is None else f"{d[s] * 1000:.0f}" for s in stats)

    head = ("| workers | run | done / failed | duration s | req/s | output tok/s | total tok/s | TTFT p50/p90/p99 ms "
            "| ITL p50/p90/p99 ms | E2E p50/p99 ms | steps/s | tokens/step | daemon CPU ms/step | CPU s daemon / "
            "workers / client / others |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        steps = r["steps"] or 1
        lines.append(
            f"| {r['workers']} | {r['name'].split('-', 1)[1]} | {r['completed']} / {r['failed']} | {r['duration_s']:.1f} "
            f"| {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | {r['total_token_throughput']:.1f} "
            f"| {ms(r['ttft_s'], 'p50', 'p90', 'p99')} | {ms(r['itl_s'], 'p50', 'p90', 'p99')} "
            f"| {ms(r['e2e_latency_s'], 'p50', 'p99')} "
            f"| {r['steps'] / r['duration_s']:.1f} | {r['output_tokens'] / steps:.1f} "
            f"| {1000 * r['daemon_cpu_s'] / steps:.2f} "
            f"| {r['daemon_cpu_s']:.1f} / {r['worker_cpu_s']:.1f} / {r['client_cpu_s']:.1f} / "
            f"{max(0.0, r['others_cpu_s']):.1f} |")  # ±1 s: tick rounding
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1", help="worker counts to measure, e.g. 1,2")
    parser.add_argument("--quick", action="store_true", help="small workloads: a smoke test of this script")
    parser.add_argument("--out", default=None, help="folder for logs, JSON and profiles (default: a new temp dir)")
    parser.add_argument("--profiler", choices=("py-spy", "cprofile", "none"), default=None,
                        help="profiler of the null-model daemon (default: py-spy if installed, else cProfile)")
    parser.add_argument("--parts", default="burst,low-load,null", help="which of burst, low-load, null to run")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    out = Path(args.out or tempfile.mkdtemp(prefix="nimbus-bench-serve-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    profiler = args.profiler or ("py-spy" if py_spy() else "cprofile")
    print(f"results in {out}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}", flush=True)
    rows = [r for w in args.workers.split(",") for r in measure(out, int(w), args.quick, profiler, parts)]
    (out / "serve.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
