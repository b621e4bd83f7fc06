"""The Scheduler stage without Ray (stages/scheduler.py): classification by form, one request per layer, waves, budgets."""

from __future__ import annotations

import pytest

from zipmoe_ray.cache import Form, SplitRule
from zipmoe_ray.cache.layout import expert_sizes
from zipmoe_ray.errors import BudgetError
from zipmoe_ray.runtime.budget import minimum_budget
from zipmoe_ray.stages.scheduler import Scheduler, SchedulerConfig
from zipmoe_ray.store import open_store


class FakeRunner:
    """Records submitted tasks; handles are tuples naming the task."""

    def __init__(self, workers=2):
        self.workers = workers
        self.calls = []

    def read(self, key, part):
        self.calls.append(("read", key, part))
        return ("read", key, part)

    def read_split(self, key):
        self.calls.append(("read", key, "all"))
        return ("exp", key), ("sm", key)

    def decode(self, lane, key, exp, sm, planes_only=False, part=None):
        self.calls.append(("decode", lane, key, exp, sm))
        return ("decoded", key) if part is None else ("decoded", key, part)

    def decode_lane(self, lane, jobs):
        return [self.decode(lane, *job) for job in jobs]

    def derive(self, lane, key, words, part):
        self.calls.append(("derive", key, part))
        return ("derived", key, part)


@pytest.fixture
def store(tiny_stores):
    return tiny_stores["qwen2_moe"]


def make(store, budget_share=1.0, split=None, workers=2):
    s = open_store(store)
    total = sum(x.full for x in expert_sizes(s).values())
    runner = FakeRunner(workers)
    cfg = SchedulerConfig(budget=int(total * budget_share), split=split or SplitRule())
    return Scheduler(str(store), cfg, runner), runner


def test_budget_below_one_layers_active_experts_is_refused_with_the_minimum(store):
    s = open_store(store)
    need = minimum_budget(expert_sizes(s), s.top_k)
    with pytest.raises(BudgetError, match=f"at least {need:,} B"):
        Scheduler(str(store), SchedulerConfig(budget=need - 1), FakeRunner())
    Scheduler(str(store), SchedulerConfig(budget=need), FakeRunner())


def test_disk_miss_reads_then_decodes_and_is_admitted(store):
    sched, runner = make(store)
    resp = sched.request(0, [(3, 2), (5, 1)])
    assert [d.expert for d in resp.deliveries] == [3, 5]  # more tokens first
    reads = [c for c in runner.calls if c[0] == "read"]
    decodes = [c for c in runner.calls if c[0] == "decode"]
    assert {r[1] for r in reads} == {(0, 3), (0, 5)} and all(r[2] == "all" for r in reads)
    assert {d[2] for d in decodes} == {(0, 3), (0, 5)}
    assert all(d[3] == ("exp", d[2]) and d[4] == ("sm", d[2]) for d in decodes)  # decode consumes the read
    assert all(d.form == "disk" for d in resp.deliveries)
    assert sched.stats()["misses"] == 2


def test_forms_decide_the_tasks(store):
    sched, runner = make(store)
    cache = sched.cache
    cache.touch((1, 0), 1)
    cache.admit((1, 0), Form.COMPRESSED, payload=("exp-handle", "sm-handle-0"))
    cache.touch((1, 1), 1)
    cache.admit((1, 1), Form.SM, payload="sm-handle")
    runner.calls.clear()
    resp = sched.request(1, [(0, 1), (1, 1)])
    forms = {d.expert: d.form for d in resp.deliveries}
    assert forms == {0: "compressed", 1: "sm"}
    reads = [c for c in runner.calls if c[0] == "read"]
    assert reads == [("read", (1, 1), "exp")]  # compressed: no read; sm: only the exponent region
    dec = {c[2]: c for c in runner.calls if c[0] == "decode"}
    assert dec[(1, 0)][3:] == ("exp-handle", "sm-handle-0")  # compressed: both regions from memory
    assert dec[(1, 1)][3:] == (("read", (1, 1), "exp"), "sm-handle")  # sm: E region read, SM from memory


def test_full_copies_are_kept_then_dropped_when_demoted(store):
    s = open_store(store)
    sizes = expert_sizes(s)
    one = max(x.full for x in sizes.values())
    reserve = minimum_budget(sizes, s.top_k)
    # room for exactly two experts in full form, and plenty of SM-only room
    budget = reserve + 2 * one + 20 * one
    split = SplitRule(full=2 * one / (budget - reserve) + 1e-9, compressed=0.0, sm=0.9)
    runner = FakeRunner()
    sched = Scheduler(str(store), SchedulerConfig(budget=budget, split=split), runner)
    first = sched.request(0, [(0, 1), (1, 1)])
    assert [d.keep for d in first.deliveries] == [True, True]
    resp = sched.request(0, [(5, 9)], released=[(0, 0), (0, 1)])  # a hotter expert arrives
    assert resp.deliveries[0].keep
    assert len(resp.drop_full) == 1 and resp.drop_full[0] in {(0, 0), (0, 1)}
    victim = resp.drop_full[0]
    assert sched.cache.form(victim) == Form.SM  # fell back one form, not to disk
    assert ("derive", victim, "raw") in runner.calls  # its SM planes are re-split from its weights


def test_waves_when_staging_exceeds_the_budget(store):
    s = open_store(store)
    need = minimum_budget(expert_sizes(s), s.top_k)
    runner = FakeRunner()
    sched = Scheduler(str(store), SchedulerConfig(budget=need), runner)
    resp = sched.request(0, [(e, 1) for e in range(6)])  # a prefill touching 6 experts
    assert len(resp.deliveries) == s.top_k and len(resp.deferred) == 6 - s.top_k
    assert sched.cache.total <= need
    resp2 = sched.request(0, resp.deferred, released=[(0, d.expert) for d in resp.deliveries])
    assert {d.expert for d in resp2.deliveries} | {e for e, _ in resp2.deferred} == {
        e for e, _ in resp.deferred
    }
    assert sched.stats()["cache"]["peak"] <= need
    st = sched.stats()  # a deferred expert is counted when it is fetched, not each time it is asked for
    fetched = len(resp.deliveries) + len(resp2.deliveries)
    assert st["misses"] + sum(st["hits"].values()) == fetched
    assert sched.cache.popularity.score((0, resp.deferred[0][0])) == 1  # and its popularity counted once


def test_deferred_experts_asked_for_while_others_are_in_flight_get_only_the_room_released(store):
    # the client asks for a wave's deferred experts as soon as one is released, while the rest of the wave
    # still holds its staging: the scheduler must not hand out the "first fetch always fits" reserve again
    s = open_store(store)
    need = minimum_budget(expert_sizes(s), s.top_k)
    sched = Scheduler(str(store), SchedulerConfig(budget=need), FakeRunner())
    resp = sched.request(0, [(e, 1) for e in range(6)])
    assert len(resp.deliveries) == s.top_k
    none = sched.request(0, resp.deferred)  # nothing released yet: nothing fits, nothing is over budget
    assert not none.deliveries and none.deferred == resp.deferred
    first = resp.deliveries[0].expert
    more = sched.request(0, resp.deferred, released=[(0, first)])
    assert len(more.deliveries) == 1 and more.deferred == resp.deferred[1:]
    assert sched.stats()["cache"]["peak"] <= need


def test_step_ages_and_counts_full_hits(store):
    sched, _ = make(store)
    sched.step(hits=[(0, 1, 3)], released=[])
    st = sched.stats()
    assert st["hits"]["full"] == 1 and st["steps"] == 1
