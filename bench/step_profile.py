"""Where one forward step's time goes: a 2,048-token prefill step and a batch-64 decode step of the default model.

Runs `ModelRunner.forward` directly (no daemon, no sockets) on SmolLM2-135M, times each step (and a batch-64 decode
whose sequences share a 512-token prefix, as in the shared-prefix workload), then profiles the first two with
torch.profiler and prints the ops by self CPU time. docs/benchmarks.md quotes it before and after each change to
the forward pass.

    .venv/bin/python bench/step_profile.py [--dtype bfloat16] [--threads 2] [--context 320]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from daemon.models import pull
from worker.runner import ModelRunner, SeqChunk

PROMPT = 256
PREFILL_SEQS = 8  # 8 x 256 = 2,048 tokens, the scheduler's default token budget
BATCH = 64
BLOCK = 16
SHARED, SHARED_CONTEXT = 512, 600  # the shared-prefix workload's decodes: a 512-token prefix, then their own


def timed(run, n: int) -> float:
    run()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


def table(run, steps: int, rows: int = 12) -> str:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=320, help="tokens each decoding sequence attends to")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(pull(None))
    blocks_per_seq = -(-max(args.context + 1, PROMPT) // BLOCK)
    runner = ModelRunner(folder, dtype=args.dtype, block_size=BLOCK)  # the default 2 GiB pool holds the batch
    assert runner.num_blocks >= BATCH * blocks_per_seq, "context too long for the default KV pool"
    print(f"{folder.name} {runner.dtype}, {args.threads} threads, weights: {runner.model.weight_layouts()}, "
          f"attention: {type(runner.attention).__name__}, elementwise: {type(runner.model.ops).__name__}")
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(BATCH)]
    prompt = [100 + j % 500 for j in range(PROMPT)]
    prefill = [SeqChunk(prompt, 0, tables[i]) for i in range(PREFILL_SEQS)]
    decode = [SeqChunk([5], args.context, tables[i]) for i in range(BATCH)]
    # the shared-prefix workload's decodes: every sequence's first SHARED positions in the same blocks (as the
    # prefix cache leaves them), then blocks of its own up to the context
    own = -(-(SHARED_CONTEXT + 1) // BLOCK) - SHARED // BLOCK
    base = BATCH * blocks_per_seq
    assert runner.num_blocks >= base + SHARED // BLOCK + BATCH * own, "the shared-prefix batch does not fit the pool"
    prefix = list(range(base, base + SHARED // BLOCK))
    base += len(prefix)
    shared = [SeqChunk([5], SHARED_CONTEXT, prefix + list(range(base + i * own, base + (i + 1) * own)))
              for i in range(BATCH)]
    t_prefill = timed(lambda: runner.forward(prefill), 3)
    t_decode = timed(lambda: runner.forward(decode), 10)
    t_shared = timed(lambda: runner.forward(shared), 10)
    print(f"prefill {PREFILL_SEQS} x {PROMPT} tokens: {t_prefill * 1e3:.0f} ms ({PREFILL_SEQS * PROMPT / t_prefill:.0f} "
          f"tok/s); decode batch {BATCH} at context {args.context}: {t_decode * 1e3:.1f} ms a step; sharing "
          f"{SHARED} of {SHARED_CONTEXT} positions: {t_shared * 1e3:.1f} ms a step")
    print("\nprefill step, 2 steps profiled\n" + table(lambda: runner.forward(prefill), 2))
    print("\ndecode step, 5 steps profiled\n" + table(lambda: runner.forward(decode), 5))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
