"""Per-request traffic, pure: pick a deployment version (by weight, or sticky by a key), then a replica
(fewest queued tokens, unless another replica's prefix cache saves more than its longer queue costs);
and the window of per-version request outcomes that a canary is judged on."""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

from daemon.deployments import VersionStats

VARIANT_HEADER = "x-nimbus-variant-key"
VERSION_HEADER = "x-nimbus-version"


def sticky_key(header_value: str | None, user: str | None) -> str | None:
    """The A/B key of a request: the `x-nimbus-variant-key` header, else the OpenAI `user` field."""
    return header_value or user or None


def choose_version(weights: Mapping[str, float], key: str | None, rng: random.Random) -> str:
    """A version, with probability proportional to its weight.

    Without a key: a weighted random draw from `rng`. With a key: weighted rendezvous hashing, a pure
    function of (key, weights), so a key stays on one version while the weights hold; and when one
    version's weight grows, keys only move *to* it (when it shrinks, only *from* it), so an A/B arm keeps
    its users through a canary's weight steps. Pass only versions that can serve (have a replica up).
    """
    live = [(version, float(w)) for version, w in weights.items() if w > 0]
    if not live:
        raise LookupError("no version takes traffic")
    if key is None:
        point = rng.random() * sum(w for _, w in live)
        for version, w in live:
            point -= w
            if point < 0:
                return version
        return live[-1][0]  # float rounding left a sliver past the end
    return max(live, key=lambda vw: (_rendezvous_score(key, vw[0], vw[1]), vw[0]))[0]


def _rendezvous_score(key: str, version: str, weight: float) -> float:
    # -ln(u) is an Exp(1) draw fixed by (key, version); the version whose draw / weight is smallest wins,
    # which happens with probability weight / sum(weights) (a race of exponential clocks).
    digest = hashlib.blake2b(f"{len(key)}:{key}\x00{version}".encode(), digest_size=8).digest()
    u = ((int.from_bytes(digest, "big") >> 11) + 0.5) / 2.0**53  # 53 bits: exactly in (0, 1) as a float
    return weight / -math.log(u)


class ReplicaCandidate(Protocol):
    """What routing needs from a replica (the engine's Replica provides it from its scheduler)."""

    @property
    def queued_tokens(self) -> int: ...

    def prefix_match_tokens(self, token_ids: Sequence[int]) -> int: ...


C = TypeVar("C", bound=ReplicaCandidate)


def choose_replica(candidates: Sequence[C], prompt_tokens: Sequence[int], slack_tokens: int = 2048) -> C:
    """The least-loaded candidate, unless the one with the longest cached prefix is close enough.

    A prefix hit of `hit` tokens saves computing them; the hit replica's extra queue makes the request
    wait behind `extra` more tokens. Both cost about a token of compute each, so the hit replica wins while
    extra <= hit. Queues within `slack_tokens` (one step's token budget, say) are treated as equal: they
    drain in the same step anyway, so the cache hit is free. Rule: take the hit replica iff
    hit > 0 and extra <= max(hit, slack_tokens). Ties go to the fewer queued tokens, then to list order.
    """
    if not candidates:
        raise LookupError("no replica can serve")
    least = min(candidates, key=lambda c: c.queued_tokens)
    hits = [c.prefix_match_tokens(prompt_tokens) for c in candidates]  # once each: it hashes blocks
    best_i = max(range(len(candidates)), key=lambda i: (hits[i], -candidates[i].queued_tokens, -i))
    best, hit = candidates[best_i], hits[best_i]
    if hit > 0 and best.queued_tokens - least.queued_tokens <= max(hit, slack_tokens):
        return best
    return least


class StatsWindow:
    """Recent finished requests per version, so the engine can fill VersionStats for any window start.
    Samples older than `horizon_s` (set it >= the longest canary dwell) or beyond `max_samples` are dropped."""

    def __init__(self, horizon_s: float = 3600.0, max_samples: int = 200_000) -> None:
        self.horizon_s = horizon_s
        self._requests: dict[str, deque[tuple[float, bool, float | None]]] = {}
        self._itl: dict[str, deque[tuple[float, float]]] = {}
        self._max = max_samples

    def record(self, version: str, at: float, ok: bool, ttft_s: float | None, itl_s: Sequence[float] = ()) -> None:
        """One request finished at `at` (wall clock, like rollouts' `now`)."""
        requests = self._requests.setdefault(version, deque(maxlen=self._max))
        itls = self._itl.setdefault(version, deque(maxlen=self._max))
        requests.append((at, ok, ttft_s))
        itls.extend((at, x) for x in itl_s)
        for q in (requests, itls):
            while q and q[0][0] < at - self.horizon_s:
                q.popleft()

    @property
    def size(self) -> int:
        """Samples held (requests and inter-token gaps)."""
        return sum(map(len, self._requests.values())) + sum(map(len, self._itl.values()))

    def stats(self, version: str, since: float) -> VersionStats:
        window = [r for r in self._requests.get(version, ()) if r[0] >= since]
        ttfts = [r[2] for r in window if r[2] is not None]
        itls = [x for at, x in self._itl.get(version, ()) if at >= since]
        return VersionStats(len(window), sum(1 for r in window if not r[1]), _p99(ttfts), _p99(itls))


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    values.sort()
    return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]  # nearest rank
