"""The compression-aware cache (cache/expert_cache.py, popularity.py, forms.py): admission, demotion by one form, pins, staging under one budget, aging popularity."""

from __future__ import annotations

import random

import pytest

from zipmoe_ray.cache import ExpertCache, ExpertSizes, Form, Popularity, SplitRule
from zipmoe_ray.errors import BudgetError

SIZE = ExpertSizes(full=100, extent=68, exp=18, sm=50)


def make(n=10, budget=1000, capacity=None, kind="lfu"):
    sizes = {(0, e): SIZE for e in range(n)}
    cap = capacity or {Form.FULL: 300, Form.COMPRESSED: 300, Form.SM: 300}
    return ExpertCache(sizes, budget, cap, Popularity(0.9, kind))


def test_form_costs():
    assert [SIZE.held(f) for f in Form] == [100, 68, 50, 0]
    assert [SIZE.read(f) for f in Form] == [0, 0, 18, 68]
    assert [SIZE.staging(f) for f in Form] == [0, 100, 118, 168]
    raw = ExpertSizes(100, 100, 0, 100, raw_codec=True)
    assert raw.staging(Form.DISK) == 100


def test_admission_fills_best_form_first_then_demotes_colder_by_one_form():
    c = make()
    for e in range(3):
        c.touch((0, e), 1)
        assert c.choose((0, e)) == Form.FULL
        assert c.admit((0, e), Form.FULL) == (Form.FULL, [])
    assert c.used[Form.FULL] == 300
    hot = (0, 9)
    for _ in range(5):
        c.touch(hot, 3)
    assert c.choose(hot) == Form.FULL
    final, demotions = c.admit(hot, Form.FULL)
    assert final == Form.FULL
    assert len(demotions) == 1 and demotions[0].src == Form.FULL
    assert demotions[0].dst == Form.COMPRESSED  # a full expert falls back one form, not to disk
    assert c.form(demotions[0].key) == Form.COMPRESSED
    assert c.held <= c.budget


def test_colder_expert_is_not_admitted_over_hotter_ones():
    c = make(capacity={Form.FULL: 200})
    for e in range(2):
        c.touch((0, e), 10)
        c.admit((0, e), Form.FULL)
    c.touch((0, 5), 1)
    assert c.choose((0, 5)) == Form.DISK


def test_pinned_experts_are_never_victims():
    c = make(capacity={Form.FULL: 100})
    c.touch((0, 0), 1)
    c.admit((0, 0), Form.FULL)
    c.pin((0, 0))
    c.touch((0, 1), 50)
    assert c.choose((0, 1)) == Form.DISK
    c.unpin((0, 0))
    assert c.choose((0, 1)) == Form.FULL


def test_staging_shares_the_budget():
    c = make(budget=500, capacity={Form.FULL: 400})
    for e in range(4):
        c.touch((0, e), 1)
        c.admit((0, e), Form.FULL)
    assert c.can_reserve(100) and not c.can_reserve(101)
    c.reserve(100)
    with pytest.raises(BudgetError):
        c.reserve(1)
    c.release(100)
    assert c.peak == 500


def test_popularity_ages():
    p = Popularity(decay=0.5)
    p.touch("a", 4)
    for _ in range(3):
        p.step()
    p.touch("b", 1)
    assert p.value("a") == pytest.approx(0.5) and p.value("b") == pytest.approx(1.0)
    assert p.score("b") > p.score("a")
    for _ in range(400):  # renormalisation keeps comparisons exact
        p.step()
    p.touch("c", 1)
    assert p.score("c") > p.score("b") > p.score("a")


def test_lru_popularity_is_recency():
    p = Popularity(kind="lru")
    p.touch("a", 100)
    p.step()
    p.touch("b", 1)
    assert p.score("b") > p.score("a")


def test_the_default_memory_is_short_but_counts_tokens():
    p = Popularity()  # the default decay: a half-life of about three steps
    p.touch("prefill", 32)  # a prompt's heavy expert, never used again
    p.step()
    for _ in range(12):
        p.touch("reused", 1)  # what consecutive decode tokens reuse (recency exploits it)
        p.step()
    assert p.score("reused") > p.score("prefill")
    p.touch("busy", 6)  # used by most rows of a batch this step
    p.touch("once", 1)  # by one row, later in the same step
    assert p.score("busy") > p.score("once")  # unlike recency, a batch's popular experts stay ahead


def test_random_operations_never_exceed_the_budget():
    rng = random.Random(0)
    sizes = {(layer, e): ExpertSizes(rng.randint(50, 150), 0, 0, 0) for layer in range(3) for e in range(8)}
    sizes = {
        k: ExpertSizes(s.full, int(s.full * 0.68), int(s.full * 0.18), s.full // 2) for k, s in sizes.items()
    }
    c = ExpertCache(sizes, 1500, SplitRule().capacities(1200), Popularity(0.95))
    keys = list(sizes)
    pinned: list = []
    for _ in range(3000):
        k = rng.choice(keys)
        op = rng.random()
        if op < 0.6:
            c.touch(k, rng.randint(1, 4))
            target = c.choose(k)
            if target < c.form(k):
                c.admit(k, target)
        elif op < 0.7 and c.can_reserve(60):
            c.reserve(60)
            c.release(60)
        elif op < 0.8:
            c.pin(k)
            pinned.append(k)
        elif op < 0.9 and pinned:
            c.unpin(pinned.pop())
        else:
            c.step()
        assert c.total <= c.budget
        for f in (Form.FULL, Form.COMPRESSED, Form.SM):
            assert c.used[f] <= c.capacity[f]
            assert c.used[f] == sum(sizes[m].held(f) for m in c.members(f))
    assert c.peak <= c.budget


# -- the incremental victim search against a full scan ------------------------------------------------------
@pytest.mark.parametrize("kind", ["lfu", "lru"])
@pytest.mark.parametrize("seed", range(6))
def test_victims_are_exactly_those_of_a_full_scan_on_random_workloads(kind, seed):
    import random

    from ..reference_cache import ScanningCache

    rng = random.Random(seed)
    sizes = {
        (layer, e): ExpertSizes(1000 + 100 * layer, 700 + 50 * layer, 200, 500 + 50 * layer)
        for layer in range(4)
        for e in range(24)
    }
    keys = sorted(sizes)
    cap = SplitRule(0.3, 0.3, 0.4).capacities(30000)
    decay = 0.1 if seed % 2 else 0.98  # 0.1 rescales every score every 100 steps: the heaps are rebuilt
    caches = [cls(sizes, 34000, cap, Popularity(decay, kind)) for cls in (ExpertCache, ScanningCache)]
    pinned: list = []
    for _ in range(4000):
        op = rng.random()
        key = rng.choice(keys)
        if op < 0.35:
            tokens = rng.randint(1, 4)
            got = [c.touch(key, tokens) for c in caches]
        elif op < 0.4:
            got = [c.step() for c in caches]
        elif op < 0.5:
            if pinned and rng.random() < 0.5:
                k = pinned.pop(rng.randrange(len(pinned)))
                got = [c.unpin(k) for c in caches]
            else:
                pinned.append(key)
                got = [c.pin(key) for c in caches]
        elif op < 0.9:
            want = [c.choose(key) for c in caches]
            assert want[0] == want[1]
            form = want[0]
            move = form != caches[0].form(key)
            got = [c.admit(key, form) if move else None for c in caches]
        else:
            free = not caches[0].entries[key].pins
            got = [c.drop(key) if free else None for c in caches]
        assert got[0] == got[1]
        assert [c.form(k) for k in keys for c in caches[:1]] == [caches[1].form(k) for k in keys]
        assert caches[0].used == caches[1].used
