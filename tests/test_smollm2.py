"""The real default model (SmolLM2-135M-Instruct): batched greedy decoding equals transformers' `generate`."""

from __future__ import annotations

import pytest
import torch

from daemon.models import pull
from worker.executor import StepExecutor, greedy
from worker.runner import ModelRunner

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a hash table is.",
    "List three prime numbers.",
    "Give me a short tip for learning to cook.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def folder():
    return pull()  # instant when `make test` has already installed it


def test_batched_greedy_equals_transformers_generate(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                return_dict=False)
        for p in PROMPTS
    ]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected, margins = [], []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        expected.append(out.sequences[0, len(p) :].tolist())
        margins.append([float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)])
    del hf

    runner = ModelRunner(folder, device="cpu", kv_cache_bytes=64 * 1024**2, max_model_len=1024)
    assert greedy(StepExecutor(runner), prompts, NEW_TOKENS) == expected

    # A bfloat16 KV cache under the float32 model (kv_cache_dtype) moves the logits by up to about 0.2 here: rows
    # a hair apart upstream can round to neighbouring bfloat16 values. So greedy output may part from transformers'
    # only where the two best logits were that close; anywhere else it would be a broken cache.
    runner = ModelRunner(folder, device="cpu", kv_cache_bytes=64 * 1024**2, max_model_len=1024,
                         kv_cache_dtype="bfloat16")
    assert runner.kv_cache.dtype == torch.bfloat16
    got = greedy(StepExecutor(runner), prompts, NEW_TOKENS)
    parted = [next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), None) for g, e in zip(got, expected)]
    assert all(i is None or m[i] < 0.25 for i, m in zip(parted, margins)), (parted, margins)
    assert parted.count(None) >= 3, parted  # most of them are the same to the last token
