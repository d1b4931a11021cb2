"""A null model for measuring the daemon: a worker that answers every step at once with a fixed token.

It speaks the real protocol and keeps the real per-sequence bookkeeping, so the daemon does all of
its work (scheduling, messaging, detokenization) while the worker costs next to nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from protocol.messages import Step, StepResult, pack_ints, unpack_ints
from worker.config import ModelConfig
from worker.executor import StepError

# ordinary word-piece ids in most vocabularies (no special tokens), cycled so the text varies
FIRST_TOKEN, NUM_TOKENS = 1000, 64


@dataclass(frozen=True, slots=True)
class NullRunner:
    """What the worker reports in its Hello, without weights or a KV pool."""

    config: ModelConfig
    device: str = "null"
    dtype: str = "none"
    num_blocks: int = 1 << 17  # two million tokens of pretend KV: 256 sequences of 8,192 tokens
    block_size: int = 16
    max_model_len: int = 8192

    @classmethod
    def from_folder(cls, folder: str | Path, max_model_len: int | None = None) -> NullRunner:
        config = ModelConfig.from_folder(folder)
        return cls(config, max_model_len=min(max_model_len or config.max_position_embeddings,
                                             config.max_position_embeddings))


class NullExecutor:
    def __init__(self, runner: NullRunner, worker_id: str = "", incarnation: int = 0) -> None:
        self.runner = runner
        self.worker_id = worker_id
        self.incarnation = incarnation
        self.seqs: dict[int, list[int]] = {}  # seq_id -> [known tokens, computed tokens]

    def reset(self) -> None:
        self.seqs.clear()

    def execute(self, step: Step) -> StepResult:
        t0 = time.perf_counter()
        for sid in unpack_ints(step.free_seq_ids):
            self.seqs.pop(sid, None)
        for new in step.new_seqs:
            self.seqs[new.seq_id] = [len(new.token_ids) // 4, new.num_computed_tokens]
        sampled, tokens = [], []
        for sid, n in zip(unpack_ints(step.seq_ids), unpack_ints(step.num_tokens)):
            state = self.seqs.get(sid)
            if state is None or state[1] + n > state[0]:
                raise StepError(f"sequence {sid}: bad step for the null model")
            state[1] += n
            if state[1] == state[0]:
                state[0] += 1
                sampled.append(sid)
                tokens.append(FIRST_TOKEN + state[0] % NUM_TOKENS)
        return StepResult(step_id=step.step_id, worker_id=self.worker_id, incarnation=self.incarnation,
                          seq_ids=pack_ints(sampled), token_ids=pack_ints(tokens),
                          forward_s=time.perf_counter() - t0)
