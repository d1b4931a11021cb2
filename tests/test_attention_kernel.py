"""The paged CPU attention kernel (worker/csrc) against TorchAttention on random paged layouts, and backend choice."""

from __future__ import annotations

import random

import pytest
import torch

from worker import kernels
from worker.attention import AttentionMetadata, PagedCpuAttention, TorchAttention, select_attention


@pytest.fixture(scope="module", params=[(False, False, False), (True, False, False), (False, True, False),
                                        (False, False, True)],
                ids=["kernel-prefill", "sdpa-prefill", "dp-decode", "amx-prefill"])
def paged(request):
    # every comparison runs four times: the kernel attending every row; the kernel attending the decodes while
    # SDPA takes the prefill chunks (it runs on any CPU); bfloat16 decodes on vdpbf16ps (the default on AVX512-BF16
    # without AMX; elsewhere the float path runs either way); and bfloat16 prefill on AMX tiles (the default where
    # the CPU has them, see test_amx_prefill_runs_where_the_cpu_has_amx; elsewhere the other prefill paths run)
    sdpa_prefill, dp_decode, amx_prefill = request.param
    return PagedCpuAttention(sdpa_prefill=sdpa_prefill, dp_decode=dp_decode, amx_prefill=amx_prefill)


def random_step(query_lens, starts, *, kv_heads, group, head_dim, block_size=16, dtype=torch.float32, seed=0):
    """A step over sequences whose earlier K/V already sit in shuffled, non-contiguous blocks of the pool.

    Returns (q, k, v, kv_cache, meta)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    need = [-(-(s + q) // block_size) for q, s in zip(query_lens, starts)]
    num_blocks = sum(need) + 7
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables, at = [], 0
    for n in need:
        tables.append(ids[at : at + n])
        at += n
    shape = (2, num_blocks, block_size, kv_heads, head_dim)
    kv_cache = torch.randn(shape, generator=g).to(dtype)  # earlier positions: random, as if computed before
    t = sum(query_lens)
    q = torch.randn(t, kv_heads * group, head_dim, generator=g).to(dtype)
    k = torch.randn(t, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(t, kv_heads, head_dim, generator=g).to(dtype)
    meta = AttentionMetadata.build(list(query_lens), list(starts), tables, block_size, torch.device("cpu"))
    return q, k, v, kv_cache, meta


def compare(paged, query_lens, starts, atol=1e-5, **shape):
    check(paged, *random_step(query_lens, starts, **shape), atol)


def check(paged, q, k, v, kv_cache, meta, atol):
    """The paged kernel's output and cache writes against TorchAttention's for one step."""
    ref_cache = kv_cache.clone()
    expected = TorchAttention().forward(q, k, v, ref_cache, meta)
    got = paged.forward(q, k, v, kv_cache, meta)
    assert torch.equal(kv_cache, ref_cache), "the new tokens' K/V were not written where TorchAttention writes them"
    err = (got.float() - expected.float()).abs().max().item()
    assert err < atol, f"max |difference| {err}"


SHAPES = [dict(kv_heads=3, group=3, head_dim=64), dict(kv_heads=2, group=1, head_dim=64),
          dict(kv_heads=2, group=4, head_dim=128), dict(kv_heads=1, group=4, head_dim=16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"kvh{s['kv_heads']}-g{s['group']}-d{s['head_dim']}")
def test_decode_matches_torch(paged, shape):
    lens = [1, 5, 16, 17, 31, 100, 257, 333]
    compare(paged, [1] * len(lens), [n - 1 for n in lens], **shape)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"kvh{s['kv_heads']}-g{s['group']}-d{s['head_dim']}")
def test_prefill_matches_torch(paged, shape):
    # whole prompts from 0, chunks resuming a chunked prefill, and chunks after a prefix-cache hit
    compare(paged, [7, 40, 16, 3, 65, 100], [0, 0, 32, 5, 17, 160], **shape)


@pytest.mark.parametrize("block_size", [1, 4, 16, 32])
def test_mixed_step_matches_torch(paged, block_size):
    compare(paged, [1, 33, 1, 1, 12, 1, 70], [9, 0, 0, 63, 40, 200, 11], block_size=block_size,
            kv_heads=3, group=3, head_dim=64)


def test_single_sequence(paged):
    compare(paged, [1], [299], kv_heads=3, group=3, head_dim=64)
    compare(paged, [300], [0], kv_heads=3, group=3, head_dim=64)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: f"kvh{s['kv_heads']}-g{s['group']}-d{s['head_dim']}")
def test_bfloat16_matches_torch(paged, shape):
    # both round the output to bfloat16 (one ulp ~ 0.4% near 1); SDPA also rounds its softmax to bfloat16
    compare(paged, [1, 1, 20, 1, 50], [30, 200, 0, 7, 90], atol=3e-2, dtype=torch.bfloat16, **shape)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"kvh{s['kv_heads']}-g{s['group']}-d{s['head_dim']}")
def test_float32_queries_over_a_bfloat16_cache(paged, shape):
    # a two-byte KV cache under a float32 model (kv_cache_dtype): the new rows are rounded to nearest even as
    # torch rounds them (the cache must come out equal), and both read the same bfloat16 values into float32
    # products, so the outputs agree to float32's tolerance
    for query_lens, starts in (([1, 1, 20, 1, 50], [30, 200, 0, 7, 90]), ([1] * 40, list(range(5, 400, 10)))):
        q, k, v, kv_cache, meta = random_step(query_lens, starts, **shape)
        check(paged, q, k, v, kv_cache.to(torch.bfloat16), meta, atol=1e-5)


def test_float32_queries_over_a_bfloat16_cache_in_decode_groups(paged):
    groups = [(5, [(1, 80), (1, 81), (1, 95), (1, 100), (1, 130), (1, 200)])]
    q, k, v, kv_cache, meta = shared_step(groups, [(1, 30), (7, 60)], kv_heads=3, group=3, head_dim=64)
    formed = torch.ops.nimbus.decode_groups(meta.block_tables, meta.query_start, meta.context_lens, 16)
    assert [(int(t[0]), t[1:].tolist()) for t in formed] == [(80, [0, 1, 2, 3, 4, 5])]
    check(paged, q, k, v, kv_cache.to(torch.bfloat16), meta, atol=1e-5)


def test_a_cache_of_another_dtype_is_refused():
    q, k, v, kv_cache, meta = random_step([1, 4], [10, 0], kv_heads=2, group=2, head_dim=64, dtype=torch.bfloat16)
    paged = PagedCpuAttention()
    with pytest.raises(RuntimeError, match="bfloat16 under float32"):
        paged.forward(q, k, v, kv_cache.float(), meta)  # a float32 cache under bfloat16 queries
    with pytest.raises(RuntimeError, match="has dtype"):
        paged.forward(q.float(), k, v, kv_cache, meta)  # q float32, k and v bfloat16


@pytest.mark.parametrize("dtype, atol, cases", [(torch.float32, 1e-5, 20), (torch.bfloat16, 3e-2, 12)],
                         ids=["float32", "bfloat16"])
def test_random_layouts(paged, dtype, atol, cases):
    # bfloat16 exercises the AVX512-BF16 prefill where the CPU has it (head sizes that are multiples of 32)
    rng = random.Random(5)
    for seed in range(cases):
        n = rng.randint(1, 12)
        lens = [rng.choice([1, 1, 1, rng.randint(2, 80)]) for _ in range(n)]
        starts = [rng.randint(0, 200) for _ in range(n)]
        compare(paged, lens, starts, atol=atol, dtype=dtype, block_size=rng.choice([1, 4, 8, 16]), seed=seed,
                kv_heads=rng.choice([1, 2, 3]), group=rng.choice([1, 2, 3, 4, 5]), head_dim=rng.choice([32, 64, 128]))


def test_non_contiguous_inputs(paged):
    # the model passes v as a view into the fused qkv projection: rows are strided
    q, k, v, kv_cache, meta = random_step([1, 9], [20, 4], kv_heads=3, group=3, head_dim=64)
    wide = torch.cat([v, torch.zeros_like(v)], dim=-1)[..., :64]
    assert not wide.is_contiguous()
    ref_cache = kv_cache.clone()
    expected = TorchAttention().forward(q, k, v, ref_cache, meta)
    assert torch.allclose(paged.forward(q, k, wide, kv_cache, meta), expected, atol=1e-5)
    assert torch.equal(kv_cache, ref_cache)


def test_decode_only_leaves_prefill_rows_and_writes_every_slot():
    q, k, v, kv_cache, meta = random_step([1, 9, 1, 4], [20, 0, 7, 30], kv_heads=3, group=3, head_dim=64)
    ref_cache = kv_cache.clone()
    expected = TorchAttention().forward(q, k, v, ref_cache, meta)
    out = torch.full_like(q, 7.0)
    torch.ops.nimbus.paged_attention(out, q, k, v, kv_cache, meta.slot_mapping, meta.block_tables, meta.query_start,
                                     meta.context_lens, 0.125, True)
    assert torch.equal(kv_cache, ref_cache), "decode_only must still write the prefill tokens' K/V"
    decode_rows = meta.decode_token_idx
    assert torch.allclose(out[decode_rows], expected[decode_rows], atol=1e-5)
    prefill_rows = torch.cat([torch.arange(g.token_slice.start, g.token_slice.stop) for g in meta.prefills])
    assert bool((out[prefill_rows] == 7.0).all()), "decode_only wrote rows of a prefill chunk"


def test_amx_prefill_is_chosen_for_bfloat16_on_amx(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("NIMBUS_ATTENTION", raising=False)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: "fma avx2 avx512f avx512_bf16 amx_tile amx_bf16")
    chosen = select_attention(cpu, torch.bfloat16, 64)
    # the kernel's AMX prefill where this build and Linux allow it, else SDPA's (also on the tile unit)
    assert chosen.amx_prefill == amx_available() and chosen.sdpa_prefill != chosen.amx_prefill
    assert not select_attention(cpu, torch.bfloat16, 128).amx_prefill  # heads of 32 and 64 only
    assert select_attention(cpu, torch.bfloat16, 128).sdpa_prefill
    assert not select_attention(cpu, torch.float32, 64).sdpa_prefill  # the kernel's float32 prefill is faster
    assert not select_attention(cpu, torch.float32, 64).amx_prefill
    assert not select_attention(cpu, torch.bfloat16, 64).dp_decode  # measured slower on an AMX Xeon
    monkeypatch.setattr(kernels, "cpu_flags", lambda: "fma avx2 avx512f avx512_bf16")
    assert not select_attention(cpu, torch.bfloat16, 64).sdpa_prefill
    assert not select_attention(cpu, torch.bfloat16, 64).amx_prefill
    assert select_attention(cpu, torch.bfloat16, 64).dp_decode
    assert not select_attention(cpu, torch.float32, 64).dp_decode
    monkeypatch.setattr(kernels, "cpu_flags", lambda: "fma avx2")
    assert not select_attention(cpu, torch.bfloat16, 64).dp_decode


def amx_available() -> bool:
    kernels.paged_attention()
    return bool(torch.ops.nimbus.amx_prefill_available(64))


def test_amx_prefill_runs_where_the_cpu_has_amx():
    """The kernel is built for this CPU (-march=native): where it has AMX-BF16, the AMX prefill must be there (so
    the amx-prefill runs above test it), for the heads it takes; elsewhere it reports itself absent."""
    has_amx = "amx_bf16" in kernels.cpu_flags().split()
    assert amx_available() == has_amx
    if has_amx:
        assert torch.ops.nimbus.amx_prefill_available(32)
        assert not torch.ops.nimbus.amx_prefill_available(128)


@pytest.mark.parametrize("shape", [dict(kv_heads=3, group=3, head_dim=64), dict(kv_heads=1, group=20, head_dim=32)],
                         ids=lambda s: f"kvh{s['kv_heads']}-g{s['group']}-d{s['head_dim']}")
def test_amx_prefill_long_context_and_partial_tiles(shape):
    """Chunks of every length around the tile sizes (16 tokens a row block, 64 keys a score pass, 128 tokens an
    item), after cached context that is not a multiple of 16, in blocks of 16 and of 24 positions; with more query
    heads per kv head than a tile has rows too."""
    attn = PagedCpuAttention(amx_prefill=True)
    for block_size in (16, 24):
        for case, (lens, starts) in enumerate([([1, 15, 16, 17], [0, 0, 0, 0]), ([63, 64, 65], [0, 3, 100]),
                                               ([129, 200], [31, 0]), ([5, 300, 1], [250, 40, 70])]):
            check(attn, *random_step(lens, starts, block_size=block_size, dtype=torch.bfloat16, seed=case, **shape),
                  atol=3e-2)


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("NIMBUS_ATTENTION", raising=False)
    assert isinstance(select_attention(cpu, torch.float32, 64), PagedCpuAttention)
    assert isinstance(select_attention(cpu, torch.float16, 64), TorchAttention)  # no float16 path in the kernel
    assert isinstance(select_attention(cpu, torch.float32, 72), TorchAttention)  # not a multiple of 16
    assert isinstance(select_attention(torch.device("cuda"), torch.bfloat16, 64), TorchAttention)
    monkeypatch.setenv("NIMBUS_ATTENTION", "torch")
    assert isinstance(select_attention(cpu, torch.float32, 64), TorchAttention)
    assert isinstance(select_attention(cpu, torch.float32, 64, "paged"), PagedCpuAttention)
    monkeypatch.setenv("NIMBUS_ATTENTION", "flash")
    with pytest.raises(ValueError, match="flash"):
        select_attention(cpu, torch.float32, 64)
    with pytest.raises(ValueError, match="CPU"):
        select_attention(torch.device("cuda"), torch.bfloat16, 64, "paged")


def test_many_decodes_take_whole_sequences(paged):
    # enough decodes that one work item covers every kv head of its sequence (see make_items)
    lens = [1, 2, 15, 16, 17, 40, 64, 65, 130, 257, 300, 511, 700] * 2
    compare(paged, [1] * len(lens), [n - 1 for n in lens], kv_heads=3, group=3, head_dim=64)
    compare(paged, [1] * len(lens), [n - 1 for n in lens], atol=3e-2, dtype=torch.bfloat16, kv_heads=2, group=4,
            head_dim=128)


def test_prefill_spans_several_key_stages(paged):
    # keys are staged 256 at a time with an online softmax across stages: chunks far into a long context
    compare(paged, [70, 520, 3], [600, 0, 900], kv_heads=3, group=3, head_dim=64)
    compare(paged, [70, 300], [600, 0], atol=3e-2, dtype=torch.bfloat16, kv_heads=3, group=3, head_dim=64)


def shared_step(groups, others, *, kv_heads, group, head_dim, block_size=16, dtype=torch.float32, seed=0):
    """Like random_step, but the sequences of each group share their first blocks, as the prefix cache shares
    them: `groups` holds (shared blocks, [(query_len, start), ...]), `others` [(query_len, start), ...] with
    blocks of their own. Sequences go in the batch groups first, then others. Returns (q, k, v, kv_cache, meta)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    seqs = [(q, st, i) for i, (_, members) in enumerate(groups) for q, st in members]
    seqs += [(q, st, None) for q, st in others]
    own = [-(-(st + q) // block_size) - (groups[i][0] if i is not None else 0) for q, st, i in seqs]
    num_blocks = sum(n for n, _ in groups) + sum(own) + 5
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    shared, at = [], 0
    for n, _ in groups:
        shared.append(ids[at : at + n])
        at += n
    tables = []
    for (_, st, i), n in zip(seqs, own):
        if i is not None:
            assert st >= groups[i][0] * block_size, "a member's new tokens go in blocks of its own"
        tables.append((shared[i] if i is not None else []) + ids[at : at + n])
        at += n
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    t = sum(q for q, _, _ in seqs)
    q = torch.randn(t, kv_heads * group, head_dim, generator=g).to(dtype)
    k = torch.randn(t, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(t, kv_heads, head_dim, generator=g).to(dtype)
    meta = AttentionMetadata.build([q for q, _, _ in seqs], [st for _, st, _ in seqs], tables, block_size,
                                   torch.device("cpu"))
    return q, k, v, kv_cache, meta


def compare_shared(paged, groups, others, want_groups, atol=1e-5, **shape):
    """The step against TorchAttention, and the decode groups the kernel forms for it: want_groups holds
    (shared positions, batch indices of the members) for each group, in the kernel's order."""
    q, k, v, kv_cache, meta = shared_step(groups, others, **shape)
    formed = torch.ops.nimbus.decode_groups(meta.block_tables, meta.query_start, meta.context_lens,
                                            kv_cache.shape[2])
    assert [(int(t[0]), t[1:].tolist()) for t in formed] == want_groups
    check(paged, q, k, v, kv_cache, meta, atol)


def tile_floor(n: int) -> int:
    """Shared positions are rounded down to the kernel's vector width (8 floats on AVX2, 16 on AVX-512)."""
    w = 16 if "avx512f" in kernels.cpu_flags().split() else 8
    return n // w * w


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"kvh{s['kv_heads']}-g{s['group']}-d{s['head_dim']}")
def test_decodes_sharing_a_prefix_match_torch(paged, shape):
    # two groups (five shared blocks, four), decodes of their own beside them; the second group's shortest
    # member shares only up to its own last token, which it writes in a block of its own
    groups = [(5, [(1, 80), (1, 81), (1, 95), (1, 100), (1, 130), (1, 200)]), (4, [(1, 64), (1, 70), (1, 90), (1, 111)])]
    compare_shared(paged, groups, [(1, 30), (1, 300)], [(80, [0, 1, 2, 3, 4, 5]), (64, [6, 7, 8, 9])], **shape)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_groups_beside_prefill_chunks(paged, block_size):
    # a prefill chunk on the shared blocks is not a member; the shared length ends on a whole vector
    n = -(-76 // block_size)
    groups = [(n, [(1, n * block_size + i) for i in (0, 3, 9, 30, 31)] + [(12, n * block_size)])]
    compare_shared(paged, groups, [(40, 0), (1, 17), (9, 100)], [(tile_floor(n * block_size), [0, 1, 2, 3, 4])],
                   block_size=block_size, kv_heads=3, group=3, head_dim=64)


def test_a_large_group_goes_in_chunks_and_across_key_stages(paged):
    # 20 members split over several work items per kv head; 608 shared positions span three key stages
    groups = [(38, [(1, 608 + 7 * i) for i in range(20)])]
    compare_shared(paged, groups, [], [(608, list(range(20)))],
                   kv_heads=3, group=3, head_dim=64)


@pytest.mark.parametrize("shape", [dict(kv_heads=2, group=4, head_dim=128), dict(kv_heads=3, group=3, head_dim=64),
                                   dict(kv_heads=1, group=5, head_dim=32)],
                         ids=lambda s: f"kvh{s['kv_heads']}-g{s['group']}-d{s['head_dim']}")
def test_decode_groups_in_bfloat16(paged, shape):
    # heads of 32 and 64 take the AMX path for the shared part with amx-prefill where the CPU has it; 21 members
    # make several row blocks of 16 (member x head), and 112 shared positions two 64-key score passes
    groups = [(6, [(1, 96), (1, 97), (1, 150), (1, 200)]), (7, [(1, 112 + 3 * i) for i in range(21)])]
    compare_shared(paged, groups, [(1, 50), (20, 10)], [(96, [0, 1, 2, 3]), (112, list(range(4, 25)))], atol=3e-2,
                   dtype=torch.bfloat16, **shape)


def test_small_sharing_keeps_the_decode_path(paged):
    # three members, or fewer than 64 shared positions: no group
    compare_shared(paged, [(5, [(1, 80), (1, 90), (1, 99)]), (3, [(1, 48), (1, 60), (1, 70), (1, 80)])], [], [],
                   kv_heads=3, group=3, head_dim=64)


def test_rejects_slots_and_blocks_outside_the_pool(paged):
    q, k, v, kv_cache, meta = random_step([1, 4], [20, 0], kv_heads=3, group=3, head_dim=64)
    before = kv_cache.clone()
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    bad = meta.slot_mapping.clone()
    bad[2] = num_slots
    with pytest.raises(RuntimeError, match="slot_mapping"):
        paged._op(torch.empty_like(q), q, k, v, kv_cache, bad, meta.block_tables, meta.query_start,
                  meta.context_lens, 0.125)
    tables = meta.block_tables.clone()
    tables[0, 0] = kv_cache.shape[1]
    with pytest.raises(RuntimeError, match="not in the pool"):
        paged._op(torch.empty_like(q), q, k, v, kv_cache, meta.slot_mapping, tables, meta.query_start,
                  meta.context_lens, 0.125)
    assert torch.equal(kv_cache, before)  # checked before anything is written
