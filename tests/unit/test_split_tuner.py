"""Online re-planning of the split (schedule/split_tuner.py, ExpertCache.resize, Scheduler.set_split):
candidates timed in turn on decode steps, the faster kept, like compared with like, budgets kept."""

from __future__ import annotations

import pytest

from zipmoe_ray.cache import ExpertCache, ExpertSizes, Form, Popularity, SplitRule
from zipmoe_ray.cache.layout import expert_sizes
from zipmoe_ray.schedule.split_tuner import MARGIN, SplitTuner, wide_batch
from zipmoe_ray.stages.scheduler import Scheduler, SchedulerConfig
from zipmoe_ray.store import open_store

PLAN = SplitRule(0.2, 0.3, 0.5)
FULL = SplitRule(1.0, 0.0, 0.0)


def drive(tuner, cost, steps, rows=1):
    """Feed ``steps`` decode steps whose time is ``cost[name in use]``; returns the switches (step, name)."""
    out = []
    for i in range(steps):
        if tuner.observe(cost[tuner.name], rows) is not None:
            out.append((i, tuner.name))
    return out


def test_the_faster_candidate_is_kept_after_each_is_timed_past_its_settling_steps():
    t = SplitTuner([("plan", PLAN), ("full-only", FULL)], every=100, settle=3, window=6)
    switches = drive(t, {"plan": 0.5, "full-only": 0.3}, 30)
    # the plan is timed first (3 settling + 6 timed steps), then full-only, which stays: no second switch
    assert switches == [(8, "full-only")]
    assert t.name == "full-only" and t.rounds == 1 and t.switches == 1
    assert t.report()["step_s"] == {"plan": 0.5, "full-only": 0.3}
    assert not t.measuring


def test_the_split_in_use_stays_unless_another_is_faster_by_the_margin():
    t = SplitTuner([("plan", PLAN), ("full-only", FULL)], every=100, settle=0, window=4)
    switches = drive(t, {"plan": 0.5, "full-only": 0.5 * (1 - MARGIN / 2)}, 20)
    assert switches == [(3, "full-only"), (7, "plan")]  # timed, then back: not faster enough
    assert t.name == "plan" and t.switches == 0


def test_rounds_repeat_every_n_decode_steps_and_follow_a_change_of_workload():
    t = SplitTuner([("plan", PLAN), ("full-only", FULL)], every=20, settle=2, window=4)
    drive(t, {"plan": 0.5, "full-only": 0.3}, 12)
    assert t.name == "full-only" and not t.measuring
    # the workload changes: now the plan is faster; the next round (after 20 steps) finds it
    drive(t, {"plan": 0.2, "full-only": 0.3}, 20 + 4 + 6)
    assert t.name == "plan" and t.rounds == 2 and t.switches == 2


def test_each_batch_size_has_its_own_rounds_and_its_own_choice():
    """A server's generations alternate batch sizes and are shorter than a round: each size's round is
    paused and resumed, never compared with another size's steps, and each size keeps its own split."""
    t = SplitTuner([("plan", PLAN), ("full-only", FULL)], every=12, settle=2, window=4)
    cost = {1: {"plan": 0.2, "full-only": 0.3}, 8: {"plan": 2.0, "full-only": 1.0}}
    for _ in range(5):  # generations of 5 decode steps, batch 8 then batch 1
        for rows in (8, 1):
            for _ in range(5):
                t.observe(cost[rows][t.name], rows)
    by = t.report()["by_batch"]
    assert by[1] == {"split": "plan", "measuring": False, "step_s": {"plan": 0.2, "full-only": 0.3}}
    assert by[8] == {"split": "full-only", "measuring": False, "step_s": {"plan": 2.0, "full-only": 1.0}}
    # batch 8, timed at once, began on the plan and left it; batch 1 began on what batch 8 kept then (the
    # plan: its round had not ended) and kept it after its own round, 12 steps later
    assert t.rounds == 2 and t.switches == 1
    # once chosen, a batch size gets its split at once, with no round until `every` steps of that size
    assert t.name == "plan"
    assert t.observe(5.0, rows=8) == FULL and t.name == "full-only"
    assert t.observe(0.2, rows=1) == PLAN and t.name == "plan"
    assert not t.measuring and t.rounds == 2


def test_a_batch_size_seen_later_starts_on_the_split_in_use_and_is_timed_after_every_steps():
    t = SplitTuner([("plan", PLAN), ("full-only", FULL)], every=20, settle=0, window=2)
    drive(t, {"plan": 0.5, "full-only": 0.3}, 4)  # batch 1: full-only kept
    assert t.name == "full-only" and t.rounds == 1
    assert drive(t, {"plan": 0.1, "full-only": 3.0}, 19, rows=8) == []  # not timed yet: stays
    assert t.report()["by_batch"][8] == {"split": "full-only", "measuring": False, "step_s": {}}
    assert drive(t, {"plan": 0.1, "full-only": 3.0}, 5, rows=8) == [(1, "plan")]  # due: timed, kept
    assert t.report()["by_batch"][8]["split"] == "plan"


def test_a_wide_batch_size_after_a_narrow_one_starts_on_the_start_up_plan():
    """Where a step's experts cannot fit a cache of full experts, the batch-1 choice does not carry over: a
    wide size that follows a narrow one starts on the start-up plan; sizes on the same side inherit."""
    t = SplitTuner([("plan", PLAN), ("full-only", FULL)], every=20, settle=0, window=2, wide_from=6)
    drive(t, {"plan": 0.5, "full-only": 0.3}, 4)  # batch 1 (narrow): full-only kept
    assert t.name == "full-only"
    assert t.observe(0.3, rows=4) is None and t.name == "full-only"  # narrow after narrow: inherited
    assert t.observe(1.0, rows=8) == PLAN  # wide after narrow: the start-up plan, before any round of 8
    assert t.report()["by_batch"][8] == {"split": "plan", "measuring": False, "step_s": {}}
    assert t.observe(1.0, rows=16) is None and t.name == "plan"  # wide after wide: inherited
    assert t.observe(0.3, rows=1) == FULL  # batch 1 keeps its own choice
    assert t.report()["wide_from"] == 6
    # without wide_from (or with no wide size), a new size inherits whatever it follows
    u = SplitTuner([("plan", PLAN), ("full-only", FULL)], every=20, settle=0, window=2)
    drive(u, {"plan": 0.5, "full-only": 0.3}, 4)
    assert u.observe(1.0, rows=8) is None and u.name == "full-only"


def test_wide_batch_is_where_a_steps_experts_outgrow_a_cache_of_full_experts():
    # 60 experts, top-4: 4 distinct at batch 1, 14.5 expected at 4, 17.5 at 5
    assert wide_batch(60, 4, 14) == 4
    assert wide_batch(60, 4, 15) == 5
    assert wide_batch(60, 4, 3.5) == 1  # not even one token's experts fit
    assert wide_batch(60, 4, 60) is None  # every expert fits: no batch is wide
    assert wide_batch(8, 2, 7.99) is not None and wide_batch(8, 2, 8) is None


def test_a_paused_round_resumes_with_the_samples_it_had():
    t = SplitTuner([("plan", PLAN), ("full-only", FULL)], every=8, settle=1, window=4)
    for _ in range(3):  # batch 1: 1 settling step, 2 of the plan's 4 samples
        t.observe(0.5, rows=1)
    for _ in range(7 + 4 + 1 + 2):  # batch 4: 7 steps, its round on the plan (4 samples), full-only (1 + 2)
        t.observe(9.0, rows=4)
    assert t.name == "full-only" and t.report()["by_batch"][4]["measuring"]
    assert t.observe(0.5, rows=1) == PLAN  # ran on full-only: not a sample; the plan is put back
    t.observe(0.5, rows=1)  # the cache refills in the plan's forms
    assert t._sizes[1].samples == [0.5, 0.5]  # the two it had
    for _ in range(2):  # the 2 samples it still needs
        t.observe(0.5, rows=1)
    assert t.name == "full-only"  # the plan's median is in: full-only's turn
    assert t.report()["by_batch"][1]["measuring"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        SplitTuner([("plan", PLAN)])
    with pytest.raises(ValueError):
        SplitTuner([("plan", PLAN), ("full-only", FULL)], every=0)


SIZE = ExpertSizes(full=100, extent=68, exp=18, sm=50)


def test_resize_sheds_the_coldest_unpinned_experts_into_cheaper_forms_within_the_budget():
    sizes = {(0, e): SIZE for e in range(10)}
    c = ExpertCache(sizes, 1000, {Form.FULL: 200, Form.COMPRESSED: 300, Form.SM: 300}, Popularity(0.9))
    for e in range(6):
        c.touch((0, e), e + 1)
        c.admit((0, e), Form.FULL if e >= 4 else Form.COMPRESSED)
    c.pin((0, 0))  # the coldest, but in flight
    demotions = c.resize({Form.FULL: 100, Form.COMPRESSED: 100, Form.SM: 600})
    # FULL keeps its hottest; the colder one finds COMPRESSED over its new capacity and falls to SM
    assert c.form((0, 5)) == Form.FULL and c.form((0, 4)) == Form.SM
    # COMPRESSED sheds its coldest unpinned ((0,1), (0,2), (0,3)) into SM; the pinned (0,0) stays
    assert c.members(Form.COMPRESSED) == {(0, 0)}
    assert c.members(Form.SM) == {(0, 1), (0, 2), (0, 3), (0, 4)}
    assert all(c.used[f] <= c.capacity[f] for f in (Form.FULL, Form.COMPRESSED, Form.SM))
    assert {(d.key, d.src, d.dst) for d in demotions} == {
        ((0, 4), Form.FULL, Form.SM),
        *(((0, e), Form.COMPRESSED, Form.SM) for e in (1, 2, 3)),
    }
    assert c.held <= c.budget
    c.resize({Form.FULL: 0, Form.COMPRESSED: 0, Form.SM: 0})
    assert c.members(Form.FULL) == set() and c.members(Form.SM) == set()
    assert c.members(Form.COMPRESSED) == {(0, 0)}  # pinned: stays until released


def test_experts_a_resize_left_over_capacity_because_pinned_fall_back_once_released():
    sizes = {(0, e): SIZE for e in range(10)}
    c = ExpertCache(sizes, 1000, {Form.FULL: 300, Form.COMPRESSED: 0, Form.SM: 0}, Popularity(0.9))
    for e in range(3):
        c.touch((0, e), e + 1)
        c.admit((0, e), Form.FULL)
    assert c.shed() == []  # nothing over: nothing moves
    c.pin((0, 0))
    c.pin((0, 1))
    c.resize({Form.FULL: 100, Form.COMPRESSED: 0, Form.SM: 0})
    assert c.members(Form.FULL) == {(0, 0), (0, 1)} and c.used[Form.FULL] == 200  # over, pinned
    assert c.shed() == []  # still pinned: nothing can move yet
    c.unpin((0, 0))
    c.unpin((0, 1))
    demotions = c.shed()
    assert [(d.key, d.src, d.dst) for d in demotions] == [((0, 0), Form.FULL, Form.DISK)]
    assert c.members(Form.FULL) == {(0, 1)} and c.used[Form.FULL] <= c.capacity[Form.FULL]


def test_a_re_plan_while_experts_are_in_flight_never_takes_the_next_requests_reserve(tiny_stores):
    """Found by the bit-exactness tests once prefetch staging stopped being a fixed aside: FULL experts
    pinned through a re-plan stayed over the new capacities after release, and a request's first fetch
    found no room once the other forms had filled."""
    from zipmoe_ray.runtime.budget import minimum_budget

    store = tiny_stores["qwen2_moe"]
    s = open_store(store)
    sizes = expert_sizes(s)
    one = minimum_budget(sizes, 1)
    budget = minimum_budget(sizes, s.top_k) + 4 * one
    sched = Scheduler(str(store), SchedulerConfig(budget=budget, split=FULL), Runner())
    in_flight = [(0, e) for e in range(s.top_k)]
    sched.request(0, [(e, 1) for _, e in in_flight])
    sched.set_split(SplitRule(full=0.0, compressed=1.0, sm=0.0))  # no FULL form left
    assert sched.cache.members(Form.FULL) == set(in_flight)  # pinned: over the capacity until released
    sched.release(in_flight)
    assert sched.cache.members(Form.FULL) == set()
    for key in sizes:  # every expert once: the COMPRESSED form fills, colder ones go to disk
        if key not in in_flight:
            resp = sched.request(key[0], [(key[1], 1)])
            assert [d.expert for d in resp.deliveries] == [key[1]]
            sched.release([key])
        assert all(sched.cache.used[f] <= sched.cache.capacity[f] for f in sched.cache.capacity)
    assert sched.cache.held > sum(sched.cache.capacity.values()) - one  # full: no slack to hide a leak
    assert sched.stats()["cache"]["peak"] <= budget


class Runner:
    workers = 2

    def read(self, key, part):
        return ("read", key, part)

    def read_split(self, key):
        return ("exp", key), ("sm", key)

    def decode_lane(self, lane, jobs):
        return [("decoded", job[0]) for job in jobs]

    def derive(self, lane, key, words, part):
        return ("derived", key, part)


def test_the_scheduler_re_plans_from_decode_step_times_and_reports_it(tiny_stores):
    store = tiny_stores["qwen2_moe"]
    total = sum(x.full for x in expert_sizes(open_store(store)).values())
    cfg = SchedulerConfig(budget=total // 2, split=PLAN, replan_every=50)
    sched = Scheduler(str(store), cfg, Runner())
    assert sched.stats()["replan"]["in_use"] == "start-up plan"
    for e in range(8):  # some compressed and SM-only experts
        sched.request(0, [(e, 1)])
        sched.release([(0, e)])
    assert sched.cache.members(Form.COMPRESSED) or sched.cache.members(Form.SM)
    assert sched.stats()["plan"]["popularity"] == "lfu"
    for _ in range(9):
        sched.step(timing=(0.5, 1))
    assert sched.split == FULL  # now timing full-only: compressed and SM room is gone
    assert not sched.cache.members(Form.COMPRESSED) and not sched.cache.members(Form.SM)
    assert sched.cache.held <= sched.cache.budget
    for _ in range(9):
        sched.step(timing=(0.2, 1))
    r = sched.stats()["replan"]
    assert r["in_use"] == "full-only" and r["rounds"] == 1
    assert r["step_s"] == {"start-up plan": 0.5, "full-only": 0.2}
    assert sched.stats()["plan"]["rule"] == FULL.describe()
    sched.step()  # a prefill step (no timing) is not a sample
    assert sched.tuner._sizes[1].held == 0
    assert r["by_batch"] == {1: {"split": "full-only", "measuring": False, "step_s": r["step_s"]}}


def test_no_tuner_for_classic_offloading_or_when_off(tiny_stores):
    store = tiny_stores["qwen2_moe"]
    total = sum(x.full for x in expert_sizes(open_store(store)).values())

    def tuner(**kw):
        return Scheduler(str(store), SchedulerConfig(budget=total // 2, **kw), Runner()).tuner

    assert tuner(split=PLAN) is None  # off (replan_every 0)
    # half the expert bytes, less the reserve, in full experts: the batch at which a step outgrows them
    sched = Scheduler(str(store), SchedulerConfig(budget=total // 2, split=PLAN, replan_every=8), Runner())
    sizes = expert_sizes(open_store(store))
    layers = len({k[0] for k in sizes})
    held = (total // 2 - sched.reserve) / (total / len(sizes)) / layers
    assert sched.tuner.wide_from == wide_batch(len(sizes) / layers, sched.top_k, held) is not None
    assert tuner(split=FULL, replan_every=8) is None  # the start-up plan already is classic offloading
    t = tuner(split=PLAN, popularity="lru", replan_every=8)
    assert t.candidates == [("start-up plan", PLAN), ("full-only", FULL)]


def test_a_full_hit_on_an_expert_the_re_plan_just_demoted_counts_as_a_full_hit(tiny_stores):
    store = tiny_stores["qwen2_moe"]
    total = sum(x.full for x in expert_sizes(open_store(store)).values())
    sched = Scheduler(str(store), SchedulerConfig(budget=total // 2, split=FULL), Runner())
    sched.request(0, [(3, 1)])
    sched.release([(0, 3)])
    assert sched.cache.form((0, 3)) == Form.FULL
    sched.set_split(SplitRule(full=0.0, compressed=0.0, sm=1.0))  # the executor has not heard yet
    assert sched.cache.form((0, 3)) != Form.FULL
    resp = sched.request(0, [(4, 1)], hits=[(3, 1)])  # it still serves (0, 3) from its FULL copy
    assert (0, 3) in [tuple(k) for k in resp.drop_full]
    sched.step(hits=[(0, 3, 1)])
    assert sched.stats()["hits"]["full"] == 2


def test_a_step_that_ran_on_another_split_is_never_a_sample():
    """Found in review: a batch size's round could come due just as that size came back from a generation
    of another size run on another split; the step that ran on that split, and the refilling steps after
    the switch back, counted as the first samples."""
    t = SplitTuner([("plan", PLAN), ("full-only", FULL)], every=2, settle=2, window=2)
    drive(t, {"plan": 0.5, "full-only": 0.3}, 2 + 2 + 2 + 2)  # batch 1: the plan, then full-only, kept
    assert t.name == "full-only" and t.rounds == 1
    t.observe(0.3, rows=1)  # held 1 of 2
    t.observe(1.0, rows=8)  # batch 8 begins on full-only, what batch 1 keeps
    t._sizes[8].chosen = 0  # as if batch 8 had kept the plan
    t.observe(0.3, rows=1)  # batch 1's round is due: full-only, settled, gives its first sample
    assert t.measuring and t._sizes[1].samples == [0.3]
    assert t.observe(1.0, rows=8) == PLAN  # batch 8's steps run on the plan
    # batch 1 is back: full-only is put back, but neither the step that ran on the plan nor the 2 refilling
    # steps are samples
    assert t.observe(9.0, rows=1) == FULL
    t.observe(9.0, rows=1)
    t.observe(9.0, rows=1)
    assert t._sizes[1].samples == [0.3]
    assert t.observe(0.3, rows=1) == PLAN  # the second sample: full-only's median in, the plan's turn
    assert t._sizes[1].scores == {1: 0.3}
