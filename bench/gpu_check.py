"""One device call of checks and timings for Nimbus's GPU path (issue 7): prepared here, run on a lent GPU host.

The GPU host has torch, transformers, aiohttp, uvloop and the rest of Nimbus's needs but not pyzmq, and a call
carries at most 64 MiB: the default model's weights (98 MB as a GGUF) do not travel. So `prepare` puts pyzmq's
wheel and the default model's config and tokenizer files (about 3 MB) into .gpu/ (ignored by git), and `run`
builds a checkpoint of the same shape with random weights from a fixed seed on the host. Timings do not depend on
the weights' values; the greedy check compares Nimbus with transformers on the same weights.

    .venv/bin/python bench/gpu_check.py prepare                      # here, once (network to PyPI)
    # there, in one `run` of the device tool with carry [".gpu"]:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl \
      && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_check.py run --out $OUT
    # a dry run here on the CPU, scaled down, through the attention path the GPU takes:
    NIMBUS_ATTENTION=torch .venv/bin/python bench/gpu_check.py run --device cpu --quick --out /tmp/gpu_dry

`run` does these parts in order, each in its own time limit, and rewrites OUT/gpu_check.json after each (a call
cut short keeps what ran); OUT/gpu_check.txt is the printed log, OUT/steps_profile.txt the profiler's table.
  env     torch, CUDA, the device, which attention libraries import there, the bfloat16 and float32 matmul rate
  model   the random-weight checkpoint (float32 safetensors, the default model's tokenizer and config)
  greedy  Nimbus's worker (StepExecutor) against transformers' generate on the same weights and device, 32
          tokens for five prompts batched: float32 (expected equal) and the model dtype (agreement reported)
  steps   ModelRunner.forward alone: prefill of 8 x 256 and 32 x 256 tokens, decode at batch 64 and 256 at
          context 320, synchronized, medians; then a decode step under torch.profiler
  serve   `nimbus serve` on the checkpoint and `nimbus bench`: a burst of 64 and of 256 requests (256 prompt
          tokens, 128 out) and 64 requests sharing a 512-token prefix (64 own, 64 out)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

ASSETS = ROOT / ".gpu"
# the files of the converted default model that travel: everything but the weights
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")
# what the GPU image lacks of Nimbus's dependencies (KINDS.md's package list, 2026-11-17)
WHEELS = ("pyzmq",)
NEEDED = ("zmq", "msgpack", "uvloop", "aiohttp", "safetensors", "tokenizers", "transformers", "jinja2", "numpy",
          "prometheus_client")
PROMPTS = [
    "Name the largest planet in the solar system.",
    "Translate 'good morning' into French.",
    "Summarise the plot of Hamlet in one line.",
    "What does a compiler do?",
    "Suggest a name for a pet turtle.",
]
BLOCK = 16


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """SIGALRM after `seconds`: a part that hangs ends with an error and the parts after it still run."""
    def expire(signum: int, frame: object) -> None:
        raise PartTimeout(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Tee:
    """stdout that also writes to a file: the device tool returns only the output's last 12,000 characters."""

    def __init__(self, out: Any, copy: Any) -> None:
        self.out, self.copy = out, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.copy.flush()
        self.out.flush()


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------- prepare


def prepare(dest: Path) -> None:
    """Fill `dest` (.gpu/) with the model's small files and the wheels the GPU image lacks; ignore it in git."""
    from importlib import metadata

    from daemon.models import pull

    exclude = Path(subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout.strip())
    exclude = exclude if exclude.is_absolute() else ROOT / exclude
    line = f"/{dest.relative_to(ROOT)}/" if dest.is_relative_to(ROOT) else None
    if line and line not in (exclude.read_text().splitlines() if exclude.exists() else []):
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with exclude.open("a") as f:
            f.write(line + "\n")
    folder = pull(None)
    (dest / "model").mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / "model" / name)
    wheels = dest / "whl"
    shutil.rmtree(wheels, ignore_errors=True)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                             "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    for name in WHEELS:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version=3.12", "--implementation=cp", *platforms, "-d", str(wheels),
                        f"{name}=={metadata.version(name)}"], check=True)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    log(f"{dest}: {size / 2**20:.1f} MiB ({', '.join(sorted(p.name for p in dest.rglob('*') if p.is_file()))})")


# -------------------------------------------------------------------------------------------------------- run


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: Any, n: int) -> float:
    """Median seconds of `n` calls after one warm-up, synchronized on the device."""
    fn()
    sync(device)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def part_env(device: Any, quick: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
    info["importable"] = {m: importlib.util.find_spec(m) is not None for m in ("flash_attn", "flashinfer", "vllm")}
    info["missing"] = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    n = 1024 if quick or device.type == "cpu" else 8192
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = median_time(functools.partial(torch.matmul, a, b), device, 5)
        info[f"matmul_{str(dtype).split('.')[1]}_tflops"] = round(2 * n**3 / t / 1e12, 3)
    return info


def part_model(folder: Path) -> dict[str, Any]:
    """The default model's shape with random weights (seed 0), saved in float32 with its tokenizer."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(ASSETS / "model")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(folder)
    for name in MODEL_FILES:  # after save_pretrained: its generation_config.json gives way to the model's own
        if (ASSETS / "model" / name).is_file():
            shutil.copy2(ASSETS / "model" / name, folder / name)
    return {"folder": str(folder), "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def nimbus_greedy(folder: Path, device: Any, dtype: Any, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Greedy tokens from the worker's own step path, every prompt in one batch."""
    from worker.executor import StepExecutor, greedy
    from worker.runner import ModelRunner

    runner = ModelRunner(folder, device=device, dtype=dtype, kv_cache_bytes=256 * 2**20, max_model_len=1024)
    return greedy(StepExecutor(runner), prompts, new)


def part_greedy(folder: Path, device: Any, model_dtype: Any, new: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for p in PROMPTS]
    out: dict[str, Any] = {}
    for dtype in dict.fromkeys([torch.float32, model_dtype]):
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        expected = []
        for p in prompts:
            ids = hf.generate(torch.tensor([p], device=device), max_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            expected.append(ids[0, len(p):].tolist())
        del hf
        got = nimbus_greedy(folder, device, dtype, prompts, new)
        first_diff = [next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), None) for g, e in zip(got, expected)]
        name = str(dtype).split(".")[1]
        out[name] = {"equal": sum(d is None for d in first_diff), "of": len(prompts), "first_difference": first_diff}
        log(f"greedy {name}: {out[name]}")
    return out


def part_steps(folder: Path, device: Any, dtype: Any, quick: bool, out: Path) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from worker.config import ModelConfig
    from worker.runner import ModelRunner, SeqChunk

    context, prompt = 320, 256
    batches = (16,) if quick else (64, 256)
    prefills = (2,) if quick else (8, 32)
    per_seq = -(-(context + 1) // BLOCK)
    seqs = max(*batches, *prefills)
    config = ModelConfig.from_folder(folder)  # a pool of just the blocks used: the default on a GPU is most of it
    block_bytes = config.num_layers * 2 * BLOCK * config.num_kv_heads * config.head_dim * dtype.itemsize
    runner = ModelRunner(folder, device=device, dtype=dtype, block_size=BLOCK, max_model_len=1024,
                         kv_cache_bytes=(seqs * per_seq + 8) * block_bytes)
    if runner.num_blocks < seqs * per_seq:
        raise RuntimeError(f"{runner.num_blocks} KV blocks, {seqs * per_seq} needed")
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(seqs)]
    text = [100 + j % 500 for j in range(prompt)]
    result: dict[str, Any] = {"dtype": str(dtype).split(".")[1], "attention": type(runner.attention).__name__,
                              "kv_blocks": runner.num_blocks}
    for n in prefills:
        chunks = [SeqChunk(text, 0, tables[i]) for i in range(n)]
        t = median_time(functools.partial(runner.forward, chunks), device, 5)
        result[f"prefill_{n}x{prompt}_ms"] = round(t * 1e3, 2)
        result[f"prefill_{n}x{prompt}_tok_s"] = round(n * prompt / t)
    for b in batches:
        chunks = [SeqChunk([5], context, tables[i]) for i in range(b)]
        t = median_time(functools.partial(runner.forward, chunks), device, 20)
        result[f"decode_{b}_ms"] = round(t * 1e3, 2)
        result[f"decode_{b}_tok_s"] = round(b / t)
    log(f"steps: {result}")
    chunks = [SeqChunk([5], context, tables[i]) for i in range(batches[-1])]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            runner.forward(chunks)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (out / "steps_profile.txt").write_text(f"decode batch {batches[-1]} at context {context}, 5 steps, by {key}\n"
                                          + prof.key_averages().table(sort_by=key, row_limit=25))
    return result


def part_serve(folder: Path, quick: bool) -> dict[str, Any]:
    from serve import Server, bench

    work = Path(tempfile.mkdtemp(prefix="nimbus-gpu-serve-"))
    runs = {"burst-64": dict(num_requests=64, input_len=256, output_len=128),
            "burst-256": dict(num_requests=256, input_len=256, output_len=128),
            "shared-prefix-64": dict(workload="shared-prefix", num_requests=64, prefix_len=512, input_len=64,
                                     output_len=64)}
    if quick:
        runs = {"burst-8": dict(num_requests=8, input_len=64, output_len=16)}
    result: dict[str, Any] = {}
    server = Server(work, 1, null_model=False, model=str(folder))
    try:
        with server:
            for name, workload in runs.items():
                row = bench(server, work, name, workload)
                result[name] = {k: row[k] for k in ("completed", "failed", "duration_s", "output_throughput",
                                                     "ttft_s", "itl_s", "e2e_latency_s", "steps")}
    finally:
        logs = sorted(work.glob("*.log"))
        result["server_log_tail"] = logs[0].read_text().splitlines()[-40:] if logs else []
        shutil.rmtree(work, ignore_errors=True)
    return result


def run(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    results: dict[str, Any] = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    folder = Path(tempfile.mkdtemp(prefix="nimbus-gpu-model-")) / "SmolLM2-135M-random"
    new = 8 if args.quick else 32
    parts: list[tuple[str, int, Callable[[], dict[str, Any]]]] = [
        ("env", 120, lambda: part_env(device, args.quick)),
        ("model", 180, lambda: part_model(folder)),
        ("greedy", 240, lambda: part_greedy(folder, device, dtype, new)),
        ("steps", 240, lambda: part_steps(folder, device, dtype, args.quick, out)),
        ("serve", 420, lambda: part_serve(folder, args.quick)),
    ]
    for name, limit, fn in parts:
        if args.parts and name not in args.parts.split(",") and name != "model":
            continue
        start = time.monotonic()
        log(f"--- {name}")
        try:
            with time_limit(limit):
                results[name] = fn()
        except Exception as exc:  # a part that fails is recorded and the next one still runs
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            log(results[name]["traceback"])
        if device.type == "cuda":  # the part's pools and weights are garbage now: hand their memory back
            torch.cuda.empty_cache()
        results[name]["seconds"] = round(time.monotonic() - start, 1)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        log(json.dumps({name: results[name]}, default=str)[:4000])
    shutil.rmtree(folder.parent, ignore_errors=True)
    return 1 if any("error" in v for v in results.values() if isinstance(v, dict)) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="fill .gpu/ with the model's small files and the wheels the GPU lacks")
    p.add_argument("--dest", type=Path, default=ASSETS)
    r = sub.add_parser("run", help="the checks and timings (on the GPU host)")
    r.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.txt, steps_profile.txt")
    r.add_argument("--device", default=None, help="default: cuda:0 if there is one, else cpu")
    r.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    r.add_argument("--quick", action="store_true", help="small sizes: a dry run of this script")
    r.add_argument("--parts", default="", help="comma-separated subset of env,greedy,steps,serve (model always)")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.dest.resolve())
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with (Path(args.out) / "gpu_check.txt").open("w") as copy:
        sys.stdout = Tee(sys.stdout, copy)
        try:
            return run(args)
        finally:
            sys.stdout = sys.stdout.out


if __name__ == "__main__":
    raise SystemExit(main())
