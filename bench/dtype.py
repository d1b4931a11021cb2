"""Float32 against bfloat16 for the worker runtime on this CPU: prefill and batch-64 decode, alternating.

A quick probe, not a full benchmark: `.venv/bin/python bench/dtype.py` (about a minute).
"""

from __future__ import annotations

import statistics
import time

import torch

from daemon.models import pull
from worker.runner import ModelRunner, SeqChunk

BATCH, CONTEXT, DECODE_STEPS = 64, 256, 6


def measure(dtype: str) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) for BATCH sequences of CONTEXT tokens."""
    runner = ModelRunner(pull(), device="cpu", dtype=dtype, kv_cache_bytes=1024**3, max_model_len=1024)
    blocks = -(-(CONTEXT + DECODE_STEPS) // runner.block_size)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(BATCH)]
    torch.manual_seed(0)
    prompts = [SeqChunk(torch.randint(100, 40000, (CONTEXT,)).tolist(), 0, t) for t in tables]
    t0 = time.perf_counter()
    runner.forward(prompts)
    prefill = BATCH * CONTEXT / (time.perf_counter() - t0)
    steps = []
    for s in range(DECODE_STEPS):
        t0 = time.perf_counter()
        runner.forward([SeqChunk([123], CONTEXT + s, t) for t in tables])
        steps.append(time.perf_counter() - t0)
    return prefill, BATCH / statistics.median(steps)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {BATCH} sequences of {CONTEXT} tokens")
    for dtype in ("float32", "bfloat16") * 2:
        prefill, decode = measure(dtype)
        print(f"{dtype:9s} prefill {prefill:6.0f} tok/s   decode {decode:6.1f} tok/s")


if __name__ == "__main__":
    main()
