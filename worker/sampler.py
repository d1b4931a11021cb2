"""Batched token sampler: logit bias, min_tokens, penalties, greedy and seeded random draws, logprobs."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from worker import kernels

# Temperatures below this sample greedily (as in vLLM): dividing logits by them overflows float32.
GREEDY_TEMPERATURE = 1e-5


class ParamsLike(Protocol):
    """What the sampler reads from a sequence's sampling parameters (protocol.messages.SamplingParams)."""

    @property
    def temperature(self) -> float: ...  # 0 = greedy
    @property
    def top_p(self) -> float: ...  # 1 = off
    @property
    def top_k(self) -> int: ...  # 0 = off
    @property
    def min_p(self) -> float: ...  # 0 = off
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...  # 1 = off
    @property
    def seed(self) -> int | None: ...
    @property
    def logprobs(self) -> int | None: ...  # None = none; N = chosen token's logprob plus the top N
    @property
    def logit_bias(self) -> dict[int, float] | None: ...
    @property
    def min_tokens(self) -> int: ...
    @property
    def stop_token_ids(self) -> tuple[int, ...]: ...


def generator_seed(seed: int, position: int) -> int:
    """The 64-bit generator seed for drawing the token at `position` of a request seeded with `seed`.

    Depending only on (seed, position) makes a seeded draw independent of the batch it runs in and of
    how many steps this worker has run, so a sequence resumed after a failover samples as it would have.
    """
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class SamplingBatch:
    """One step's per-row sampling parameters as device tensors; a None field means no row needs it."""

    vocab_size: int
    greedy: torch.Tensor  # [B] bool: temperature ~0 or top_k == 1
    all_greedy: bool
    temperature: torch.Tensor  # [B, 1] float32; greedy rows hold 1 so dividing by it is harmless
    top_k: torch.Tensor | None  # [B] int64 number of tokens kept; vocab_size where off
    top_p: torch.Tensor | None  # [B, 1] float32
    log_min_p: torch.Tensor | None  # [B, 1] float32 log(min_p); -inf where off
    presence_penalty: torch.Tensor | None  # [B, 1]; set together with frequency_penalty and output_counts
    frequency_penalty: torch.Tensor | None  # [B, 1]
    output_counts: torch.Tensor | None  # [B, V] float32 occurrences of each token in the row's output
    repetition_penalty: torch.Tensor | None  # [B, 1]; set together with seen
    seen: torch.Tensor | None  # [B, V] bool: token occurs in the prompt or the output
    bias_index: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) of logit_bias entries
    bias_values: torch.Tensor | None
    ban_index: tuple[torch.Tensor, torch.Tensor] | None  # (rows, stop ids) banned until min_tokens
    generators: list[tuple[int, torch.Generator]]  # (row, generator) for seeded random rows
    any_unseeded: bool  # some random row draws from the shared generator
    num_logprobs: int | None  # max top-N asked in the batch; None when no row asks for logprobs

    @classmethod
    def build(
        cls,
        params: Sequence[ParamsLike],
        token_ids: Sequence[Sequence[int]],
        num_prompt_tokens: Sequence[int],
        device: torch.device,
        vocab_size: int,
    ) -> SamplingBatch:
        """Precompute the step's tensors. token_ids[i] is row i's whole history (prompt, then output);
        the token being sampled goes at position len(token_ids[i])."""
        if not len(params) == len(token_ids) == len(num_prompt_tokens):
            raise ValueError("params, token_ids and num_prompt_tokens must have one entry per row")
        greedy = [p.temperature < GREEDY_TEMPERATURE or p.top_k == 1 for p in params]
        # Filters only matter for rows that draw at random; greedy rows never pay for them.
        rand = [p for p, g in zip(params, greedy) if not g]
        outputs = [t[n:] for t, n in zip(token_ids, num_prompt_tokens)]
        asked = [p.logprobs for p in params if p.logprobs is not None]

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

        top_k = None
        if any(1 < p.top_k < vocab_size for p in rand):
            kept = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
            top_k = torch.tensor(kept, dtype=torch.int64, device=device)
        top_p = column([min(p.top_p, 1.0) for p in params]) if any(p.top_p < 1 for p in rand) else None
        log_min_p = None
        if any(p.min_p > 0 for p in rand):
            log_min_p = column([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params])
        generators = [
            (row, torch.Generator(device=device).manual_seed(generator_seed(p.seed, len(t))))
            for row, (p, t, g) in enumerate(zip(params, token_ids, greedy))
            if p.seed is not None and not g
        ]
        return cls(
            vocab_size=vocab_size,
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            temperature=column([1.0 if g else p.temperature for p, g in zip(params, greedy)]),
            top_k=top_k,
            top_p=top_p,
            log_min_p=log_min_p,
            **_penalties(params, token_ids, num_prompt_tokens, outputs, device, vocab_size),
            **_bias(params, device, vocab_size),
            ban_index=_min_tokens_ban(params, outputs, device, vocab_size),
            generators=generators,
            any_unseeded=any(p.seed is None for p in rand),
            num_logprobs=min(max(asked), vocab_size) if asked else None,
        )


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32 chosen token's logprob (meaningful in rows that asked)
    top_token_ids: torch.Tensor | None  # [B, N] int64, N = max top-N asked (may be 0)
    top_logprobs: torch.Tensor | None  # [B, N] float32, descending


def sample(logits: torch.Tensor, batch: SamplingBatch, inplace: bool = False) -> SampleOutput:
    """Pick one token per row from logits [B, V]. The caller's tensor is modified only with `inplace` (the
    executor's logits are its own: banning min_tokens' stop ids out of place copied the whole batch).

    Logits in a narrower dtype (a bfloat16 model's LM head) are widened to float32 first, except for greedy
    batches that only ban tokens: their argmax over the narrow values is the one over the widened ones, since
    widening is exact and keeps the order, and skipping it saved ~0.9 ms a decode step at batch 64."""
    if logits.dtype != torch.float32 and not _greedy_bans_only(batch):
        logits, inplace = logits.float(), True
    logits = _process(logits, batch, inplace)
    token_ids = argmax_rows(logits)
    if not batch.all_greedy:
        token_ids = torch.where(batch.greedy, token_ids, _draw(logits, batch))
    if batch.num_logprobs is None:
        return SampleOutput(token_ids, None, None, None)
    # Logprobs describe the model's distribution after bias, penalties and min_tokens but before
    # temperature and the top-k/top-p/min-p filters (vLLM's "processed_logprobs" minus the sampling
    # transforms): a filtered token would otherwise read -inf, and a greedy row's would be undefined.
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top = logprobs.topk(batch.num_logprobs, dim=-1)  # sorted descending
    return SampleOutput(token_ids, chosen, top.indices, top.values)


def _greedy_bans_only(batch: SamplingBatch) -> bool:
    return (batch.all_greedy and batch.num_logprobs is None and batch.bias_index is None
            and batch.repetition_penalty is None and batch.output_counts is None)


def _process(logits: torch.Tensor, batch: SamplingBatch, inplace: bool = False) -> torch.Tensor:
    """Logit bias, min_tokens ban, repetition then presence/frequency penalties (out of place unless
    `inplace`: then bias and ban write into `logits`)."""
    if batch.bias_index is not None:
        put = logits.index_put_ if inplace else logits.index_put
        logits = put(batch.bias_index, batch.bias_values, accumulate=True)
    if batch.ban_index is not None:
        put = logits.index_put_ if inplace else logits.index_put
        logits = put(batch.ban_index, logits.new_tensor(-math.inf))
    if batch.repetition_penalty is not None:
        # HF/vLLM: dividing a positive logit and multiplying a negative one both make the token less likely.
        rep = batch.repetition_penalty
        logits = torch.where(batch.seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if batch.output_counts is not None:
        counts = batch.output_counts
        logits = logits - batch.frequency_penalty * counts - batch.presence_penalty * (counts > 0)
    return logits


def _draw(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Random draw for every row (greedy rows' results are discarded by the caller)."""
    logits = logits / batch.temperature
    if batch.top_k is not None or batch.top_p is not None:
        logits = _apply_top_k_top_p(logits, batch.top_k, batch.top_p)
    if batch.log_min_p is not None:
        # p < min_p * p_max  <=>  logit < max_logit + log(min_p): no extra softmax needed.
        threshold = logits.amax(dim=-1, keepdim=True) + batch.log_min_p
        logits = logits.masked_fill(logits < threshold, -math.inf)
    probs = logits.softmax(dim=-1)
    # Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) picks token i with probability p_i, and
    # lets each row take its noise from its own generator without a per-row multinomial call.
    q = torch.empty_like(probs)
    if batch.any_unseeded:
        q.exponential_()
    for row, generator in batch.generators:
        q[row].exponential_(generator=generator)
    # A zero draw would make 0/0 = NaN, which argmax prefers over everything, banned tokens included.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return argmax_rows(probs.div_(q))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for a [B, V] batch (the first maximum; a NaN counts as the largest). On CPU it runs
    the fused ops library's kernel where that builds: torch's took 2.6-3.6 ms on a batch of 64 x 49152
    float32 logits, 5% of a decode step, and the kernel 0.3-0.45 (docs/benchmarks.md)."""
    if x.device.type == "cpu" and x.dim() == 2 and x.dtype in _ARGMAX_DTYPES and x.stride(1) == 1 and x.numel():
        op = _cpu_argmax()
        if op is not None:
            out = torch.empty(x.shape[0], dtype=torch.int64)
            op(out, x)
            return out
    return x.argmax(dim=-1)


_ARGMAX_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def _cpu_argmax() -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    try:
        return kernels.fused_ops().argmax_rows
    except Exception:  # no compiler here: torch's argmax is correct, only slower
        return None


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask all but each row's top-k, then its top-p nucleus of what remains, with one sort per batch."""
    sorted_logits = logits.sort(dim=-1, descending=True).values
    vocab = logits.shape[-1]
    keep = top_k if top_k is not None else torch.full_like(logits[:, 0], vocab, dtype=torch.int64)
    if top_p is not None:
        rank = torch.arange(vocab, device=logits.device)
        probs = sorted_logits.masked_fill(rank >= keep.unsqueeze(1), -math.inf).softmax(dim=-1)
        # Keep a token while the mass strictly above it is below top_p: the smallest prefix reaching
        # top_p, and always the top token. The shifted cumsum is exactly monotone, so counting works.
        mass_above = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
        nucleus = (mass_above < top_p).sum(dim=-1)
        # Rows with top_p = 1 keep everything even if rounding makes the total mass land below 1.
        keep = torch.where(top_p.squeeze(1) < 1, torch.minimum(nucleus, keep), keep)
    threshold = sorted_logits.gather(1, (keep - 1).unsqueeze(1))
    # Ties with the last kept logit are kept too; masks by value so no scatter back is needed.
    return logits.masked_fill(logits < threshold, -math.inf)


def _token_counts(rows: Sequence[Sequence[int]], device: torch.device, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 occurrences of each token per row, by one scatter_add over padded ids."""
    width = max((len(r) for r in rows), default=0)
    # Padding with vocab_size lands in an extra column that is dropped afterwards.
    padded = torch.tensor([[*r, *[vocab_size] * (width - len(r))] for r in rows], dtype=torch.int64)
    padded = padded.reshape(len(rows), width).to(device)
    counts = torch.zeros(len(rows), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def _penalties(
    params: Sequence[ParamsLike],
    token_ids: Sequence[Sequence[int]],
    num_prompt_tokens: Sequence[int],
    outputs: Sequence[Sequence[int]],
    device: torch.device,
    vocab_size: int,
) -> dict[str, torch.Tensor | None]:
    """Penalty columns and the token statistics they need, built only if some row uses them."""
    any_presence = any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params)
    any_repetition = any(p.repetition_penalty != 1 for p in params)
    names = ("presence_penalty", "frequency_penalty", "output_counts", "repetition_penalty", "seen")
    out: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    if not (any_presence or any_repetition):
        return out
    counts = _token_counts(outputs, device, vocab_size)

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

    if any_presence:
        out["presence_penalty"] = column([p.presence_penalty for p in params])
        out["frequency_penalty"] = column([p.frequency_penalty for p in params])
        out["output_counts"] = counts
    if any_repetition:
        prompts = [t[:n] for t, n in zip(token_ids, num_prompt_tokens)]
        out["repetition_penalty"] = column([p.repetition_penalty for p in params])
        out["seen"] = (counts > 0) | (_token_counts(prompts, device, vocab_size) > 0)
    return out


def _bias(params: Sequence[ParamsLike], device: torch.device, vocab_size: int) -> dict[str, object]:
    """Sparse (rows, token ids, values) of every row's logit_bias."""
    entries = [(row, tok, val) for row, p in enumerate(params) for tok, val in (p.logit_bias or {}).items()]
    if not entries:
        return {"bias_index": None, "bias_values": None}
    rows, toks, vals = zip(*entries)
    # The API validates ids against the tokenizer; one outside the model's vocabulary is a caller bug.
    if not all(0 <= t < vocab_size for t in toks):
        raise ValueError(f"logit_bias token id outside the vocabulary of {vocab_size}")
    index = (torch.tensor(rows, device=device), torch.tensor(toks, device=device))
    return {"bias_index": index, "bias_values": torch.tensor(vals, dtype=torch.float32, device=device)}


def _min_tokens_ban(
    params: Sequence[ParamsLike], outputs: Sequence[Sequence[int]], device: torch.device, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, stop ids) to set to -inf for rows that have not yet produced min_tokens tokens."""
    # A stop id the model cannot emit needs no ban, so ids outside the vocabulary are skipped.
    pairs = [
        (row, tok)
        for row, (p, out) in enumerate(zip(params, outputs))
        if len(out) < p.min_tokens
        for tok in p.stop_token_ids
        if 0 <= tok < vocab_size
    ]
    if not pairs:
        return None
    rows, toks = zip(*pairs)
    return torch.tensor(rows, device=device), torch.tensor(toks, device=device)
