"""The worker's step executor: applies a `Step` to its sequence state, runs the forward pass, samples.

This is what the worker's ZeroMQ loop calls for every `Step` it receives; tests call it directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from protocol.messages import (
    NewSequence,
    SamplingParams,
    Step,
    StepResult,
    pack_floats,
    pack_ints,
    unpack_ints,
)
from worker.runner import ModelRunner, SeqChunk
from worker.sampler import SampleOutput, SamplingBatch, sample


class StepError(ValueError):
    """The step contradicts the worker's state (unknown sequence, bad block, too many tokens...)."""


@dataclass(slots=True)
class SeqState:
    token_ids: list[int]  # every token known: prompt, then the tokens sampled here
    num_prompt_tokens: int
    num_computed: int  # tokens whose K/V is in the cache
    block_ids: list[int]
    sampling: SamplingParams


class StepExecutor:
    def __init__(self, runner: ModelRunner, worker_id: str = "", incarnation: int = 0) -> None:
        self.runner = runner
        self.worker_id = worker_id
        self.incarnation = incarnation
        self.seqs: dict[int, SeqState] = {}

    def reset(self) -> None:
        """Forget every sequence (the daemon that owned them is gone)."""
        self.seqs.clear()

    def execute(self, step: Step) -> StepResult:
        t0 = time.perf_counter()
        batch = self._apply(step)
        if not batch:
            return self._result(step.step_id, [], [], None, t0)
        chunks = [SeqChunk(s.token_ids[s.num_computed : s.num_computed + n], s.num_computed, s.block_ids)
                  for _, s, n in batch]
        sampling_rows = [i for i, (_, s, n) in enumerate(batch) if s.num_computed + n == len(s.token_ids)]
        # Always run the pass: a step of prefill chunks only samples nothing but must still write K/V.
        logits = self.runner.forward(chunks, sampling_rows, float_logits=False)
        for _, state, n in batch:
            state.num_computed += n
        if not sampling_rows:
            return self._result(step.step_id, [], [], None, t0)
        samplers = [batch[i] for i in sampling_rows]
        with torch.inference_mode():  # the logits are inference tensors: sampling writes into them
            out = self._sample(logits, samplers)
        tokens = out.token_ids.tolist()
        for (_, state, _), token in zip(samplers, tokens):
            state.token_ids.append(token)
        return self._result(step.step_id, [sid for sid, _, _ in samplers], tokens, (samplers, out), t0)

    def _sample(self, logits: torch.Tensor, samplers: list[tuple[int, SeqState, int]]) -> SampleOutput:
        return sample(logits, SamplingBatch.build(
            [s.sampling for _, s, _ in samplers],
            [s.token_ids for _, s, _ in samplers],
            [s.num_prompt_tokens for _, s, _ in samplers],
            logits.device,
            self.runner.config.vocab_size,
        ), inplace=True)  # the logits are this step's own

    def _apply(self, step: Step) -> list[tuple[int, SeqState, int]]:
        """Validates the whole step against the current state, then applies it (all or nothing)."""
        freed = set(unpack_ints(step.free_seq_ids))
        live = {sid: s for sid, s in self.seqs.items() if sid not in freed}
        added = {new.seq_id: self._new_state(new, live) for new in step.new_seqs}
        live.update(added)
        appended: dict[int, list[int]] = {}  # seq_id -> its new blocks, in order
        for sid, block in zip(unpack_ints(step.append_seq_ids), unpack_ints(step.append_block_ids)):
            appended.setdefault(sid, []).append(block)
        appends: list[tuple[SeqState, list[int]]] = []
        for sid, blocks in appended.items():
            if sid not in live:
                raise StepError(f"blocks appended to unknown sequence {sid}")
            appends.append((live[sid], self._blocks(blocks)))
        seq_ids, counts = unpack_ints(step.seq_ids), unpack_ints(step.num_tokens)
        if len(seq_ids) != len(counts) or len(set(seq_ids)) != len(seq_ids):
            raise StepError("seq_ids and num_tokens must pair up, each sequence at most once")
        extra: dict[int, int] = {}
        for state, blocks in appends:
            extra[id(state)] = extra.get(id(state), 0) + len(blocks)
        batch = []
        for sid, n in zip(seq_ids, counts):
            state = live.get(sid)
            if state is None:
                raise StepError(f"step computes unknown sequence {sid}")
            end = state.num_computed + n
            if n < 1 or end > len(state.token_ids):
                raise StepError(f"sequence {sid}: {n} tokens asked, {len(state.token_ids) - state.num_computed} known")
            if end > (len(state.block_ids) + extra.get(id(state), 0)) * self.runner.block_size:
                raise StepError(f"sequence {sid}: blocks cover fewer than {end} tokens")
            batch.append((sid, state, n))
        # validated: apply
        self.seqs = live
        for state, blocks in appends:
            state.block_ids.extend(blocks)
        return batch

    def _new_state(self, new, live: dict[int, SeqState]) -> SeqState:
        if new.seq_id in live:
            raise StepError(f"sequence {new.seq_id} already exists")
        tokens = unpack_ints(new.token_ids).tolist()
        vocab, max_len = self.runner.config.vocab_size, self.runner.max_model_len
        if not tokens or len(tokens) >= max_len or min(tokens) < 0 or max(tokens) >= vocab:
            raise StepError(f"sequence {new.seq_id}: {len(tokens)} tokens must be 1..{max_len - 1} ids below {vocab}")
        if not 0 <= new.num_computed_tokens < len(tokens) or new.num_prompt_tokens > len(tokens):
            raise StepError(f"sequence {new.seq_id}: inconsistent computed/prompt token counts")
        return SeqState(tokens, new.num_prompt_tokens, new.num_computed_tokens,
                        self._blocks(unpack_ints(new.block_ids)), new.sampling)

    def _blocks(self, blocks) -> list[int]:
        out = blocks if isinstance(blocks, list) else blocks.tolist()
        if out and (min(out) < 0 or max(out) >= self.runner.num_blocks):
            raise StepError(f"block id outside 0..{self.runner.num_blocks - 1}")
        return out

    def _result(self, step_id: int, seq_ids: list[int], tokens: list[int], logprob_info, t0: float) -> StepResult:
        fields: dict = {}
        if logprob_info is not None:
            samplers, out = logprob_info
            rows = [i for i, (_, s, _) in enumerate(samplers) if s.sampling.logprobs is not None]
            if rows and out.logprobs is not None:
                idx = torch.tensor(rows)
                top_n = out.top_token_ids.shape[1] if out.top_token_ids is not None else 0
                fields = dict(
                    logprob_seq_ids=pack_ints(samplers[i][0] for i in rows),
                    logprobs=pack_floats(out.logprobs[idx].tolist()),
                    top_n=top_n,
                )
                if top_n:
                    fields["top_token_ids"] = pack_ints(out.top_token_ids[idx].flatten().tolist())
                    fields["top_logprobs"] = pack_floats(out.top_logprobs[idx].flatten().tolist())
        return StepResult(
            step_id=step_id,
            worker_id=self.worker_id,
            incarnation=self.incarnation,
            seq_ids=pack_ints(seq_ids),
            token_ids=pack_ints(tokens),
            forward_s=time.perf_counter() - t0,
            **fields,
        )


def greedy(executor: StepExecutor, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens for `prompts`, batched, through the executor as the worker runs steps (blocks taken from the
    start of its pool). What checks against other implementations use: tests/test_smollm2.py, bench/gpu_check.py."""
    runner = executor.runner
    blocks = iter(range(runner.num_blocks))
    seqs = []
    for i, p in enumerate(prompts):
        table = [next(blocks) for _ in range(-(-(len(p) + new_tokens) // runner.block_size))]
        seqs.append(NewSequence(i, pack_ints(p), len(p), 0, pack_ints(table), SamplingParams(temperature=0.0)))
    ids = pack_ints(range(len(prompts)))
    got: list[list[int]] = [[] for _ in prompts]
    step = Step(step_id=0, new_seqs=tuple(seqs), seq_ids=ids, num_tokens=pack_ints(len(p) for p in prompts))
    for k in range(new_tokens):
        result = executor.execute(step)
        for sid, token in zip(unpack_ints(result.seq_ids), unpack_ints(result.token_ids)):
            got[sid].append(token)
        step = Step(step_id=k + 1, seq_ids=ids, num_tokens=pack_ints([1] * len(prompts)))
    return got
