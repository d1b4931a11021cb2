"""Nimbus against vLLM's CPU build in one run, on the same checkpoint folder, driven by `nimbus bench` (issue 6).

Workloads (completions endpoint, greedy, ignore_eos + min_tokens, the folder's tokenizer, the same seeds for both):
  burst          64 requests at once, 256 prompt tokens, 128 output tokens;
  online         Poisson arrivals at --online-fraction (0.6) of vLLM's burst req/s, 100 requests, 256 in / 128 out;
  sweep          Poisson arrivals at 0.25x, 0.5x and 0.75x of vLLM's burst req/s, --sweep-requests each,
                 256 prompt tokens, 64 output tokens;
  shared-prefix  64 requests at once sharing a 512-token prefix, each with its own 64-token suffix, 64 output tokens;
  burst-repeat   the burst again (new seed, so no prefix-cache hits from the first), if --repeat.

Order (--order): "interleaved" (default) keeps both servers up and alternates them workload by workload
(vLLM first), so machine drift hits both alike. The server not under test is paused meanwhile (SIGSTOP to its
session; --idle-server run leaves it running), and its CPU during the other's run is recorded
(idle_server_cpu_s). "sequential" runs everything on vLLM, stops it, then everything on Nimbus.
Every part records the 1-minute load average before and after, the CPU seconds of the server under test (all
processes of its session), of the client, of the other server and of everything else on the machine (others).

    .venv/bin/python bench/compare.py [--out /tmp/compare] [--quick] [--repeat] [--order interleaved|sequential]
        [--parts burst,online,shared-prefix] [--nimbus-config 'dtype = "bfloat16"']
        [--nimbus-workers 2] [--vllm-data-parallel 2]

Both servers run as one process group using every core by default. --nimbus-workers 2 serves from two one-thread
workers (replicas the daemon balances between) and --vllm-data-parallel 2 from two vLLM engines, each bound to a
core: more throughput for batches, a slower step for each request (docs/benchmarks.md, tenth pass).

The ceiling (issue 7): the FLOPs each workload needs (prompt tokens x forward FLOPs without the LM head, plus
generated tokens x full forward FLOPs, weight matmuls only) over its duration, against the float32 2048^3
matmul rate this script measures at its start (and end, to see drift).

Where every request arrives at once (burst, shared-prefix, burst-repeat), the ratios also split each run at its
last first token: the speed of the prompt phase before it and of the decode phase after it, Nimbus / vLLM (the
burst's ratio is these two mixed; docs/benchmarks.md, eleventh pass).

Needs vLLM's CPU build in /work/vllm-venv (see shared/NOTES.md; override with --vllm-python).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import ROOT, TICK, Server, free_port, machine_busy_s  # noqa: E402  (bench/serve.py)

VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1"}
SWEEP_FRACTIONS = (0.25, 0.5, 0.75)


def session_cpu_s(sid: int) -> float:
    """CPU seconds (user+system) of the live processes of session `sid` (a server and all it spawned)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            rest = text[text.rindex(")") + 2:].split()
            if int(rest[3]) == sid:
                total += (int(rest[11]) + int(rest[12])) / TICK
    return total


class VLLM:
    """vLLM's OpenAI server (CPU build, `dtype`) on `folder`, in its own session; log in out/vllm.log."""

    name = "vllm"

    def __init__(self, out: Path, folder: Path, python: str, dtype: str = "float32", data_parallel: int = 1) -> None:
        self.out, self.folder, self.python, self.port = out, folder, python, free_port()
        self.dtype, self.data_parallel = dtype, data_parallel
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sid(self) -> int:
        return self.proc.pid if self.proc else 0

    def __enter__(self) -> VLLM:
        log = (self.out / "vllm.log").open("a")
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.folder),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", self.dtype,
               "--enable-prompt-tokens-details"]  # usage reports prefix-cache hits (cached tokens), as Nimbus does
        env = {**os.environ, **VLLM_ENV}
        if self.data_parallel > 1:  # an engine per core, each bound to its own ("0|1": vLLM's per-rank syntax)
            cmd += ["--data-parallel-size", str(self.data_parallel)]
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(c) for c in range(self.data_parallel))
        start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        while time.monotonic() - start < 900:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.proc.returncode}); see {log.name}")
            with contextlib.suppress(OSError, ValueError), \
                    urllib.request.urlopen(self.url + "/v1/models", timeout=5) as resp:
                if json.loads(resp.read())["data"]:
                    self.startup_s = time.monotonic() - start
                    return self
            time.sleep(1)
        self.__exit__()
        raise TimeoutError("vLLM not ready in 900 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None


class Nimbus(Server):
    """`nimbus serve` with one worker on the default model (bench/serve.py's Server), timed to ready.
    `extra_config`: TOML lines for [workers] (e.g. dtype = "bfloat16"), then any other sections."""

    def __init__(self, out: Path, extra_config: str = "", workers: int = 1) -> None:
        super().__init__(out, workers=workers, null_model=False, extra_config=extra_config)
        self.name, self.startup_s = "nimbus", 0.0  # also names its config and log in out/

    @property
    def sid(self) -> int:
        return self.proc.pid if self.proc else 0

    def __enter__(self) -> Nimbus:
        start = time.monotonic()
        super().__enter__()
        self.startup_s = time.monotonic() - start
        return self


def workloads(quick: bool, sweep_requests: int) -> dict[str, dict[str, Any]]:
    if quick:
        return {"burst": dict(workload="burst", num_requests=4, input_len=256, output_len=16, seed=101),
                "online": dict(workload="poisson", num_requests=4, input_len=256, output_len=8, seed=505),
                "sweep": dict(workload="sweep", num_requests=3, input_len=256, output_len=8, seed=202),
                "shared-prefix": dict(workload="shared-prefix", num_requests=4, prefix_len=512, input_len=64,
                                      output_len=8, seed=303),
                "burst-repeat": dict(workload="burst", num_requests=4, input_len=256, output_len=16, seed=404)}
    return {"burst": dict(workload="burst", num_requests=64, input_len=256, output_len=128, seed=101),
            # issue 7: Poisson arrivals at about 60% of vLLM's burst request rate, 100 requests
            "online": dict(workload="poisson", num_requests=100, input_len=256, output_len=128, seed=505),
            "sweep": dict(workload="sweep", num_requests=sweep_requests, input_len=256, output_len=64, seed=202),
            "shared-prefix": dict(workload="shared-prefix", num_requests=64, prefix_len=512, input_len=64,
                                  output_len=64, seed=303),
            "burst-repeat": dict(workload="burst", num_requests=64, input_len=256, output_len=128, seed=404)}


MATMUL_PROBE = """
import json, time, torch
torch.set_num_threads({threads})
out = {{}}
for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
    a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    t = time.perf_counter()
    a @ b
    best = time.perf_counter() - t
    # a dtype without a fast path (bfloat16 on AVX2: about 15 s a multiply) is timed once, not 23 times
    for _ in range(5 if best < 1.0 else 0):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t) / 4)
    out[name] = 2 * 2048 ** 3 / best / 1e9
print(json.dumps(out))
"""


def matmul_rate(threads: int) -> dict[str, float]:
    """This machine's matrix-multiply rate now (GFLOP/s, 2048^3, best of 5): the ceiling's denominator."""
    done = subprocess.run([sys.executable, "-c", MATMUL_PROBE.format(threads=threads)], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def forward_flops(folder: Path) -> tuple[float, float]:
    """(FLOPs per token of the forward pass without the LM head, FLOPs of the LM head per token): the weight
    matrix multiplies only (2 per multiply-add), as issue 7 counts them; attention's own work is left out."""
    c = json.loads((folder / "config.json").read_text())
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads", heads) * head_dim
    per_layer = h * (heads * head_dim + 2 * kv) + heads * head_dim * h + 3 * h * inter
    return 2.0 * layers * per_layer, 2.0 * h * c["vocab_size"]


def ceiling(row: dict[str, Any], flops: tuple[float, float], rate_gflops: float) -> dict[str, float]:
    """The FLOPs a workload needs (every prompt token through the body, cached or not; every generated token
    through the whole model), and the fraction of the matmul rate the server reached over the run."""
    w = row["workload"]
    prompt = w.get("prefix_len", 0) * (w["workload"] == "shared-prefix") + w["input_len"]
    body, head = flops
    total = row["completed"] * (prompt * body + w["output_len"] * (body + head))
    return {"flops": total, "achieved_gflops": total / row["duration_s"] / 1e9,
            "ceiling_fraction": total / row["duration_s"] / 1e9 / rate_gflops}


def warm(server: Any, folder: Path) -> None:
    """A few small requests first (not measured): first-request compilation and allocation."""
    subprocess.run([sys.executable, "-m", "daemon.cli", "bench", "--base-url", server.url + "/v1", "--tokenizer",
                    str(folder), "--num-requests", "4", "--input-len", "256", "--output-len", "16", "--seed", "9"],
                   cwd=ROOT, check=True, capture_output=True)


def run_part(server: Any, other: Any, folder: Path, out: Path, part: str, workload: dict[str, Any]) -> list[dict]:
    """One `nimbus bench` call against `server`; one row per measured run (a sweep gives one per rate)."""
    name = f"{server.name}-{part}"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in workload.items()]
    cmd = [sys.executable, "-m", "daemon.cli", "bench", "--base-url", server.url + "/v1", "--endpoint",
           "completions", "--tokenizer", str(folder), *flags, "--json", str(out / f"{name}.json")]
    load_before, t0 = os.getloadavg(), time.time()
    cpu0, other0, machine0 = session_cpu_s(server.sid), session_cpu_s(other.sid) if other else 0.0, machine_busy_s()
    client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1, other1, machine1 = session_cpu_s(server.sid), session_cpu_s(other.sid) if other else 0.0, machine_busy_s()
    load_after = os.getloadavg()
    print(f"--- {name} ({time.strftime('%H:%M:%S')}, load {load_before[0]:.2f} -> {load_after[0]:.2f})\n"
          f"{done.stdout}{done.stderr[-2000:] if done.returncode else ''}", flush=True)
    if done.returncode:
        raise RuntimeError(f"nimbus bench failed on {name}")
    report = json.loads((out / f"{name}.json").read_text())
    client = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
    common = {"server": server.name, "part": part, "workload": workload, "started": time.strftime(
        "%H:%M:%S", time.localtime(t0)), "load_before": load_before, "load_after": load_after,
        "server_cpu_s": cpu1 - cpu0, "idle_server_cpu_s": other1 - other0, "client_cpu_s": client,
        "others_cpu_s": (machine1 - machine0) - (cpu1 - cpu0) - (other1 - other0) - client}
    return [{**common, "rate": run["rate"], **run["summary"]} for run in report["runs"]]


@contextlib.contextmanager
def paused(server: Any):
    """The server's whole session stopped (SIGSTOP) meanwhile, then resumed and given a second to catch up.
    Idle servers are not idle on 2 cores: each wake-up of theirs stalls the measured server's barrier-synced
    threads (docs/benchmarks.md). Both servers come through a pause: Nimbus forgives its own stalls (README,
    health), and vLLM has no heartbeat to miss."""
    if server is None or not server.sid:
        yield
        return
    os.killpg(server.sid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(server.sid, signal.SIGCONT)
        time.sleep(1.0)


def versions(vllm_python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, platform, json; print(json.dumps({'python': platform.python_version(), "
            "**{p: m.version(p) for p in ('torch', 'vllm-cpu', 'transformers')}}))")
    vllm = json.loads(subprocess.run([vllm_python, "-c", code], capture_output=True, text=True, check=True).stdout)
    mine = json.loads(subprocess.run([sys.executable, "-c", code.replace("'vllm-cpu', ", "")],
                                     capture_output=True, text=True, check=True).stdout)
    cpu = Path("/proc/cpuinfo").read_text()
    flags = next(line for line in cpu.splitlines() if line.startswith("flags")).split()
    return {"vllm_env": vllm, "nimbus_env": mine,
            "cpu": next(line for line in cpu.splitlines() if line.startswith("model name")).split(":", 1)[1].strip(),
            "cores": os.cpu_count(), "avx512": sorted(f for f in flags if f.startswith(("avx512", "amx"))),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def ms(d: dict[str, float | None], *stats: str) -> str:
    return " / ".join("-" if d.get(s) is None else f"{d[s] * 1000:.0f}" for s in stats)


def label(r: dict[str, Any]) -> str:
    return r["part"] + (f" @ {r['rate']:.3f} req/s" if r["workload"]["workload"] == "sweep" else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| workload | server | done / failed / short | duration s | req/s | output tok/s | TTFT p50/p99 ms "
            "| ITL p50/p99 ms | E2E p50/p99 ms | cached prompt tok | load before → after | CPU s server / client / "
            "idle server / others |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {label(r)} | {r['server']} | {r['completed']} / {r['failed']} / {r['short_outputs']} "
            f"| {r['duration_s']:.1f} | {r['request_throughput']:.3f} | {r['output_throughput']:.1f} "
            f"| {ms(r['ttft_s'], 'p50', 'p99')} | {ms(r['itl_s'], 'p50', 'p99')} | {ms(r['e2e_latency_s'], 'p50', 'p99')} "
            f"| {r['cached_prompt_tokens']} | {r['load_before'][0]:.2f} → {r['load_after'][0]:.2f} "
            f"| {r['server_cpu_s']:.1f} / {r['client_cpu_s']:.1f} / {r['idle_server_cpu_s']:.1f} / "
            f"{max(0.0, r['others_cpu_s']):.1f} |")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Nimbus / vLLM per workload (and per sweep rate): output tok/s (higher is better for Nimbus), p99 TTFT and
    p99 ITL (lower is better for Nimbus). Where every request arrives at once, the run splits at its last first
    token (p99 TTFT) into the prompt phase (prefill, with the decodes already started riding along) and the decode
    phase after it; each phase's speed Nimbus / vLLM (vLLM's time over Nimbus's) says which half moved a ratio."""
    by = {(label(r), r["server"]): r for r in rows}
    out, lines = [], ["| workload | output tok/s Nimbus / vLLM | p99 TTFT Nimbus / vLLM | p99 ITL Nimbus / vLLM "
                      "| p50 ITL Nimbus / vLLM | prompt phase speed | decode phase speed |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
    for key in dict.fromkeys(label(r) for r in rows):
        n, v = by.get((key, "nimbus")), by.get((key, "vllm"))
        if not (n and v):
            continue

        def q(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        row = {"workload": key, "output_tok_s": q(n["output_throughput"], v["output_throughput"]),
               "ttft_p99": q(n["ttft_s"].get("p99"), v["ttft_s"].get("p99")),
               "itl_p99": q(n["itl_s"].get("p99"), v["itl_s"].get("p99")),
               "itl_p50": q(n["itl_s"].get("p50"), v["itl_s"].get("p50")),
               "prompt_phase": None, "decode_phase": None}
        if n["workload"]["workload"] in ("burst", "shared-prefix") and n["ttft_s"].get("p99") and v["ttft_s"].get("p99"):
            row["prompt_phase"] = q(v["ttft_s"]["p99"], n["ttft_s"]["p99"])
            row["decode_phase"] = q(v["duration_s"] - v["ttft_s"]["p99"], n["duration_s"] - n["ttft_s"]["p99"])
        out.append(row)
        lines.append(f"| {key} | " + " | ".join(
            "-" if row[k] is None else f"{row[k]:.2f}×"
            for k in ("output_tok_s", "ttft_p99", "itl_p99", "itl_p50", "prompt_phase", "decode_phase")) + " |")
    return out, "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/compare")
    parser.add_argument("--quick", action="store_true", help="tiny counts: check both servers and ignore_eos")
    parser.add_argument("--repeat", action="store_true", help="a second burst on each server at the end")
    parser.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved")
    parser.add_argument("--sweep-requests", type=int, default=32, help="requests per sweep rate")
    parser.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    parser.add_argument("--model", default=str(Path("~/.cache/nimbus/models/SmolLM2-135M-Instruct").expanduser()))
    parser.add_argument("--parts", default="burst,online,shared-prefix",
                        help="workloads in order, from burst, online, sweep, shared-prefix, burst-repeat")
    parser.add_argument("--vllm-dtype", default="float32", help="vLLM's --dtype (try float32 and bfloat16)")
    parser.add_argument("--online-fraction", type=float, default=0.6, help="online rate / vLLM's burst req/s")
    parser.add_argument("--idle-server", choices=("pause", "run"), default="pause",
                        help="interleaved: what the server not under test does meanwhile (pause: SIGSTOP)")
    parser.add_argument("--nimbus-workers", type=int, default=1,
                        help="Nimbus's local workers (2 on two cores: a one-thread replica per core)")
    parser.add_argument("--vllm-data-parallel", type=int, default=1,
                        help="vLLM's --data-parallel-size (an engine per core, each bound to its core)")
    parser.add_argument("--nimbus-config", default="",
                        help='TOML lines for Nimbus\'s [workers], then sections, e.g. \'dtype = "bfloat16"\'')
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(args.model)
    info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "platform": platform.platform(), **versions(args.vllm_python), "load_at_start": os.getloadavg()}
    print(json.dumps(info), flush=True)
    info["nimbus_config"], info["vllm_dtype"], info["idle_server"] = args.nimbus_config, args.vllm_dtype, args.idle_server
    info["nimbus_workers"], info["vllm_data_parallel"] = args.nimbus_workers, args.vllm_data_parallel
    info["matmul_gflops_start"] = matmul_rate(2)
    flops = forward_flops(folder)
    loads = workloads(args.quick, args.sweep_requests)
    parts = args.parts.split(",") + (["burst-repeat"] if args.repeat else [])
    if ("sweep" in parts or "online" in parts) and parts[0] != "burst":
        parser.error("sweep and online rates come from vLLM's burst: put burst first")
    rows: list[dict[str, Any]] = []
    startup: dict[str, float] = {}

    def sweep_rates() -> None:  # from vLLM's burst req/s: the sweep goes below the saturated rate
        base = next(r["request_throughput"] for r in rows if r["server"] == "vllm" and r["part"] == "burst")
        loads["sweep"]["rates"] = ",".join(f"{f * base:.4f}" for f in SWEEP_FRACTIONS)
        loads["online"]["rate"] = round(args.online_fraction * base, 4)

    def save() -> None:
        (out / "compare.json").write_text(json.dumps({**info, "startup_s": startup, "rows": rows,
                                                      "ratios": ratios(rows)[0]}, indent=1) + "\n")

    def measure(server: Any, other: Any, part: str) -> None:
        if part in ("sweep", "online") and "rates" not in loads["sweep"]:
            sweep_rates()
        with paused(other if args.idle_server == "pause" else None):
            new = run_part(server, other, folder, out, part, loads[part])
        for row in new:
            row.update(ceiling(row, flops, info["matmul_gflops_start"]["float32"]))
        rows.extend(new)
        save()

    if args.order == "interleaved":
        with VLLM(out, folder, args.vllm_python, args.vllm_dtype, args.vllm_data_parallel) as vllm:
            startup["vllm"] = vllm.startup_s
            print(f"vLLM ready in {vllm.startup_s:.1f} s", flush=True)
            with Nimbus(out, args.nimbus_config, args.nimbus_workers) as nimbus:
                startup["nimbus"] = nimbus.startup_s
                print(f"Nimbus ready in {nimbus.startup_s:.1f} s", flush=True)
                warm(vllm, folder)
                warm(nimbus, folder)
                for part in parts:
                    for server, other in ((vllm, nimbus), (nimbus, vllm)):
                        measure(server, other, part)
    else:
        for make in (lambda: VLLM(out, folder, args.vllm_python, args.vllm_dtype, args.vllm_data_parallel),
                     lambda: Nimbus(out, args.nimbus_config, args.nimbus_workers)):
            with make() as server:
                startup[server.name] = server.startup_s
                print(f"{server.name} ready in {server.startup_s:.1f} s", flush=True)
                warm(server, folder)
                for part in parts:
                    measure(server, None, part)
    info["load_at_end"] = os.getloadavg()
    info["matmul_gflops_end"] = matmul_rate(2)
    save()
    print(markdown(rows))
    print()
    print(ratios(rows)[1])
    rate = info["matmul_gflops_start"]["float32"]
    print(f"\nceiling: float32 matmul {rate:.0f} GFLOP/s at the start, "
          f"{info['matmul_gflops_end']['float32']:.0f} at the end (bfloat16 {info['matmul_gflops_start']['bfloat16']:.0f})")
    for r in rows:
        print(f"  {label(r)} {r['server']}: {r['flops'] / 1e12:.2f} TFLOP in {r['duration_s']:.1f} s = "
              f"{r['achieved_gflops']:.0f} GFLOP/s, {100 * r['ceiling_fraction']:.0f}% of the float32 ceiling")
    print(f"\nstart-up: {', '.join(f'{k} {v:.1f} s' for k, v in startup.items())}; results in {out}/compare.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
