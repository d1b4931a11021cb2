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
    expected = []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        expected.append(out[0, len(p) :].tolist())
    del hf

    runner = ModelRunner(folder, device="cpu", kv_cache_bytes=64 * 1024**2, max_model_len=1024)
    assert greedy(StepExecutor(runner), prompts, NEW_TOKENS) == expected
