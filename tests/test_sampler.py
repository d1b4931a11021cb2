"""Tests for the batched sampler on synthetic logits (CPU, no model)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.sampler import SampleOutput, SamplingBatch, argmax_rows, generator_seed, sample

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Params:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()


def run(
    logits: torch.Tensor,
    params: Sequence[Params],
    history: Sequence[Sequence[int]] | None = None,
    num_prompt: Sequence[int] | None = None,
) -> SampleOutput:
    """Sample `logits` [B, V]; rows without a history get a one-token prompt."""
    history = history if history is not None else [[0]] * len(params)
    num_prompt = num_prompt if num_prompt is not None else [len(h) for h in history]
    batch = SamplingBatch.build(params, history, num_prompt, CPU, logits.shape[1])
    return sample(logits, batch)


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / len(tokens)


def chi_square(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson statistic of the drawn tokens against expected probabilities (zero cells must be empty)."""
    observed = torch.bincount(tokens, minlength=len(expected)).double()
    want = expected.double() * len(tokens)
    assert observed[want == 0].sum() == 0, "drew a token of probability zero"
    nonzero = want > 0
    return float(((observed[nonzero] - want[nonzero]) ** 2 / want[nonzero]).sum())


# Critical values of chi-square at p = 0.001, by degrees of freedom; fixed seeds make the tests
# deterministic, the margin keeps them honest if the seed or torch's generator changes.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 7: 24.32, 9: 27.88}

PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
PROBS_LOGITS = PROBS.log()


def copies(logits: torch.Tensor, n: int) -> torch.Tensor:
    return logits.unsqueeze(0).expand(n, -1).contiguous()


def test_greedy_picks_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [Params(temperature=0.0)] * 5 + [Params(top_k=1)]  # top_k = 1 is greedy too
    out = run(logits, params)
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None


def test_greedy_row_beside_random_rows() -> None:
    torch.manual_seed(1)
    logits = copies(torch.zeros(20), 64)
    logits[0, 7] = 0.5  # the greedy row's argmax, barely above a flat distribution
    params = [Params(temperature=0.0)] + [Params()] * 63
    for _ in range(20):
        out = run(logits, params)
        assert out.token_ids[0] == 7
    assert len(set(out.token_ids[1:].tolist())) > 5  # the random rows really are random


def entropy(tokens: torch.Tensor, vocab: int) -> float:
    p = frequencies(tokens, vocab)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def test_temperature_spreads_and_concentrates() -> None:
    torch.manual_seed(2)
    base = torch.randn(10) * 2
    logits = copies(base, 4000)
    h = {t: entropy(run(logits, [Params(temperature=t)] * 4000).token_ids, 10) for t in (0.3, 1.0, 3.0)}
    assert h[0.3] < h[1.0] - 0.2 < h[3.0] - 0.4
    cold = run(logits, [Params(temperature=0.05)] * 4000).token_ids
    assert frequencies(cold, 10)[base.argmax()] > 0.95


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.8])
def test_unseeded_distribution_matches_softmax(temperature: float) -> None:
    torch.manual_seed(3)
    base = torch.randn(8)
    tokens = run(copies(base, 20000), [Params(temperature=temperature)] * 20000).token_ids
    assert chi_square(tokens, (base / temperature).softmax(-1)) < CHI2_999[7]


def test_top_k_draws_only_the_k_largest() -> None:
    torch.manual_seed(4)
    base = torch.randn(20)
    tokens = run(copies(base, 4000), [Params(top_k=5, temperature=1.5)] * 4000).token_ids
    assert set(tokens.tolist()) == set(base.topk(5).indices.tolist())
    expected = torch.zeros(20).index_copy(0, base.topk(5).indices, (base.topk(5).values / 1.5).softmax(-1))
    assert chi_square(tokens, expected) < CHI2_999[4]


def test_top_p_keeps_the_nucleus_with_renormalised_frequencies() -> None:
    torch.manual_seed(5)
    # Cumulative 0.4, 0.7, 0.85: top_p = 0.8 is first reached by the third token.
    tokens = run(copies(PROBS_LOGITS, 20000), [Params(top_p=0.8)] * 20000).token_ids
    expected = torch.cat([PROBS[:3] / PROBS[:3].sum(), torch.zeros(2)])
    assert chi_square(tokens, expected) < CHI2_999[2]


def test_top_p_always_keeps_the_top_token() -> None:
    tokens = run(copies(PROBS_LOGITS, 500), [Params(top_p=0.01)] * 500).token_ids
    assert set(tokens.tolist()) == {0}


def test_top_k_then_top_p_renormalises_within_top_k() -> None:
    torch.manual_seed(6)
    # Within the top 2 (0.4, 0.3) the first holds 0.57 of the mass, so top_p = 0.5 keeps it alone.
    tokens = run(copies(PROBS_LOGITS, 500), [Params(top_k=2, top_p=0.5)] * 500).token_ids
    assert set(tokens.tolist()) == {0}


def test_min_p_drops_tokens_below_a_fraction_of_the_max() -> None:
    torch.manual_seed(7)
    # 0.3 * 0.4 = 0.12: tokens of probability 0.1 and 0.05 are dropped.
    tokens = run(copies(PROBS_LOGITS, 20000), [Params(min_p=0.3)] * 20000).token_ids
    expected = torch.cat([PROBS[:3] / PROBS[:3].sum(), torch.zeros(2)])
    assert chi_square(tokens, expected) < CHI2_999[2]


def processed_logprobs(logits: torch.Tensor, params: Sequence[Params], **kw: object) -> torch.Tensor:
    """The full [B, V] logprobs the sampler reports (V <= 20), i.e. log_softmax of processed logits."""
    out = run(logits, [replace(p, logprobs=logits.shape[1]) for p in params], **kw)
    assert out.top_token_ids is not None and out.top_logprobs is not None
    return torch.empty_like(logits).scatter_(1, out.top_token_ids, out.top_logprobs)


def test_presence_and_frequency_penalties_use_output_counts_only() -> None:
    logits = torch.zeros(1, 10)
    # Prompt [5, 6]; output [3, 3, 4, 5]: token 6 is in the prompt only, token 5 in both.
    history, num_prompt = [[5, 6, 3, 3, 4, 5]], [2]
    got = processed_logprobs(
        logits, [Params(presence_penalty=0.5, frequency_penalty=0.25)], history=history, num_prompt=num_prompt
    )
    want = torch.zeros(1, 10)
    want[0, 3] = -0.5 - 2 * 0.25  # frequency scales with the count
    want[0, 4] = -0.5 - 0.25
    want[0, 5] = -0.5 - 0.25  # only its output occurrence counts
    assert torch.allclose(got, want.log_softmax(-1), atol=1e-6)


@pytest.mark.parametrize(("penalty", "lower"), [(1.0, True), (-1.0, False)])
def test_presence_penalty_changes_the_chance_of_output_tokens(penalty: float, lower: bool) -> None:
    torch.manual_seed(8)
    n = 8000
    history, num_prompt = [[9, 3]] * n, [1] * n  # token 3 was generated, token 9 only prompted
    tokens = run(torch.zeros(n, 10), [Params(presence_penalty=penalty)] * n, history, num_prompt).token_ids
    freq = frequencies(tokens, 10)
    if lower:
        assert freq[3] < 0.06 and abs(freq[9] - freq[0]) < 0.03
    else:
        assert freq[3] > 0.18
    want = torch.zeros(10).index_fill(0, torch.tensor([3]), -penalty).softmax(-1)
    assert chi_square(tokens, want) < CHI2_999[9]


def test_repetition_penalty_covers_prompt_and_output_and_signs() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    history, num_prompt = [[0, 1, 2]], [2]  # tokens 0 and 1 in the prompt, token 2 in the output
    got = processed_logprobs(logits, [Params(repetition_penalty=2.0)], history=history, num_prompt=num_prompt)
    want = torch.tensor([[1.0, -4.0, 0.5, -1.0, 0.5]])  # positive divided, negative multiplied
    assert torch.allclose(got, want.log_softmax(-1), atol=1e-6)


def test_logit_bias_bans_and_forces() -> None:
    torch.manual_seed(9)
    logits = copies(PROBS_LOGITS, 2000)
    banned = run(logits, [Params(logit_bias={0: -100.0})] * 2000).token_ids
    assert 0 not in banned.tolist() and len(set(banned.tolist())) == 4
    forced = run(logits, [Params(logit_bias={4: 100.0})] * 2000).token_ids
    assert set(forced.tolist()) == {4}
    with pytest.raises(ValueError, match="logit_bias"):
        run(logits[:1], [Params(logit_bias={5: 1.0})])


def test_min_tokens_bans_stop_ids_until_reached() -> None:
    torch.manual_seed(10)
    logits = copies(torch.tensor([0.0, 1.0, 3.0, 0.5]), 4)
    params = [Params(temperature=0.0, min_tokens=3, stop_token_ids=(2, 99))] * 2 + [
        Params(min_tokens=3, stop_token_ids=(2,))
    ] * 2
    # Rows 0 and 2 have 2 output tokens (still banned), rows 1 and 3 have 3 (free again).
    history = [[7, 1, 1], [7, 1, 1, 1], [7, 1, 1], [7, 1, 1, 1]]
    for _ in range(50):
        out = run(logits, params, history, [1] * 4).token_ids
        assert out[0] == 1 and out[1] == 2 and out[2] != 2
    many = run(copies(logits[0], 2000), [params[3]] * 2000, [history[3]] * 2000, [1] * 2000).token_ids
    assert 2 in many.tolist()


def test_logprobs_are_pre_temperature_and_n_is_the_batch_max() -> None:
    torch.manual_seed(11)
    logits = torch.randn(4, 30)
    params = [
        Params(logprobs=2, temperature=0.5, top_k=3, logit_bias={1: 2.0}),
        Params(logprobs=5, temperature=0.0),
        Params(),
        Params(logprobs=0, top_p=0.5),
    ]
    out = run(logits, params)
    assert out.logprobs is not None and out.top_token_ids is not None and out.top_logprobs is not None
    processed = logits.clone()
    processed[0, 1] += 2.0
    want = processed.log_softmax(-1)
    rows = torch.tensor([0, 1, 3])
    assert torch.allclose(out.logprobs[rows], want[rows, out.token_ids[rows]])
    assert out.top_token_ids.shape == out.top_logprobs.shape == (4, 5)
    assert out.top_token_ids.dtype == torch.int64 and out.top_logprobs.dtype == torch.float32
    top = want.topk(5, dim=-1)
    assert torch.equal(out.top_token_ids, top.indices)
    assert torch.allclose(out.top_logprobs, top.values)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_logprobs_zero_gives_the_chosen_token_only() -> None:
    out = run(torch.randn(2, 10), [Params(logprobs=0), Params()])
    assert out.logprobs is not None and out.top_token_ids is not None
    assert out.top_token_ids.shape == (2, 0)


def flat_row_tokens(seeds_and_positions: Sequence[tuple[int | None, int]], vocab: int = 50) -> list[int]:
    """Sample one batch where row i has seed s_i and a history of length p_i, over flat logits."""
    history = [[1] * pos for _, pos in seeds_and_positions]
    params = [Params(seed=seed) for seed, _ in seeds_and_positions]
    return run(torch.zeros(len(params), vocab), params, history, [1] * len(params)).token_ids.tolist()


def test_seeded_row_is_independent_of_batch_composition() -> None:
    torch.manual_seed(12)
    alone = flat_row_tokens([(1234, 17)])[0]
    for others_first in (3, 5):
        rows: list[tuple[int | None, int]] = [(None, 17), (99, 17), (1234, 18), (7, 3), (None, 40), (5, 17)]
        rows.insert(others_first, (1234, 17))
        rows += [(None, 2)] if len(rows) < 8 else []
        assert flat_row_tokens(rows)[others_first] == alone
    # A resumed sequence (any prompt/output split, any earlier step count) draws the same token.
    history = [[1] * 17]
    again = run(torch.zeros(1, 50), [Params(seed=1234)], history, [9]).token_ids.item()
    assert again == alone


def test_seeded_positions_and_seeds_give_different_draws() -> None:
    by_position = flat_row_tokens([(42, pos) for pos in range(1, 201)])
    assert len(set(by_position)) > 30  # independent draws over 50 flat tokens
    other_seed = flat_row_tokens([(43, pos) for pos in range(1, 201)])
    assert by_position != other_seed
    assert generator_seed(42, 5) != generator_seed(42, 6) != generator_seed(43, 5)
    assert generator_seed(-1, 0) < 2**64  # negative seeds are fine


def test_seeded_rows_follow_the_distribution() -> None:
    base = torch.randn(8, generator=torch.Generator().manual_seed(13))
    n = 10000
    params = [Params(seed=seed) for seed in range(n)]  # one draw per seed
    tokens = run(copies(base, n), params).token_ids
    assert chi_square(tokens, base.softmax(-1)) < CHI2_999[7]


def reference_allowed(logits: torch.Tensor, p: Params) -> set[int]:
    """Tokens a naive per-token implementation of top-k, top-p and min-p would keep."""
    probs = (logits / p.temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    if p.top_k > 0:
        order = order[: p.top_k]
    kept, mass = [], 0.0
    total = float(probs[order].sum())
    for tok in order:
        if kept and mass >= p.top_p * total:
            break
        kept.append(tok)
        mass += float(probs[tok])
    top = float(probs.max())
    return {t for t in kept if float(probs[t]) >= p.min_p * top}


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    top_k=st.integers(0, 12),
    top_p=st.sampled_from([1.0, 0.9, 0.6, 0.3, 0.05]),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_draws_stay_inside_the_filtered_set(
    seed: int, top_k: int, top_p: float, min_p: float, temperature: float
) -> None:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(12, generator=generator) * 2
    p = Params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    torch.manual_seed(seed)
    n = 400
    tokens = run(copies(base, n), [p] * n).token_ids
    allowed = reference_allowed(base, p)
    drawn = set(tokens.tolist())
    assert drawn <= allowed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_argmax_rows_is_torchs_argmax(dtype: torch.dtype) -> None:
    """The CPU kernel behind greedy picks: the first of tied maxima, NaN as the largest, all -inf rows,
    rows shorter than a vector, and rows that are a slice of a wider tensor."""
    from worker import kernels

    kernels.fused_ops()  # built here, as on every CPU worker: the kernel, not torch's fallback, is under test
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(70, 49200, generator=g).to(dtype)
    x = wide[:, :49152]
    x[3, 100] = x[3, 4000] = x[3, 49151] = 60.0
    x[5, 7] = x[5, 9000] = float("nan")
    x[6] = float("-inf")
    x[7, -1] = 99.0
    x[8, 17] = float("inf")
    for rows in (x, x[:1], wide[:, :5], wide[:, :33], wide[:, 16:49152]):
        got = argmax_rows(rows)
        assert got.dtype == torch.int64 and torch.equal(got, rows.argmax(dim=-1))
    assert argmax_rows(x)[[3, 5, 6, 7, 8]].tolist() == [100, 7, 0, 49151, 17]


def test_in_place_sampling_picks_the_same_and_only_writes_the_bans() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(4))
    logits[:, 2] = 10.0  # the stop id is everyone's favourite
    params = [Params(temperature=0.0, min_tokens=3, stop_token_ids=(2,), logit_bias={5: 0.5})] * 6
    history = [[7, 1]] * 6
    batch = SamplingBatch.build(params, history, [1] * 6, CPU, 50)
    copy = logits.clone()
    expected = sample(logits, batch).token_ids
    assert torch.equal(logits, copy)  # out of place by default
    got = sample(logits, batch, inplace=True).token_ids
    assert torch.equal(got, expected) and 2 not in got.tolist()
    assert (logits[:, 2] == -math.inf).all() and torch.allclose(logits[:, 5], copy[:, 5] + 0.5)
    others = [i for i in range(50) if i not in (2, 5)]
    assert torch.equal(logits[:, others], copy[:, others])


def test_bfloat16_logits_pick_what_their_float32_widening_picks() -> None:
    """A bfloat16 model's logits: greedy rows with bans are picked from the bfloat16 values (ties included, as
    rounding makes them common), everything else from float32 copies; the caller's tensor is only banned into."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(8, 300, generator=g) * 4).to(torch.bfloat16)
    logits[:, 7] = logits.max()  # the stop id ties with the largest value in every row
    history = [[1, 2, 3]] * 8
    cases = [
        [Params(temperature=0.0, min_tokens=5, stop_token_ids=(7,))] * 8,  # the bfloat16 path
        [Params(temperature=0.0, logit_bias={3: 2.0})] * 8,  # bias: widened first
        [Params(temperature=0.0, logprobs=2)] * 8,
        [Params(temperature=0.0, repetition_penalty=1.3)] * 8,
        [Params(temperature=0.8, seed=11)] * 8,
    ]
    for params in cases:
        def batch(params=params):  # fresh for each call: a seeded row's generator advances as it draws
            return SamplingBatch.build(params, history, [1] * 8, CPU, 300)

        copy = logits.clone()
        want = sample(logits.float(), batch())
        got = sample(logits, batch(), inplace=True)
        assert torch.equal(got.token_ids, want.token_ids), params[0]
        if want.logprobs is not None:
            assert torch.equal(got.logprobs, want.logprobs)
        changed = (logits != copy) & ~(torch.isinf(logits) & (logits < 0))
        assert not changed.any()  # at most the bans were written
