"""The real default model (SmolLM2-135M-Instruct): batched greedy decoding equals transformers' `generate`,
and over a bfloat16 KV cache its logits stay close to transformers' float32 ones."""

from __future__ import annotations

import pytest
import torch

from daemon.models import pull
from worker.executor import StepExecutor, greedy
from worker.runner import ModelRunner, SeqChunk

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a hash table is.",
    "List three prime numbers.",
    "Give me a short tip for learning to cook.",
]
NEW_TOKENS = 32
LOGIT_TOLERANCE = 0.5  # bfloat16 KV cache against float32 (measured up to about 0.2 here)


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
    expected, scores = [], []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        expected.append(out.sequences[0, len(p) :].tolist())
        scores.append([s[0] for s in out.scores])  # float32 logits of each step (greedy: nothing processes them)
    del hf

    runner = ModelRunner(folder, device="cpu", kv_cache_bytes=64 * 1024**2, max_model_len=1024)
    assert greedy(StepExecutor(runner), prompts, NEW_TOKENS) == expected

    # A bfloat16 KV cache under the float32 model (kv_cache_dtype), teacher-forced along transformers' tokens:
    # rounding K and V moves the logits a little (rows a hair apart upstream can round to neighbouring bfloat16
    # values, so greedy output may part at near-ties), but every logit stays within LOGIT_TOLERANCE of float32's,
    # so every token that led by more than twice that is still the argmax
    runner = ModelRunner(folder, device="cpu", kv_cache_bytes=64 * 1024**2, max_model_len=1024,
                         kv_cache_dtype="bfloat16")
    assert runner.kv_cache.dtype == torch.bfloat16
    per_seq = -(-(max(map(len, prompts)) + NEW_TOKENS) // runner.block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    logits = runner.forward([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)])
    worst = 0.0
    for step in range(NEW_TOKENS):
        for i, (reference, tokens) in enumerate(zip(scores, expected)):
            ref = reference[step]
            worst = max(worst, float((logits[i] - ref).abs().max()))
            top = ref.topk(2).values
            if top[0] - top[1] > 2 * LOGIT_TOLERANCE:
                assert int(logits[i].argmax()) == tokens[step], (i, step)
        if step + 1 < NEW_TOKENS:
            logits = runner.forward([SeqChunk([tokens[step]], len(p) + step, t)
                                     for p, tokens, t in zip(prompts, expected, tables)])
    assert worst < LOGIT_TOLERANCE, worst
