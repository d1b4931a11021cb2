"""The model runtime against transformers' own implementation, on tiny random checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import VARIANTS, make_tiny_checkpoint

from protocol.messages import (
    NewSequence,
    SamplingParams,
    Step,
    decode,
    encode,
    pack_ints,
    unpack_floats,
    unpack_ints,
)
from worker.attention import select_attention
from worker.config import ModelConfig, UnsupportedModelError
from worker.executor import StepError, StepExecutor
from worker.runner import ModelRunner, SeqChunk, parse_size

BLOCK = 4
TOL = 1e-4


@pytest.fixture(scope="module", params=[*VARIANTS, "llama-sharded"])
def tiny(request, tmp_path_factory):
    variant = request.param.removesuffix("-sharded")
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_checkpoint(variant, folder, sharded=request.param.endswith("sharded"))
    runner = ModelRunner(folder, device="cpu", kv_cache_bytes=2 * 1024 * 1024, block_size=BLOCK)
    return hf, runner


class Blocks:
    """A minimal block allocator for driving the runner by hand."""

    def __init__(self, n: int) -> None:
        self.free = list(range(n))

    def cover(self, table: list[int], tokens: int) -> None:
        while len(table) * BLOCK < tokens:
            table.append(self.free.pop())


def test_interleaved_schedule_matches_transformers(tiny):
    hf, runner = tiny
    vocab = runner.config.vocab_size
    g = torch.Generator().manual_seed(1)
    toks = {s: torch.randint(0, vocab, (n,), generator=g).tolist() for s, n in dict(A=44, B=44, C=9, D=30).items()}
    toks["B"][:24] = toks["A"][:24]  # B shares A's first six full blocks
    ref = {s: hf(torch.tensor([t])).logits[0] for s, t in toks.items()}
    blocks = Blocks(runner.num_blocks)
    tables: dict[str, list[int]] = {s: [] for s in toks}
    done = dict.fromkeys(toks, 0)
    # (sequence, tokens to compute) per step: uneven prefill chunks, decodes, joins and leaves
    schedule = [
        [("A", 10), ("C", 5)],
        [("A", 17), ("C", 1)],
        [("A", 10), ("C", 1), ("B", 7)],
        [("A", 1), ("B", 6), ("C", 1)],
        [("D", 20), ("A", 1), ("B", 1)],  # C has left; its blocks go back to the pool and D reuses them
        [("A", 1), ("D", 1), ("B", 1)],
        [("D", 5), ("A", 1)],
        [("B", 1), ("A", 1), ("D", 1)],
    ]
    worst = 0.0
    for i, step in enumerate(schedule):
        if i == 2:  # B joins with A's first 24 tokens already computed in shared blocks
            tables["B"] = tables["A"][:6]
            done["B"] = 24
        if i == 4:
            blocks.free.extend(tables.pop("C"))
        chunks = []
        for s, n in step:
            blocks.cover(tables[s], done[s] + n)
            chunks.append(SeqChunk(toks[s][done[s] : done[s] + n], done[s], tables[s]))
        logits = runner.forward(chunks)
        for (s, n), row in zip(step, logits):
            done[s] += n
            worst = max(worst, (row - ref[s][done[s] - 1]).abs().max().item())
    assert worst < TOL, f"max |logit difference| {worst}"


@pytest.mark.parametrize("backend", ["paged", "torch"])
def test_a_sequence_reads_a_prefix_another_computes_in_the_same_step(tiny, backend):
    """The daemon caches a prompt's blocks when it builds the step computing them, so a sequence admitted into
    that step may attend them: every backend writes the step's K/V before any of its attention reads."""
    hf, runner = tiny
    default = runner.attention
    runner.attention = select_attention(runner.device, runner.dtype, runner.config.head_dim, backend)
    try:
        _prefix_in_the_same_step(hf, runner)
    finally:
        runner.attention = default  # the fixture is shared by the module's other tests


def _prefix_in_the_same_step(hf, runner: ModelRunner) -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, runner.config.vocab_size, (30,), generator=g).tolist()
    b = a[:24] + torch.randint(0, runner.config.vocab_size, (9,), generator=g).tolist()
    blocks = Blocks(runner.num_blocks)
    table_a: list[int] = []
    blocks.cover(table_a, len(a))
    table_b = table_a[:6]  # B's first 24 tokens are in A's blocks, which this very step fills
    blocks.cover(table_b, len(b))
    # B first in the batch: its rows' attention runs before or beside A's, never after all of A's work
    logits = runner.forward([SeqChunk(b[24:], 24, table_b), SeqChunk(a, 0, table_a)])
    for row, toks in zip(logits, (b, a)):
        want = hf(torch.tensor([toks])).logits[0, -1]
        assert (row - want).abs().max().item() < TOL


def _greedy_reference(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


def test_executor_greedy_matches_transformers(tiny):
    hf, runner = tiny
    executor = StepExecutor(runner, worker_id="w0")
    prompts = [[5, 7, 11, 13, 17, 19, 23], list(range(40, 70)), [3]]
    greedy = SamplingParams(temperature=0.0)
    blocks = Blocks(runner.num_blocks)
    tables = [[] for _ in prompts]
    for table, p in zip(tables, prompts):
        blocks.cover(table, len(p) + 12)
    new = tuple(
        NewSequence(seq_id=i, token_ids=pack_ints(p), num_prompt_tokens=len(p), num_computed_tokens=0,
                    block_ids=pack_ints(t), sampling=greedy)
        for i, (p, t) in enumerate(zip(prompts, tables))
    )
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    # first step: whole prompts of seqs 0 and 2, first chunk of seq 1 (no sample for it yet)
    steps = [Step(step_id=0, new_seqs=new, seq_ids=pack_ints([0, 1, 2]), num_tokens=pack_ints([7, 16, 1]))]
    steps.append(Step(step_id=1, seq_ids=pack_ints([0, 1, 2]), num_tokens=pack_ints([1, 14, 1])))
    steps += [Step(step_id=2 + k, seq_ids=pack_ints([0, 1, 2]), num_tokens=pack_ints([1, 1, 1])) for k in range(9)]
    for step in steps:
        # through the wire format both ways, as a worker gets the step and the daemon the result
        result = decode(encode(executor.execute(decode(encode(step)))))
        for sid, tok in zip(unpack_ints(result.seq_ids), unpack_ints(result.token_ids)):
            out[sid].append(tok)
    for i, p in enumerate(prompts):
        assert out[i] == _greedy_reference(hf, p, len(out[i])), f"sequence {i}"
    assert [len(v) for v in out.values()] == [11, 10, 11]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_executor_bans_and_biases_on_the_models_own_logits(tiny, dtype):
    """min_tokens' bans and logit_bias go through the executor (in place on the step's own logits, which the
    model made in inference mode; bfloat16 ones unwidened where greedy only bans)."""
    _, fp32_runner = tiny
    runner = fp32_runner if dtype == torch.float32 else ModelRunner(
        fp32_runner.folder, device="cpu", dtype=dtype, kv_cache_bytes=2 * 1024 * 1024, block_size=BLOCK)
    executor = StepExecutor(runner, worker_id="w0")
    favourite = 9
    params = [
        SamplingParams(temperature=0.0, logit_bias={favourite: 100.0}),  # forced every time
        SamplingParams(temperature=0.0, logit_bias={favourite: 100.0}, min_tokens=3, stop_token_ids=(favourite,)),
        SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=(favourite,)),  # banned, greedy: narrow path
        SamplingParams(temperature=0.7, seed=3, logit_bias={favourite: 100.0}),  # random rows widen
    ]
    blocks = Blocks(runner.num_blocks)
    tables = [[] for _ in params]
    for table in tables:
        blocks.cover(table, 4 + 6)
    new = tuple(NewSequence(seq_id=i, token_ids=pack_ints([5, 6, 7, 8]), num_prompt_tokens=4, num_computed_tokens=0,
                            block_ids=pack_ints(t), sampling=p) for i, (p, t) in enumerate(zip(params, tables)))
    ids = pack_ints(range(len(params)))
    steps = [Step(step_id=0, new_seqs=new, seq_ids=ids, num_tokens=pack_ints([4] * len(params)))]
    steps += [Step(step_id=k, seq_ids=ids, num_tokens=pack_ints([1] * len(params))) for k in range(1, 5)]
    out: dict[int, list[int]] = {i: [] for i in range(len(params))}
    for step in steps:
        result = executor.execute(step)
        for sid, tok in zip(unpack_ints(result.seq_ids), unpack_ints(result.token_ids)):
            out[sid].append(tok)
    assert out[0] == [favourite] * 5
    assert favourite not in out[1][:3] and out[1][3:] == [favourite] * 2
    assert favourite not in out[2][:4]
    assert out[3] == [favourite] * 5


def test_executor_rejects_bad_steps_and_changes_nothing(tiny):
    _, runner = tiny
    executor = StepExecutor(runner)
    seq = NewSequence(seq_id=1, token_ids=pack_ints([1, 2, 3]), num_prompt_tokens=3, num_computed_tokens=0,
                      block_ids=pack_ints([0]), sampling=SamplingParams(temperature=0.0))
    executor.execute(Step(step_id=0, new_seqs=(seq,), seq_ids=pack_ints([1]), num_tokens=pack_ints([3])))
    before = (list(executor.seqs), executor.seqs[1].num_computed, list(executor.seqs[1].token_ids))
    bad_steps = [
        Step(step_id=1, seq_ids=pack_ints([9]), num_tokens=pack_ints([1])),  # unknown sequence
        Step(step_id=1, seq_ids=pack_ints([1]), num_tokens=pack_ints([2])),  # more tokens than known
        Step(step_id=1, new_seqs=(seq,)),  # duplicate id
        Step(step_id=1, new_seqs=(NewSequence(2, pack_ints([runner.config.vocab_size]), 1, 0, pack_ints([1]),
                                              SamplingParams()),)),  # token outside the vocabulary
        Step(step_id=1, new_seqs=(NewSequence(2, pack_ints([1]), 1, 0, pack_ints([runner.num_blocks]),
                                              SamplingParams()),)),  # block outside the pool
        # a new sequence plus an append to an unknown one: the new sequence must not be kept either
        Step(step_id=1, new_seqs=(NewSequence(3, pack_ints([1]), 1, 0, pack_ints([1]), SamplingParams()),),
             append_seq_ids=pack_ints([7]), append_block_ids=pack_ints([2])),
    ]
    for bad in bad_steps:
        with pytest.raises(StepError):
            executor.execute(bad)
        assert (list(executor.seqs), executor.seqs[1].num_computed, list(executor.seqs[1].token_ids)) == before
    # blocks must cover the tokens computed: 4 tokens fit in one block of 4, a fifth needs another
    executor.execute(Step(step_id=2, seq_ids=pack_ints([1]), num_tokens=pack_ints([1])))
    with pytest.raises(StepError, match="blocks cover"):
        executor.execute(Step(step_id=4, seq_ids=pack_ints([1]), num_tokens=pack_ints([1])))


def test_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"]})
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10}
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_parse_size():
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("512MB") == 512 * 1000**2
    assert parse_size("1024") == 1024
    with pytest.raises(ValueError):
        parse_size("lots")


def test_a_step_of_prefill_chunks_only_still_writes_the_cache(tiny):
    # no sequence samples in the first two steps: the forward pass must run anyway
    hf, runner = tiny
    executor = StepExecutor(runner)
    prompt = list(range(30, 60))
    blocks = Blocks(runner.num_blocks)
    table: list[int] = []
    blocks.cover(table, len(prompt) + 4)
    new = NewSequence(seq_id=5, token_ids=pack_ints(prompt), num_prompt_tokens=len(prompt), num_computed_tokens=0,
                      block_ids=pack_ints(table), sampling=SamplingParams(temperature=0.0, logprobs=3))
    chunks = [Step(step_id=0, new_seqs=(new,), seq_ids=pack_ints([5]), num_tokens=pack_ints([11])),
              Step(step_id=1, seq_ids=pack_ints([5]), num_tokens=pack_ints([9])),
              Step(step_id=2, seq_ids=pack_ints([5]), num_tokens=pack_ints([10]))]
    results = [executor.execute(step) for step in chunks]
    assert [len(unpack_ints(r.seq_ids)) for r in results] == [0, 0, 1]
    assert unpack_ints(results[-1].token_ids).tolist() == _greedy_reference(hf, prompt, 1)
    expected = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1], -1).topk(3)
    assert unpack_floats(results[-1].top_logprobs).tolist() == pytest.approx(expected.values.tolist(), abs=TOL)


def test_the_runtime_benchmarks_runner_takes_what_the_executor_passes():
    # bench/runtime.py times ModelRunner.forward through a subclass; it broke once when forward gained a parameter
    import inspect

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from runtime import TimedRunner

    theirs = inspect.signature(ModelRunner.forward).parameters
    ours = inspect.signature(TimedRunner.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values())
    assert all(name in ours or takes_any for name in theirs)
