"""KV block accounting for one replica: reference-counted blocks, a prefix cache of full blocks keyed by
chained hashes, and a free queue that is also the LRU eviction order. The worker owns the tensors."""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Sequence
from functools import lru_cache

ROOT_DIGEST = b""  # the parent of a sequence's first block


@lru_cache(maxsize=8)
def _int32s(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}i")


def block_digest(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The chained hash of one full block: blake2b-128 over the parent's digest and the block's token ids.

    128 bits are enough to trust a match without comparing tokens: by the birthday bound, a replica that
    hashed 10^12 blocks in its lifetime would see a collision with probability about 10^-15, far below the
    rate of undetected hardware memory errors. blake2b over little-endian int32 ids is stable across processes
    and machines (unlike hash() of a tuple, which is salted per process), so digests could later be shared
    between daemons.
    """
    return hashlib.blake2b(parent + _int32s(len(token_ids)).pack(*token_ids), digest_size=16).digest()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Which KV blocks of one worker each sequence uses, and which full blocks hold a reusable prefix.

    Invariants (`check_invariants` asserts them; the tests call it after every operation):
    - a block's refcount equals the number of block tables containing it; it is in the free queue iff 0;
    - a block is in two tables only if it is a cached full block shared through the prefix cache;
    - num_free + num_used == num_blocks;
    - the cache maps each digest to one block carrying that digest, and cached blocks are exactly the
      free-cached ones plus the used-cached ones.
    The free queue holds never-full (unhashed) blocks at its head and cached blocks behind them, least
    recently freed first; allocation pops the head, so a freed cached block stays findable until reused.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Cumulative counters in tokens (never reset: they feed Prometheus counters). Every admission
        # counts, re-admissions after a preemption included: they measure the cache, not the requests.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.reset()

    def reset(self) -> None:
        """Forget every table and the whole cache (the worker's KV is gone)."""
        self._ref = [0] * self.num_blocks
        self._digest: list[bytes | None] = [None] * self.num_blocks
        self._cached: dict[bytes, int] = {}
        # The free queue: a doubly linked list through two fixed arrays (index num_blocks is the head/tail
        # sentinel), so queueing and unqueueing blocks allocates nothing and memory stays flat however
        # many blocks churn (an OrderedDict here grew by megabytes over thousands of requests).
        n = self.num_blocks
        self._ids = list(range(n))  # one int object per block id, shared by tables and cache (not one per use)
        self._next = array("i", range(1, n + 2))
        self._prev = array("i", range(-1, n))
        self._next[n], self._prev[0] = 0, n  # sentinel -> 0 -> 1 ... -> n-1 -> sentinel
        self._num_free = n
        self._tables: dict[int, list[int]] = {}
        self._chains: dict[int, list[bytes]] = {}  # digests of each sequence's leading full blocks
        self._num_cached_free = 0

    # ------------------------------------------------------------------------------------- queries
    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_cached_free(self) -> int:
        return self._num_cached_free

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self._num_free

    @property
    def tables(self) -> dict[int, list[int]]:
        """Every sequence's block table, by seq_id: read-only (the scheduler's per-step "does it need a
        block" test reads lengths here rather than calling ensure for every sequence of every step)."""
        return self._tables

    def table(self, seq_id: int) -> list[int]:
        """A copy of the sequence's block table (KeyError if it has none)."""
        return list(self._tables[seq_id])

    def reachable_tokens(self, seq_id: int) -> int:
        """The most tokens the sequence's table could cover if it took every free block."""
        return (len(self._tables[seq_id]) + self._num_free) * self.block_size

    def prefix_match_tokens(self, token_ids: Sequence[int]) -> int:
        """Read-only: how many leading tokens a new sequence with these tokens would find cached."""
        return len(self._match(token_ids)[0]) * self.block_size

    def _match(self, token_ids: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """The longest chain of cached full blocks, never covering the last token (it must be computed
        to sample from it)."""
        blocks: list[int] = []
        chain: list[bytes] = []
        if not self.enable_prefix_caching:
            return blocks, chain
        parent, size = ROOT_DIGEST, self.block_size
        for start in range(0, (len(token_ids) - 1) // size * size, size):
            digest = block_digest(parent, token_ids[start : start + size])
            block = self._cached.get(digest)
            if block is None:
                break
            blocks.append(block)
            chain.append(digest)
            parent = digest
        return blocks, chain

    # ------------------------------------------------------------------------------------- changes
    def allocate_prompt(self, seq_id: int, token_ids: Sequence[int], token_budget: int) -> int | None:
        """Admit a sequence, all or nothing: take refs on its longest cached prefix and allocate blocks for
        its first chunk (min(token_budget, uncached tokens) tokens). Returns the number of cached tokens,
        or None, changing nothing, when the free blocks cannot hold the first chunk. Later chunks and
        decodes grow the table through `ensure`."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        if not token_ids or token_budget < 1:
            raise ValueError("a prompt needs at least one token and a budget of at least one")
        hits, chain = self._match(token_ids)
        num_cached = len(hits) * self.block_size
        chunk = min(token_budget, len(token_ids) - num_cached)
        num_new = _cdiv(num_cached + chunk, self.block_size) - len(hits)
        # Hit blocks sitting in the free queue leave it too, so they count against the free blocks.
        if sum(self._ref[b] == 0 for b in hits) + num_new > self._num_free:
            return None
        for block in hits:
            self._take(block)
        self._tables[seq_id] = hits + self._pop_free(num_new)
        self._chains[seq_id] = chain
        self.prefix_queries += len(token_ids)
        self.prefix_hits += num_cached
        return num_cached

    def ensure(self, seq_id: int, num_tokens: int) -> list[int] | None:
        """Grow the table to cover num_tokens tokens; returns the appended block ids ([] if it already
        does), or None, changing nothing, if there are not enough free blocks."""
        table = self._tables[seq_id]
        num_new = -(-num_tokens // self.block_size) - len(table)  # called for every sequence of every step
        if num_new <= 0:
            return []
        if num_new > self._num_free:
            return None
        new = self._pop_free(num_new)
        table.extend(new)
        return new

    def commit_full_blocks(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Cache the blocks filled by the first num_computed tokens (prompt or generated) so later
        sequences can reuse them. Call once their KV is computed, or once the step computing it is built:
        a sequence sharing them then runs in that step or a later one, and the worker writes a step's K/V
        before any of its attention reads."""
        if not self.enable_prefix_caching:
            return
        table, chain = self._tables[seq_id], self._chains[seq_id]
        parent, size = (chain[-1] if chain else ROOT_DIGEST), self.block_size
        for i in range(len(chain), num_computed // size):
            parent = block_digest(parent, token_ids[i * size : (i + 1) * size])
            chain.append(parent)
            # Two sequences may have computed the same content side by side; the first to commit
            # is cached and the other's copy stays private (freed to the head, reused first).
            if parent not in self._cached:
                self._cached[parent] = table[i]
                self._digest[table[i]] = parent

    def free(self, seq_id: int) -> None:
        """Drop the sequence's refs (a no-op if it has no table); blocks reaching 0 join the free queue."""
        table = self._tables.pop(seq_id, None)
        self._chains.pop(seq_id, None)
        for block in reversed(table or ()):
            # Reversed, so a chain's tail is evicted before its head: a child is useless without it.
            self._ref[block] -= 1
            if self._ref[block] > 0:
                continue
            if self._digest[block] is None:
                self._enqueue(block, first=True)  # holds nothing reusable: reuse it first
            else:
                self._enqueue(block, first=False)
                self._num_cached_free += 1

    def _take(self, block: int) -> None:
        if self._ref[block] == 0:
            self._dequeue(block)
            self._num_cached_free -= self._digest[block] is not None
        self._ref[block] += 1

    def _pop_free(self, count: int) -> list[int]:
        blocks = []
        nxt, prev, end = self._next, self._prev, self.num_blocks
        for _ in range(count):
            block = self._ids[nxt[end]]  # the head: least recently freed
            after = nxt[block]  # _dequeue, inline: a decode step pops a block for every 16th sequence or so
            nxt[end], prev[after] = after, end
            self._num_free -= 1
            digest = self._digest[block]
            if digest is not None:  # evicted: its content is about to be overwritten
                del self._cached[digest]
                self._digest[block] = None
                self._num_cached_free -= 1
            self._ref[block] = 1
            blocks.append(block)
        return blocks

    def _enqueue(self, block: int, first: bool) -> None:
        nxt, prev, end = self._next, self._prev, self.num_blocks
        before = end if first else prev[end]  # after the sentinel (the head) or after the tail
        after = nxt[before]
        nxt[before], prev[block], nxt[block], prev[after] = block, before, after, block
        self._num_free += 1

    def _dequeue(self, block: int) -> None:
        nxt, prev = self._next, self._prev
        before, after = prev[block], nxt[block]
        nxt[before], prev[after] = after, before
        self._num_free -= 1

    def _free_queue(self) -> list[int]:
        """The free blocks, head (next to allocate) first (O(num_free): for checks and tests)."""
        out, block = [], self._next[self.num_blocks]
        while block != self.num_blocks:
            out.append(block)
            block = self._next[block]
        return out

    def check_invariants(self) -> None:
        """Assert the invariants in the class docstring (for tests and debugging; O(total blocks))."""
        counts = [0] * self.num_blocks
        for table in self._tables.values():
            for block in table:
                counts[block] += 1
        assert counts == self._ref, "refcounts differ from table membership"
        queue = self._free_queue()
        assert len(queue) == len(set(queue)) == self._num_free, "free queue corrupt"
        free = set(queue)
        assert all((self._ref[b] == 0) == (b in free) for b in range(self.num_blocks))
        assert all(c <= 1 or self._digest[b] is not None for b, c in enumerate(counts)), "shared unhashed"
        assert all(self._digest[b] == d for d, b in self._cached.items()), "cache map out of sync"
        assert sum(d is not None for d in self._digest) == len(self._cached)
        assert self._num_cached_free == sum(self._digest[b] is not None for b in free)
        assert self.num_free + self.num_used == self.num_blocks
