"""Benchmark of the worker runtime alone (no daemon, no sockets) on the default model, against transformers.

One run measures this machine's float32 matrix-multiply rate, Nimbus prefill and decode through the real
worker path (StepExecutor.execute: step diff, forward pass over the paged KV cache, greedy sampling), the
bare ModelRunner.forward time inside it, transformers' own `generate` on the same prompts, and what fraction
of the matmul rate each reaches, then profiles a decode step at the largest batch. Nimbus and transformers
alternate in rounds per batch size and each is reported from its least disturbed round's median step,
because absolute times drift on a shared machine: the ratios are the figures to read.

    .venv/bin/python bench/runtime.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    StoppingCriteria,
    StoppingCriteriaList,
)

from daemon.models import pull
from protocol.messages import NewSequence, SamplingParams, Step, pack_ints, unpack_ints
from worker.config import ModelConfig
from worker.executor import StepExecutor
from worker.runner import ModelRunner, SeqChunk

PROMPT_LEN = 256
BLOCK = 16  # KV block size, the worker's default
GROUP = 8  # prompts per prefill step
HF_PREFILL_GROUPS = 2  # transformers prefills these groups itself; it decodes from Nimbus's K/V for the rest
CHUNK = 64  # tokens per sequence per step when prefilling in chunks
GREEDY = SamplingParams(temperature=0.0)
# Original prose, cycled from a different word for each prompt so that no two prompts share a prefix.
PROSE = (
    "The harbour town woke slowly in winter. Before the light came, the bakers had already lit their ovens, "
    "and the smell of bread drifted down the narrow streets toward the water, where fishermen untangled nets "
    "that had frozen stiff overnight. Children walked to school in pairs, arguing about whether the ice on the "
    "pond would hold, while their parents counted coins for the ferry and complained about the price of coal. "
    "At the end of the pier an old woman sold hot chestnuts from a dented iron pan, and she knew the name of "
    "every boat that passed, which family owned it, and what it had caught the year the storm took the "
    "lighthouse roof. Nobody in the town remembered a time before her stall, and nobody could say where she "
    "went when the season ended, only that she returned each November with the first hard frost."
)


@dataclass(frozen=True)
class Plan:
    batches: tuple[int, ...]
    decode_steps: int  # timed steps (new tokens per sequence) per round, Nimbus and transformers alike
    rounds: int  # Nimbus and transformers alternate this many times per batch size
    profile_steps: int

    @property
    def num_prompts(self) -> int:  # one-step and chunked prefill groups alternate, so at least two groups
        return max(max(self.batches), 2 * GROUP)


FULL = Plan(batches=(1, 8, 32, 64), decode_steps=8, rounds=4, profile_steps=3)
QUICK = Plan(batches=(1, 8), decode_steps=4, rounds=2, profile_steps=2)


@dataclass
class DecodeResult:
    """Seconds per step, one list per round; Nimbus and transformers rounds alternate."""

    batch: int
    load: float  # 1-minute load average of the machine when the batch started
    nimbus: list[list[float]] = field(default_factory=list)  # StepExecutor.execute
    forward: list[list[float]] = field(default_factory=list)  # ModelRunner.forward inside it
    hf: list[list[float]] = field(default_factory=list)  # one `generate` iteration
    hf_wall: list[float] = field(default_factory=list)  # whole `generate` calls


def least_disturbed(rounds: list[list[float]]) -> float:
    """The median step of the round with the lowest median: the round least slowed by other load."""
    return min(statistics.median(r) for r in rounds)


class TimedRunner(ModelRunner):
    """A ModelRunner that records the duration of its last forward pass (the model without sampling)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_forward_s = 0.0

    def forward(self, chunks: Sequence[SeqChunk], logits_rows: Sequence[int] | None = None,
                **kwargs: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().forward(chunks, logits_rows, **kwargs)
        self.last_forward_s = time.perf_counter() - t0
        return out


# ------------------------------------------------------------------------------------------ the machine
def mm_gflops(m: int, k: int, n: int, seconds: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-repeats rate of an (m x k) @ (k x n) matrix multiply, in GFLOP/s."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        reps = max(1, int(2e8 // (m * k * n)))
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * m * k * n / best / 1e9


def read_gbs(nbytes: int = 512 * 1024**2, repeats: int = 5) -> float:
    """Memory read rate (GB/s) of a float32 sum over a buffer much larger than the caches."""
    x = torch.ones(nbytes // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return nbytes / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine_rates(seconds: float) -> dict[str, float]:
    return {
        "mm_2048_gflops": mm_gflops(2048, 2048, 2048, seconds),
        "mm_decode_gflops": mm_gflops(64, 576, 1536, seconds),  # a batch-64 gate/up projection
        # not what the worker serves on CPU, but whether this CPU has a fast bfloat16 path (AVX512-BF16/AMX)
        "mm_2048_bf16_gflops": mm_gflops(2048, 2048, 2048, seconds / 4, torch.bfloat16),
        "mm_decode_bf16_gflops": mm_gflops(64, 576, 1536, seconds / 4, torch.bfloat16),
        "read_gbs": read_gbs(),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------------ the prompts
def build_prompts(tokenizer: Any, count: int, length: int = PROMPT_LEN) -> list[list[int]]:
    """`count` distinct prompts of exactly `length` tokens: the prose cycled, each from another word."""
    words = PROSE.split()
    if count > len(words):
        raise ValueError(f"at most {len(words)} distinct prompts")
    prompts = []
    for i in range(count):
        start = i * len(words) // count
        rotated = words[start:] + words[:start]
        ids: list[int] = []
        text = ""
        while len(ids) < length:
            text += " ".join(rotated) + " "
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(ids[:length])
    if len({tuple(p) for p in prompts}) != count:
        raise RuntimeError("prompts are not distinct")
    return prompts


# ----------------------------------------------------------------------------------- Nimbus, by steps
class NimbusDriver:
    """Plays the daemon's part by hand: sequence ids, block tables, and the steps sent to the executor."""

    def __init__(self, runner: TimedRunner) -> None:
        self.runner = runner
        self.executor = StepExecutor(runner)
        self.block_size = runner.block_size
        self.next_block = 0
        self.next_seq = 0
        self.next_step = 0

    def blocks(self, n: int) -> list[int]:
        if self.next_block + n > self.runner.num_blocks:
            raise RuntimeError("benchmark KV pool too small")
        out = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return out

    def step(self, **fields: Any) -> tuple[dict[int, int], float]:
        """Runs one Step; returns ({seq_id: sampled token}, seconds in StepExecutor.execute)."""
        step = Step(step_id=self.next_step, **fields)
        self.next_step += 1
        t0 = time.perf_counter()
        result = self.executor.execute(step)
        elapsed = time.perf_counter() - t0
        return dict(zip(unpack_ints(result.seq_ids), unpack_ints(result.token_ids))), elapsed

    def prefill(self, prompts: list[list[int]], chunk: int | None) -> tuple[list[list[int]], list[int], float]:
        """Prefills prompts in one step (chunk None) or in chunks; returns (block tables, first tokens, s)."""
        tables = [self.blocks(-(-len(p) // self.block_size)) for p in prompts]
        ids = list(range(self.next_seq, self.next_seq + len(prompts)))
        self.next_seq += len(prompts)
        new = tuple(
            NewSequence(sid, pack_ints(p), len(p), 0, pack_ints(t), GREEDY) for sid, p, t in zip(ids, prompts, tables)
        )
        length = len(prompts[0])
        sizes = [length] if chunk is None else [chunk] * (length // chunk)
        total, sampled = 0.0, {}
        for i, n in enumerate(sizes):
            sampled, elapsed = self.step(new_seqs=new if i == 0 else (), seq_ids=pack_ints(ids),
                                         num_tokens=pack_ints([n] * len(ids)))
            total += elapsed
        self.step(free_seq_ids=pack_ints(ids))  # the blocks stay filled; decode rounds reuse them
        return tables, [sampled[sid] for sid in ids], total

    def decode(self, prompts: list[list[int]], firsts: list[int], tables: list[list[int]], fresh: list[int],
               steps: int) -> tuple[list[float], list[float]]:
        """`steps` decode steps over sequences that reuse the prefilled prompts' blocks (a prefix-cache hit,
        as the daemon would send it), writing their new tokens' K/V into `fresh` blocks.

        Returns the seconds of each step in StepExecutor.execute and in ModelRunner.forward."""
        per_seq = len(fresh) // len(prompts)
        ids = list(range(self.next_seq, self.next_seq + len(prompts)))
        self.next_seq += len(prompts)
        new = tuple(
            NewSequence(sid, pack_ints([*p, first]), len(p), len(p),
                        pack_ints([*t, *fresh[i * per_seq : (i + 1) * per_seq]]), GREEDY)
            for i, (sid, p, first, t) in enumerate(zip(ids, prompts, firsts, tables))
        )
        seq_ids, ones = pack_ints(ids), pack_ints([1] * len(ids))
        step_s, forward_s = [], []
        for k in range(steps):
            _, elapsed = self.step(new_seqs=new if k == 0 else (), seq_ids=seq_ids, num_tokens=ones)
            step_s.append(elapsed)
            forward_s.append(self.runner.last_forward_s)
        self.step(free_seq_ids=seq_ids)
        return step_s, forward_s


# ------------------------------------------------------------------------------------- transformers
class StepClock(StoppingCriteria):
    """Never stops generation; records when each generate iteration ends."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_prefill(model: Any, prompts: list[list[int]]) -> tuple[DynamicCache, float]:
    """One forward over the prompts without the LM head; returns the cache and the seconds taken."""
    ids = torch.tensor(prompts)
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True)
    return cache, time.perf_counter() - t0


def hf_decode(model: Any, prompts: list[list[int]], firsts: list[int], layers: list[tuple[torch.Tensor, ...]],
              new_tokens: int) -> tuple[list[float], float]:
    """transformers' greedy `generate` of `new_tokens` tokens for prompt + first token, the prompt's KV given.

    The prompts are all PROMPT_LEN tokens, so the left padding is empty; the mask is passed all the same.
    Returns the seconds of each generate iteration (the first includes its set-up) and of the whole call."""
    b = len(prompts)
    cache = DynamicCache(ddp_cache_data=[(k[:b], v[:b]) for k, v in layers], config=model.config)
    ids = torch.tensor([[*p, f] for p, f in zip(prompts, firsts)])
    clock = StepClock()
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new_tokens,
        do_sample=False, eos_token_id=None, pad_token_id=model.generation_config.pad_token_id,
        stopping_criteria=StoppingCriteriaList([clock]),
    )
    wall = time.perf_counter() - t0
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}")
    marks = [t0, *clock.times]
    return [b - a for a, b in zip(marks, marks[1:])], wall


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def paged_kv_as_hf(runner: ModelRunner, tables: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prompts' K/V from Nimbus's paged pool in transformers' cache layout [B, kv_heads, len, head_dim].

    Both store keys after the rotary embedding, so transformers decodes from the same state without
    prefilling every prompt again (prefill_all checks the two agree on the groups both prefilled)."""
    index = torch.tensor(tables)

    def as_hf(pool: torch.Tensor) -> torch.Tensor:  # [num_blocks, block, kv_heads, head_dim]
        return pool[index].flatten(1, 2).transpose(1, 2).contiguous()

    return [(as_hf(layer[0]), as_hf(layer[1])) for layer in runner.kv_layers]


def max_abs_diff(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return max((x - y).abs().max().item() for pa, pb in zip(a, b) for x, y in zip(pa, pb))


# ---------------------------------------------------------------------------------------------- FLOPs
def flop_counts(runner: ModelRunner) -> dict[str, int]:
    """Parameters in the layers' matrix multiplies and in the LM head; attention width (q heads x dim)."""
    layer_params = sum(
        w.numel() for layer in runner.model.layers
        for w in (layer.qkv_weight, layer.o_weight, layer.gate_up_weight, layer.down_weight)
    )
    c = runner.config
    return {"layer_params": layer_params, "head_params": c.vocab_size * c.hidden_size,
            "attn_width": c.num_heads * c.head_dim, "num_layers": c.num_layers}


def decode_flops_per_token(f: dict[str, int], context: float) -> float:
    """2 x matmul parameters (layers and LM head) + QK^T and PV: 2 x 2 x context x width per layer."""
    return 2 * (f["layer_params"] + f["head_params"]) + 4 * context * f["attn_width"] * f["num_layers"]


def prefill_flops_per_token(f: dict[str, int], length: int) -> float:
    """Causal: position p attends p + 1 keys; the LM head runs for the last token only."""
    mean_context = (length + 1) / 2
    return (2 * f["layer_params"] + 4 * mean_context * f["attn_width"] * f["num_layers"]
            + 2 * f["head_params"] / length)


# ------------------------------------------------------------------------------------------ profiling
OP_BUCKETS = (  # (bucket, substrings of aten op names), first match wins
    ("matmul", ("addmm", "aten::mm", "bmm", "matmul", "aten::linear")),
    ("attention kernel (SDPA)", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax")),
    ("attention kernel (paged, with KV write)", ("nimbus::paged_attention",)),
    ("KV write (index_copy_)", ("index_copy",)),
    ("decode-row scatter (index_put)", ("index_put",)),
    ("KV gather, row/rope picks (index)", ("aten::index", "aten::gather", "aten::take", "embedding")),
    ("sampler (argmax)", ("argmax",)),
    ("norms, rope, SiLU, residual", ("rms_norm", "aten::mul", "aten::add", "aten::pow", "aten::sum",
                                    "aten::mean", "aten::rsqrt", "aten::silu", "aten::cat", "aten::sub")),
)


def torch_profile(run: Callable[[], float]) -> dict[str, Any]:
    """Op-level self times of the decode steps `run` performs (it returns their wall seconds)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = run()
    events = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    events.sort(key=lambda e: e[1], reverse=True)
    buckets: dict[str, float] = {}
    for name, self_s, _ in events:
        bucket = next((b for b, keys in OP_BUCKETS if any(k in name for k in keys)), "other torch ops")
        buckets[bucket] = buckets.get(bucket, 0.0) + self_s
    buckets["outside torch ops (Python)"] = max(0.0, wall - sum(buckets.values()))
    return {"wall_s": wall, "buckets_s": buckets,
            "top_ops": [{"op": n, "self_s": s, "calls": c} for n, s, c in events[:12]]}


PY_FUNCS = {  # label -> (file suffix, function name) whose cumulative time cProfile reports
    "StepExecutor.execute": ("executor.py", "execute"),
    "StepExecutor._apply (step diff)": ("executor.py", "_apply"),
    "ModelRunner.forward": ("runner.py", "forward"),
    "AttentionMetadata.build": ("attention.py", "build"),
    "attention backend forward": ("attention.py", "forward"),
    "SamplingBatch.build": ("sampler.py", "build"),
    "sample": ("sampler.py", "sample"),
    "StepExecutor._result": ("executor.py", "_result"),
}


def python_profile(run: Callable[[], float]) -> dict[str, float]:
    """Cumulative seconds in the worker's Python functions over the steps `run` performs."""
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    out = dict.fromkeys(PY_FUNCS, 0.0)
    for (path, _, name), (_, _, _, cumulative, _) in stats.items():
        for label, (suffix, func) in PY_FUNCS.items():
            if name == func and path.endswith(f"worker/{suffix}"):
                out[label] += cumulative
    return out


# ------------------------------------------------------------------------------------------------ run
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(plan: Plan) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    folder = pull()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = build_prompts(tokenizer, plan.num_prompts)
    log(f"{len(prompts)} prompts of {PROMPT_LEN} tokens; measuring the machine")
    rates_before = machine_rates(1.0)

    fresh_per_seq = -(-plan.decode_steps // BLOCK) + 1
    kv_blocks = plan.num_prompts * (-(-PROMPT_LEN // BLOCK)) + max(plan.batches) * fresh_per_seq + 64
    c = ModelConfig.from_folder(folder)
    block_bytes = c.num_layers * 2 * BLOCK * c.num_kv_heads * c.head_dim * 4  # float32
    runner = TimedRunner(folder, device="cpu", dtype="float32", block_size=BLOCK, max_model_len=1024,
                         kv_cache_bytes=kv_blocks * block_bytes)
    driver = NimbusDriver(runner)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chunked_ok = warm_up(driver, hf, prompts[0])

    log(f"prefill: Nimbus one step / in chunks of {CHUNK}, alternating per group; transformers one forward")
    tables, firsts, prefill, kv_diff = prefill_all(driver, hf, prompts)
    layers = paged_kv_as_hf(runner, tables)

    decode = []
    for b in plan.batches:
        log(f"decode at batch {b}")
        decode.append(decode_batch(driver, hf, plan, b, prompts, firsts, tables, layers))

    b = max(plan.batches)
    log(f"profiling {plan.profile_steps} decode steps at batch {b}")
    fresh = driver.blocks(b * fresh_per_seq)

    def profiled_steps() -> float:
        t0 = time.perf_counter()
        driver.decode(prompts[:b], firsts[:b], tables[:b], fresh, plan.profile_steps)
        return time.perf_counter() - t0

    profile = {"batch": b, "steps": plan.profile_steps, "torch": torch_profile(profiled_steps),
               "python_cumulative_s": python_profile(profiled_steps)}
    rates_after = machine_rates(1.0)
    return report(plan, runner, rates_before, rates_after, prefill, decode, profile,
                  {"load_start": load_start, "load_end": os.getloadavg(), "total_s": time.perf_counter() - t_start,
                   "chunked_first_token_matches_one_step": chunked_ok, "kv_max_abs_diff_vs_hf": kv_diff})


def warm_up(driver: NimbusDriver, hf: Any, prompt: list[int]) -> bool:
    """First calls of both; returns whether a chunked prefill samples the same first token as one step."""
    short = prompt[:64]
    tables, firsts, _ = driver.prefill([short], None)
    _, chunked_firsts, _ = driver.prefill([short], 16)
    driver.decode([short], firsts, tables, driver.blocks(1), 3)
    cache, _ = hf_prefill(hf, [short])
    hf_decode(hf, [short], firsts, cache_layers(cache), 3)
    return chunked_firsts == firsts


def prefill_all(driver: NimbusDriver, hf: Any, prompts: list[list[int]]) -> tuple[Any, ...]:
    """Nimbus prefills every prompt, one step and chunked alternating per group; transformers prefills the
    first HF_PREFILL_GROUPS groups for the comparison and to check the K/V it will decode from."""
    tables: list[list[int]] = []
    firsts: list[int] = []
    times: dict[str, list[float]] = {"one_step": [], "chunked": [], "hf": []}
    kv_diff = 0.0
    for g in range(0, len(prompts), GROUP):
        group = prompts[g : g + GROUP]
        chunked = (g // GROUP) % 2 == 1
        t, f, seconds = driver.prefill(group, CHUNK if chunked else None)
        tables += t
        firsts += f
        times["chunked" if chunked else "one_step"].append(seconds)
        if g < HF_PREFILL_GROUPS * GROUP:
            cache, seconds = hf_prefill(hf, group)
            times["hf"].append(seconds)
            kv_diff = max(kv_diff, max_abs_diff(paged_kv_as_hf(driver.runner, t), cache_layers(cache)))
    return tables, firsts, times, kv_diff


def decode_batch(driver: NimbusDriver, hf: Any, plan: Plan, b: int, prompts: list[list[int]], firsts: list[int],
                 tables: list[list[int]], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DecodeResult:
    result = DecodeResult(b, os.getloadavg()[0])
    fresh = driver.blocks(b * (-(-plan.decode_steps // BLOCK) + 1))
    for _ in range(plan.rounds):
        step_s, forward_s = driver.decode(prompts[:b], firsts[:b], tables[:b], fresh, plan.decode_steps)
        result.nimbus.append(step_s)
        result.forward.append(forward_s)
        hf_s, wall = hf_decode(hf, prompts[:b], firsts[:b], layers, plan.decode_steps)
        result.hf.append(hf_s)
        result.hf_wall.append(wall)
    driver.next_block -= len(fresh)  # the next batch size reuses these blocks
    return result


# --------------------------------------------------------------------------------------------- report
def report(plan: Plan, runner: ModelRunner, before: dict[str, float], after: dict[str, float],
           prefill: dict[str, list[float]], decode: list[DecodeResult], profile: dict[str, Any],
           run_info: dict[str, Any]) -> dict[str, Any]:
    rates = {k: max(before[k], after[k]) for k in before}
    # The reference: the best float32 rate seen, either shape, before or after (the least disturbed).
    mm = rates["mm_f32_best_gflops"] = max(rates["mm_2048_gflops"], rates["mm_decode_gflops"])
    f = flop_counts(runner)
    group_tokens = GROUP * PROMPT_LEN
    prefill_fpt = prefill_flops_per_token(f, PROMPT_LEN)
    pre = {}
    for mode, times in prefill.items():
        tps = group_tokens / statistics.median(times)
        pre[mode] = {"tokens_per_s": tps, "group_s": times, "mm_fraction": tps * prefill_fpt / 1e9 / mm}
    context = PROMPT_LEN + 1 + (plan.decode_steps - 1) / 2  # mean over the timed steps
    rows = []
    for d in decode:
        step, fwd, hf_step = (least_disturbed(x) for x in (d.nimbus, d.forward, d.hf))
        pairs = [(s, w) for rs, rw in zip(d.nimbus, d.forward) for s, w in zip(rs, rw)]
        overhead = statistics.median(s - w for s, w in pairs)
        tps = d.batch / step
        rows.append({
            "batch": d.batch, "load": d.load, "nimbus_tokens_per_s": tps, "forward_tokens_per_s": d.batch / fwd,
            "executor_overhead_ms": 1e3 * overhead, "executor_overhead_share": overhead / step,
            "hf_tokens_per_s": d.batch / hf_step, "ratio": hf_step / step,
            "ratio_all_steps_median": statistics.median(sum(d.hf, [])) / statistics.median(sum(d.nimbus, [])),
            "mm_fraction": tps * decode_flops_per_token(f, context) / 1e9 / mm,
            "nimbus_step_s": d.nimbus, "forward_s": d.forward, "hf_step_s": d.hf, "hf_wall_s": d.hf_wall,
        })
    return {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "attention": type(runner.attention).__name__},
        "plan": asdict(plan), "rates": rates, "rates_before": before, "rates_after": after,
        "flops": {**f, "decode_per_token": decode_flops_per_token(f, context), "decode_mean_context": context,
                  "prefill_per_token": prefill_fpt},
        "prefill": pre, "decode": rows, "profile": profile, "run": run_info,
    }


def print_report(r: dict[str, Any]) -> None:
    m, rates = r["machine"], r["rates"]
    cores = m["cores"] or 1
    if max(r["run"]["load_start"][0], r["run"]["load_end"][0]) > cores:
        print(f"\nWARNING: load average above the {cores} cores: other work slowed this run; read the ratios")
    print(f"\n{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['cpu_capability']}), transformers "
          f"{m['transformers']}, {m['threads']} torch threads, {m['attention']}; load average {r['run']['load_start'][0]:.1f} -> "
          f"{r['run']['load_end'][0]:.1f}; run took {r['run']['total_s']:.0f} s")
    print(f"float32 mm: 2048^3 {rates['mm_2048_gflops']:.0f} GFLOP/s, 64x576 @ 576x1536 "
          f"{rates['mm_decode_gflops']:.0f} GFLOP/s (best of before/after; fractions below are of "
          f"{rates['mm_f32_best_gflops']:.0f})\nbfloat16 mm: {rates['mm_2048_bf16_gflops']:.0f} and "
          f"{rates['mm_decode_bf16_gflops']:.0f} GFLOP/s; memory read {rates['read_gbs']:.0f} GB/s")
    fl = r["flops"]
    print(f"FLOPs/token: decode {fl['decode_per_token'] / 1e6:.0f} M at context {fl['decode_mean_context']:.1f}, "
          f"prefill {fl['prefill_per_token'] / 1e6:.0f} M (256-token prompts)")
    print(f"\nprefill, {GROUP} prompts x {PROMPT_LEN} tokens per group (median group):")
    labels = {"one_step": "Nimbus, one step", "chunked": f"Nimbus, {PROMPT_LEN // CHUNK} chunks of {CHUNK}",
              "hf": "transformers forward"}
    for mode, p in r["prefill"].items():
        print(f"  {labels[mode]:<24} {p['tokens_per_s']:7.0f} tok/s  {100 * p['mm_fraction']:4.0f}% of mm rate")
    print(f"  K/V that transformers decodes from: Nimbus's, largest difference from its own "
          f"{r['run']['kv_max_abs_diff_vs_hf']:.1e}")
    if not r["run"]["chunked_first_token_matches_one_step"]:
        print("  WARNING: a chunked prefill sampled another first token than the same prompt in one step")
    p = r["plan"]
    print(f"\ndecode after 256-token prompts, greedy, {p['rounds']} alternating rounds of {p['decode_steps']} steps; "
          "tokens/s from the least disturbed round's median step:")
    print("  batch  load  Nimbus  forward  exec+sampler  transformers  Nimbus/HF (all steps)  of mm rate")
    for d in r["decode"]:
        print(f"  {d['batch']:5d} {d['load']:5.1f} {d['nimbus_tokens_per_s']:7.1f} {d['forward_tokens_per_s']:8.1f} "
              f"{d['executor_overhead_ms']:6.1f} ms {100 * d['executor_overhead_share']:3.0f}% "
              f"{d['hf_tokens_per_s']:10.1f}   {d['ratio']:6.2f}x ({d['ratio_all_steps_median']:.2f}x)"
              f"  {100 * d['mm_fraction']:8.0f}%")
    prof = r["profile"]
    t = prof["torch"]
    n = prof["steps"]
    print(f"\nprofile of {n} decode steps at batch {prof['batch']} ({1e3 * t['wall_s'] / n:.0f} ms a step under "
          "torch.profiler), self time per step by kind:")
    for name, s in sorted(t["buckets_s"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:<36} {1e3 * s / n:7.1f} ms {100 * s / t['wall_s']:4.0f}%")
    print("  top ops: " + ", ".join(f"{o['op']} {1e3 * o['self_s'] / n:.1f}" for o in t["top_ops"][:8]))
    print("  worker Python, cProfile cumulative ms per step: " + ", ".join(
        f"{k} {1e3 * v / n:.1f}" for k, v in prof["python_cumulative_s"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8, fewer steps (under a minute)")
    parser.add_argument("--json", metavar="OUT", help="also write every measurement to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = run(QUICK if args.quick else FULL)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
