"""BlockManager: refcounts, the chained-hash prefix cache, LRU eviction, counters and invariants."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.blocks import ROOT_DIGEST, BlockManager, block_digest

BS = 4


def cached_seq(bm: BlockManager, seq_id: int, tokens: list[int]) -> int:
    """Admit a whole prompt in one chunk, pretend it was computed, and cache its full blocks."""
    hit = bm.allocate_prompt(seq_id, tokens, len(tokens))
    assert hit is not None
    bm.commit_full_blocks(seq_id, tokens, len(tokens))
    bm.check_invariants()
    return hit


def test_allocate_ensure_free_refcounts():
    bm = BlockManager(8, BS)
    assert bm.allocate_prompt(1, list(range(10)), 100) == 0
    assert len(bm.table(1)) == 3 and bm.num_used == 3 and bm.num_free == 5
    assert bm.ensure(1, 12) == []  # still within 3 blocks
    new = bm.ensure(1, 13)
    assert new is not None and len(new) == 1 and bm.table(1)[-1] == new[0]
    assert bm.reachable_tokens(1) == (4 + 4) * BS
    bm.check_invariants()
    bm.free(1)
    bm.free(1)  # a no-op the second time
    assert bm.num_free == 8 and bm.num_used == 0 and bm.usage == 0.0
    bm.check_invariants()


def test_chunked_admission_allocates_only_the_first_chunk():
    bm = BlockManager(8, BS)
    assert bm.allocate_prompt(1, list(range(20)), 6) == 0
    assert len(bm.table(1)) == 2  # 6 tokens -> 2 blocks; later chunks go through ensure
    with pytest.raises(ValueError):
        bm.allocate_prompt(1, [1], 1)


def test_shortage_changes_nothing():
    bm = BlockManager(4, BS)
    assert bm.allocate_prompt(1, list(range(12)), 12) == 0
    assert bm.ensure(1, 24) is None and len(bm.table(1)) == 3
    assert bm.allocate_prompt(2, list(range(100, 108)), 8) is None
    with pytest.raises(KeyError):
        bm.table(2)
    assert bm.can_allocate(1) and not bm.can_allocate(2)
    bm.check_invariants()


def test_prefix_hit_takes_the_longest_chain_and_shares_blocks():
    bm = BlockManager(16, BS)
    a = list(range(14))  # 3 full blocks + 2 tokens
    cached_seq(bm, 1, a)
    assert bm.num_cached == 3
    b = a[:8] + [99, 98, 97, 96, 95]  # shares 2 blocks, then differs inside the third
    assert bm.prefix_match_tokens(b) == 8
    assert bm.allocate_prompt(2, b, 100) == 8
    assert bm.table(2)[:2] == bm.table(1)[:2] and bm.table(2)[2] != bm.table(1)[2]
    assert bm.num_used == 4 + 2  # the two shared blocks count once
    assert (bm.prefix_queries, bm.prefix_hits) == (14 + 13, 8)
    bm.check_invariants()


def test_hit_never_covers_the_last_prompt_token():
    bm = BlockManager(16, BS)
    cached_seq(bm, 1, list(range(12)))  # 3 full cached blocks
    assert bm.prefix_match_tokens(list(range(12))) == 8  # exactly 3 blocks: the last must be computed
    assert bm.prefix_match_tokens(list(range(13))) == 12
    assert bm.prefix_match_tokens(list(range(4))) == 0
    assert bm.allocate_prompt(2, list(range(12)), 100) == 8
    assert len(bm.table(2)) == 3  # two shared, one fresh block to recompute the last four tokens
    assert bm.table(2)[2] != bm.table(1)[2]


def test_same_tokens_under_different_parents_do_not_match():
    assert block_digest(ROOT_DIGEST, [1, 2]) != block_digest(block_digest(ROOT_DIGEST, [3, 4]), [1, 2])
    assert block_digest(ROOT_DIGEST, [1, 2]) == block_digest(ROOT_DIGEST, (1, 2))
    bm = BlockManager(16, BS)
    cached_seq(bm, 1, [1, 1, 1, 1, 5, 6, 7, 8, 0])
    assert bm.prefix_match_tokens([2, 2, 2, 2, 5, 6, 7, 8, 0]) == 0
    assert bm.prefix_match_tokens([1, 1, 1, 1, 5, 6, 7, 8, 0]) == 8


def test_freed_cached_blocks_stay_findable_and_are_evicted_lru():
    bm = BlockManager(6, BS)
    a, b = [10] * 4 + [11] * 4 + [0], [20] * 4 + [21] * 4 + [0]
    cached_seq(bm, 1, a)
    cached_seq(bm, 2, b)
    a_blocks = bm.table(1)
    bm.free(1)  # least recently freed
    bm.free(2)
    assert bm.num_cached_free == 4 and bm.num_free == 6 and bm.num_cached == 4
    assert bm.prefix_match_tokens(a) == 8 and bm.prefix_match_tokens(b) == 8
    # Two unhashed blocks (the partial last blocks) are reused first, without evicting anything.
    assert bm.allocate_prompt(3, list(range(100, 108)), 8) == 0
    assert bm.num_cached == 4 and not set(bm.table(3)) & set(a_blocks[:2])
    # Next comes the least recently freed cached block: a's tail (a chain's tail goes before its head).
    assert bm.ensure(3, 12) == [a_blocks[1]]
    assert bm.prefix_match_tokens(a) == 4 and bm.prefix_match_tokens(b) == 8
    assert bm.ensure(3, 16) == [a_blocks[0]]
    assert bm.prefix_match_tokens(a) == 0 and bm.num_cached == 2 and bm.num_cached_free == 2
    bm.check_invariants()


def test_a_hit_on_a_free_block_takes_it_out_of_the_free_queue():
    bm = BlockManager(4, BS)
    a = list(range(9))
    cached_seq(bm, 1, a)
    bm.free(1)
    assert bm.num_cached_free == 2
    assert bm.allocate_prompt(9, [50, 51], 2) == 0  # takes the unhashed block; 3 free, 2 of them cached
    # Two free hit blocks plus two new ones make four: more than the three free, so nothing changes.
    assert bm.allocate_prompt(2, a[:8] + list(range(60, 68)), 8) is None
    assert bm.num_cached_free == 2 and bm.num_free == 3
    assert bm.allocate_prompt(2, a, 100) == 8
    assert bm.num_cached_free == 0 and bm.num_used == 4
    bm.check_invariants()


def test_generated_tokens_are_cached_too():
    bm = BlockManager(8, BS)
    prompt = [7, 7, 7]
    assert bm.allocate_prompt(1, prompt, 3) == 0
    tokens = prompt + [1, 2, 3, 4, 5]  # five decoded tokens; KV computed for the first 7 positions
    assert bm.ensure(1, 7) is not None
    bm.commit_full_blocks(1, tokens, 7)
    assert bm.prefix_match_tokens(tokens + [9]) == 4
    bm.ensure(1, 8)
    bm.commit_full_blocks(1, tokens, 8)
    assert bm.prefix_match_tokens(tokens + [9]) == 8


def test_duplicate_content_is_cached_once():
    bm = BlockManager(8, BS)
    tokens = list(range(9))
    for sid in (1, 2):  # admitted side by side: neither finds the other's blocks yet
        assert bm.allocate_prompt(sid, tokens, 9) == 0
    for sid in (1, 2):
        bm.commit_full_blocks(sid, tokens, 9)
    assert bm.num_cached == 2 and not set(bm.table(1)) & set(bm.table(2))
    bm.check_invariants()
    bm.free(2)  # its private copies hold no hash and go to the head of the free queue
    assert bm.num_cached_free == 0
    bm.check_invariants()


def test_prefix_caching_off():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    cached_seq(bm, 1, list(range(9)))
    assert bm.num_cached == 0 and bm.prefix_match_tokens(list(range(9))) == 0


def test_reset_forgets_everything_but_counters():
    bm = BlockManager(8, BS)
    cached_seq(bm, 1, list(range(9)))
    cached_seq(bm, 2, list(range(9)))
    bm.reset()
    assert bm.num_free == 8 and bm.num_cached == 0 and bm.prefix_hits == 8
    bm.check_invariants()


def test_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


@settings(max_examples=100, deadline=None)
@given(st.data(), st.integers(2, 10), st.sampled_from([1, 2, 3, 4]))
def test_random_operations_keep_the_invariants(data, num_blocks, block_size):
    bm = BlockManager(num_blocks, block_size)
    seqs: dict[int, list[int]] = {}  # seq_id -> its tokens so far
    for sid in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["admit", "grow", "free"]))
        if op == "admit" or not seqs:
            tokens = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=12))
            hit = bm.allocate_prompt(sid, tokens, data.draw(st.integers(1, 12)))
            if hit is not None:
                assert hit % block_size == 0 and hit < len(tokens)
                seqs[sid] = tokens
        else:
            victim = data.draw(st.sampled_from(sorted(seqs)))
            if op == "free":
                bm.free(victim)
                del seqs[victim]
            else:  # compute what the table covers, cache it, then try to grow by a few tokens
                tokens = seqs[victim]
                done = min(len(tokens), len(bm.table(victim)) * block_size)
                bm.commit_full_blocks(victim, tokens, done)
                tokens.extend(data.draw(st.lists(st.integers(0, 2), max_size=5)))
                bm.ensure(victim, len(tokens))
        bm.check_invariants()
        assert bm.num_cached_free <= bm.num_free and bm.num_cached <= num_blocks
