"""Routing (daemon/routing.py): weighted and sticky version choice, prefix-affine replica choice, stats window."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.deployments import VersionStats
from daemon.routing import StatsWindow, choose_replica, choose_version, sticky_key

# chi-square critical values at p = 0.001: a correct router fails these once in a thousand seeds, and
# the seeds are fixed, so a failure means the distribution is wrong
CHI2_CRIT_001 = {1: 10.83, 2: 13.82, 3: 16.27}


def chi_square(counts: Counter, weights: dict[str, float]) -> float:
    n, total = sum(counts.values()), sum(weights.values())
    return sum((counts[v] - n * w / total) ** 2 / (n * w / total) for v, w in weights.items() if w > 0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weighted_random_matches_the_weights(seed):
    weights = {"a": 5.0, "b": 25.0, "c": 70.0}
    rng = random.Random(seed)
    counts = Counter(choose_version(weights, None, rng) for _ in range(20000))
    assert chi_square(counts, weights) < CHI2_CRIT_001[2]


def test_sticky_keys_spread_by_the_weights_too():
    weights = {"stable": 95.0, "canary": 5.0}
    counts = Counter(choose_version(weights, f"user-{i}", UNUSED) for i in range(10000))
    assert chi_square(counts, weights) < CHI2_CRIT_001[1]
    weights = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    counts = Counter(choose_version(weights, f"k{i}", UNUSED) for i in range(10000))
    assert chi_square(counts, weights) < CHI2_CRIT_001[3]


def test_zero_weight_is_never_chosen_and_nothing_routable_raises():
    rng = random.Random(0)
    assert {choose_version({"a": 0.0, "b": 1.0}, None, rng) for _ in range(200)} == {"b"}
    assert {choose_version({"a": 0.0, "b": 1.0}, f"k{i}", rng) for i in range(200)} == {"b"}
    with pytest.raises(LookupError):
        choose_version({"a": 0.0}, None, rng)
    with pytest.raises(LookupError):
        choose_version({}, "k", rng)


UNUSED = random.Random(0)  # a keyed choice draws nothing from the rng
weights_st = st.dictionaries(st.sampled_from("abcdef"), st.floats(0.01, 100), min_size=1, max_size=6)


@settings(max_examples=100, deadline=None)
@given(weights_st, st.text(max_size=20), st.integers(0, 2**32))
def test_a_key_stays_on_its_version_while_weights_hold(weights, key, seed):
    first = choose_version(weights, key, random.Random(seed))
    assert choose_version(weights, key, random.Random(seed + 1)) == first
    # the order versions are listed in does not matter either
    assert choose_version(dict(reversed(list(weights.items()))), key, random.Random(0)) == first


@settings(max_examples=60, deadline=None)
@given(weights_st, st.data())
def test_changing_one_weight_moves_keys_only_to_or_from_that_version(weights, data):
    version = data.draw(st.sampled_from(sorted(weights)))
    new = dict(weights, **{version: data.draw(st.floats(0, 200))})
    if not any(w > 0 for w in new.values()):
        return
    grew = new[version] > weights[version]
    for i in range(150):
        before, after = choose_version(weights, f"u{i}", UNUSED), choose_version(new, f"u{i}", UNUSED)
        if before != after:
            assert after == version if grew else before == version


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.5, 99.5), min_size=2, max_size=5))
def test_canary_steps_only_ever_move_keys_onto_the_canary(percents):
    keys = [f"user-{i}" for i in range(200)]
    on_canary: set[str] = set()
    for p in sorted(percents):
        now = {k for k in keys if choose_version({"stable": 100 - p, "canary": p}, k, UNUSED) == "canary"}
        assert on_canary <= now  # nobody who saw the canary goes back while its share grows
        on_canary = now


def test_a_weight_step_moves_about_the_share_that_must_move():
    keys = [f"user-{i}" for i in range(10000)]
    before = {k: choose_version({"stable": 95.0, "canary": 5.0}, k, UNUSED) for k in keys}
    after = {k: choose_version({"stable": 75.0, "canary": 25.0}, k, UNUSED) for k in keys}
    moved = sum(before[k] != after[k] for k in keys) / len(keys)
    assert abs(moved - 0.20) < 0.02  # the minimum possible is exactly the 20% that changed hands


def test_sticky_key_prefers_the_header():
    assert sticky_key("h", "u") == "h"
    assert sticky_key(None, "u") == "u"
    assert sticky_key("", None) is None


@dataclass
class FakeReplica:
    name: str
    queued_tokens: int
    cached: int = 0
    lookups: list[int] = field(default_factory=list)

    def prefix_match_tokens(self, token_ids) -> int:
        self.lookups.append(len(token_ids))
        return min(self.cached, len(token_ids))


PROMPT = list(range(4000))


def test_no_prefix_hit_goes_to_the_least_loaded():
    a, b = FakeReplica("a", 500), FakeReplica("b", 100)
    assert choose_replica([a, b], PROMPT, slack_tokens=64) is b


def test_a_prefix_hit_wins_while_its_extra_queue_is_smaller_than_the_hit():
    hit, idle = FakeReplica("hit", 1500, cached=2000), FakeReplica("idle", 0)
    assert choose_replica([idle, hit], PROMPT, slack_tokens=64) is hit
    hit.queued_tokens = 2001  # now the queue costs more than the prefix saves
    assert choose_replica([idle, hit], PROMPT, slack_tokens=64) is idle


def test_a_short_hit_wins_within_the_slack():
    hit, idle = FakeReplica("hit", 300, cached=16), FakeReplica("idle", 0)
    assert choose_replica([idle, hit], PROMPT, slack_tokens=512) is hit
    assert choose_replica([idle, hit], PROMPT, slack_tokens=128) is idle


def test_ties_prefer_the_less_loaded_then_list_order_and_lookups_happen_once():
    a, b, c = FakeReplica("a", 50, 64), FakeReplica("b", 10, 64), FakeReplica("c", 10, 64)
    assert choose_replica([a, b, c], PROMPT, slack_tokens=0) is b
    assert [len(r.lookups) for r in (a, b, c)] == [1, 1, 1]
    assert choose_replica([FakeReplica("x", 0), FakeReplica("y", 0)], PROMPT).name == "x"
    with pytest.raises(LookupError):
        choose_replica([], PROMPT)


def test_stats_window_counts_since_a_time():
    window = StatsWindow(horizon_s=100)
    for i in range(200):
        window.record("v1", at=1000.0 + i * 0.1, ok=i % 50 != 0, ttft_s=i / 1000, itl_s=[0.01, 0.02 + i / 10000])
    window.record("v2", at=1010.0, ok=True, ttft_s=None)
    stats = window.stats("v1", since=1000.0)
    assert stats.requests == 200 and stats.errors == 4
    assert stats.p99_ttft_s == pytest.approx(0.197)  # nearest rank: the 198th of 200
    assert stats.p99_itl_s == pytest.approx(0.02 + 195 / 10000)
    assert window.stats("v1", since=1010.0).requests == 100
    assert window.stats("v2", since=0) == VersionStats(1, 0, None, None)
    assert window.stats("v3", since=0) == VersionStats()
    window.record("v1", at=1200.0, ok=True, ttft_s=0.5)  # everything older than the horizon goes
    assert window.stats("v1", since=0).requests == 1
