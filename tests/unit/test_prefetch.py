"""Cross-layer prefetch in the scheduler: fetched ahead, counted only when used, released like any fetch,
never past the budget, never taking the staging a request it did not foresee needs, and costing the cache
nothing once predictions stop."""

from __future__ import annotations

import pytest

from zipmoe_ray.cache.layout import expert_sizes
from zipmoe_ray.runtime.budget import minimum_budget
from zipmoe_ray.stages.scheduler import ASIDE_QUIET_STEPS, Scheduler, SchedulerConfig
from zipmoe_ray.store import open_store

from .test_scheduler import FakeRunner


@pytest.fixture
def store(tiny_stores):
    return tiny_stores["qwen2_moe"]


def _sched(store, budget=None):
    s = open_store(store)
    sizes = expert_sizes(s)
    budget = budget or sum(x.full for x in sizes.values())
    runner = FakeRunner()
    return Scheduler(str(store), SchedulerConfig(budget=budget), runner), runner, s


def test_a_used_prefetch_is_counted_once_and_its_request_gets_the_same_handles(store):
    sched, runner, _ = _sched(store)
    ahead = sched.prefetch(1, [(2, 1), (3, 1)])
    assert sorted(d.expert for d in ahead.deliveries) == [2, 3]
    calls = len(runner.calls)
    resp = sched.request(1, [(2, 1)])  # routed to 2 only: its fetch is already on its way
    assert len(runner.calls) == calls  # no second read or decode
    assert [d.handle for d in resp.deliveries] == [d.handle for d in ahead.deliveries if d.expert == 2]
    sched.step(released=[(1, 2), (1, 3)])
    st = sched.stats()
    assert st["prefetch_issued"] == 2 and st["prefetch_used"] == 1
    assert st["misses"] == 1  # the used one, from disk; the wrong guess is no access at all
    assert st["prefetch_wasted_bytes"] > 0
    assert sched.cache.staging == 0  # everything released


def test_used_reported_with_the_step_counts_as_the_access(store):
    sched, _, _ = _sched(store)
    sched.prefetch(0, [(4, 2)])
    sched.step(used=[(0, 4, 2)], released=[(0, 4)])
    st = sched.stats()
    assert st["prefetch_used"] == 1 and st["misses"] == 1 and st["prefetch_wasted_bytes"] == 0
    plain, _, _ = _sched(store)  # the same use without prefetch: the same popularity
    plain.request(0, [(4, 2)])
    plain.step(released=[(0, 4)])
    assert sched.cache.popularity.score((0, 4)) == plain.cache.popularity.score((0, 4)) > 0
    assert sched.cache.form((0, 4)) == plain.cache.form((0, 4))


def test_prefetch_never_takes_a_requests_staging(store):
    s = open_store(store)
    sizes = expert_sizes(s)
    need = minimum_budget(sizes, s.top_k)
    sched, _, _ = _sched(store, budget=need)  # only the reserve: nothing to spare
    assert sched.prefetch(0, [(e, 1) for e in range(s.num_experts)]).deliveries == []
    resp = sched.request(0, [(0, 1)])
    assert [d.expert for d in resp.deliveries] == [0]
    assert sched.cache.total <= need


def test_while_prefetches_arrive_the_cache_gives_up_a_second_layers_staging_and_takes_it_back_after(store):
    s = open_store(store)
    sizes = expert_sizes(s)
    one = minimum_budget(sizes, 1)
    reserve = minimum_budget(sizes, s.top_k)
    budget = reserve + 2 * minimum_budget(sizes, s.top_k) + 10 * one
    sched, _, _ = _sched(store, budget=budget)
    whole = sum(sched.cache.capacity.values())
    assert sched.aside == 0 and 0 <= budget - reserve - whole <= 4  # no prediction yet: the cache has it all
    #                                                                 (up to the split's rounding)
    in_use = sched.request(0, [(e, 1) for e in range(s.top_k)])
    ahead = sched.prefetch(1, [(e, 1) for e in range(s.num_experts)])  # a wild guess: everything
    assert sched.aside == reserve and 0 <= whole - reserve - sum(sched.cache.capacity.values()) <= 4
    assert 0 < len(ahead.deliveries) < s.num_experts
    ahead_staging = sum(f.staging for f in sched._flights.values() if f.prefetched)
    assert 0 < ahead_staging <= sched.aside and sched.cache.total <= budget
    done = [(0, d.expert) for d in in_use.deliveries]
    wrong = [(1, d.expert) for d in ahead.deliveries]
    resp = sched.request(1, [(s.num_experts - 1, 1)], released=done + wrong)
    assert [d.expert for d in resp.deliveries] == [s.num_experts - 1]
    sched.release([(1, s.num_experts - 1)])
    for _ in range(ASIDE_QUIET_STEPS):
        sched.step()
    assert sched.aside == reserve  # still predicting, as far as it knows
    sched.step()  # prefetches stopped: the bytes go back to the cache
    assert sched.aside == 0 and sum(sched.cache.capacity.values()) == whole
    assert sched.stats()["cache"]["peak"] <= budget and sched.cache.staging == 0


def test_a_small_budget_keeps_its_bytes_for_the_cache(store):
    s = open_store(store)
    need = minimum_budget(expert_sizes(s), s.top_k)
    sched, _, _ = _sched(store, budget=need + need // 2)
    whole = sum(sched.cache.capacity.values())
    assert sched.prefetch(0, [(e, 1) for e in range(s.num_experts)]).deliveries == []
    assert sched.aside == 0 and sum(sched.cache.capacity.values()) == whole
