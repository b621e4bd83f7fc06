"""benchmarks/replay_eviction.py's rules on hand-made traces: Belady's rule is never beaten, LRU thrashes on a
cycle one longer than the cache where a count keeps a fixed set, a cache that holds everything misses each
expert once, and misses are summed per range of generations."""

from __future__ import annotations

import random

import pytest

from ..bench_helpers import benchmark_modules


@pytest.fixture(scope="module")
def replay():
    with benchmark_modules("replay_eviction") as (module,):
        yield module


def _random_steps(seed: int, n: int = 60, layers: int = 3, experts: int = 12, k: int = 3):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        per_layer = []
        for layer in range(layers):
            picks = rng.sample(range(experts), k)
            per_layer.append((layer, [(e, rng.randint(1, 4)) for e in picks]))
        out.append((i // 10, per_layer))  # ten steps per generation
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("slots", [2, 7, 20])
def test_no_rule_reads_less_than_belady(replay, seed, slots):
    steps = _random_steps(seed)
    floor = sum(replay.belady(steps, slots))
    for name, rule in replay.rules([0.5, 0.8, 1.0]).items():
        assert sum(rule(steps, slots)) >= floor, name


def test_lru_thrashes_on_a_cycle_one_longer_than_the_cache_where_a_count_does_not(replay):
    slots, n = 4, 50
    steps = [(0, [(0, [(i % (slots + 1), 1)])]) for i in range(n)]  # one expert a step, cycling over 5
    assert sum(replay.lru(steps, slots)) == n  # every access evicts the next one needed
    kept = sum(replay.count(steps, slots, 1.0))
    assert kept <= slots + 1 + n // (slots + 1)  # first touches, then at most one miss a cycle
    assert sum(replay.tinylfu(steps, slots)) < n


def test_a_cache_holding_everything_misses_each_expert_once(replay):
    steps = _random_steps(3, experts=6)
    distinct = len({(layer, e) for _, layers in steps for layer, picks in layers for e, _ in picks})
    for name, rule in replay.rules([0.8]).items():
        assert sum(rule(steps, 64)) == (0 if name == "belady" else distinct), name  # Belady starts filled


def test_misses_are_summed_per_range_of_generations(replay):
    steps = [(r, []) for r in (0, 0, 1, 2, 2, 2)]
    assert replay.per_range(steps, [1, 2, 3, 4, 5, 6], [1, 3]) == [3, 18]
    assert replay.per_range(steps, [1, 2, 3, 4, 5, 6], None) == [21]
