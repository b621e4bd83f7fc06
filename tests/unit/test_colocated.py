"""Lanes in the executor (backends/colocated.py) without Ray: a real Scheduler whose TokenRunner records
tasks, a TaskTable running them on local threads; results equal the store's, and live only while the
scheduler holds their tokens."""

from __future__ import annotations

import gc
import pickle

import numpy as np
import pytest

from zipmoe_ray.backends.colocated import TaskTable, Token, TokenRunner
from zipmoe_ray.backends.local import LocalRunner
from zipmoe_ray.cache import SplitRule
from zipmoe_ray.cache.layout import expert_sizes
from zipmoe_ray.stages.decompressor import Decompressor
from zipmoe_ray.stages.loader import IOLoader
from zipmoe_ray.stages.scheduler import Scheduler, SchedulerConfig
from zipmoe_ray.store import open_store


@pytest.fixture
def pair(tiny_stores):
    store = str(tiny_stores["qwen2_moe"])
    total = sum(x.full for x in expert_sizes(open_store(store)).values())
    runner = TokenRunner(2)
    # every cached expert compressed: hits decode from cached tokens, admissions keep read tokens
    sched = Scheduler(store, SchedulerConfig(budget=total // 2, split=SplitRule(0.0, 1.0, 0.0)), runner)
    local = LocalRunner(IOLoader(store), [Decompressor(store, i) for i in range(2)])
    yield store, sched, runner, TaskTable(local)
    local.shutdown()


def _answer(sched, runner, table, layer, experts):
    resp = sched.request(layer, [(e, 1) for e in experts])
    resp.tasks = runner.drain()
    return table.apply(pickle.loads(pickle.dumps(resp)))  # as it crosses to the executor


def _words(d):
    """The delivered weights: one result, or pieces that the lanes decoded into one shared buffer."""
    values = [h.result() for h in (d.parts or [d.handle])]
    assert all(v is values[0] for v in values)
    return values[0]


def test_results_equal_the_store_and_go_when_the_scheduler_lets_go(pair):
    store, sched, runner, table = pair
    dec, io = Decompressor(store, 0), IOLoader(store)

    def want(e):
        return dec.decode(0, e, extent=io.read(0, e, "all"))

    experts = [0, 1, 2]
    resp = _answer(sched, runner, table, 0, experts)
    for d in resp.deliveries:
        assert np.array_equal(_words(d), want(d.expert))
    sched.release([(0, e) for e in experts])
    again = _answer(sched, runner, table, 0, experts)  # compressed hits now: decoded from cached tokens
    assert {d.form for d in again.deliveries} == {"compressed"}
    for d in again.deliveries:
        assert np.array_equal(_words(d), want(d.expert))
    sched.release([(0, e) for e in experts])
    del resp, again
    gc.collect()
    blob, gone = runner.drain()
    table.run(blob)
    table.forget(gone)
    # what the executor still holds is exactly what the scheduler still names: the cached extents
    assert set(table.results) == runner.live
    assert len(runner.live) == 2 * len(experts)  # an E and an SM region per compressed expert


def test_a_token_pickles_as_its_number_without_a_finalizer():
    runner = TokenRunner(1)
    t = runner.read((0, 0), "all")
    copy = pickle.loads(pickle.dumps(t))
    assert isinstance(copy, Token) and copy.id == t.id and runner.live == {t.id}
    del copy
    gc.collect()
    assert runner.live == {t.id}  # only the scheduler's own token counts
    del t
    gc.collect()
    blob, gone = runner.drain()
    # its spec named it until the drain: shipped (pickled) and let go of in the same drain, which the
    # executor applies tasks first, forgets second
    assert [s[0] for s in pickle.loads(blob)] == ["read"] and gone == [0] and runner.live == set()
    assert runner.drain() == (pickle.dumps([], protocol=pickle.HIGHEST_PROTOCOL), [])


def test_a_task_naming_a_result_this_process_does_not_hold_is_refused(pair):
    _, _, _, table = pair
    with pytest.raises(RuntimeError, match=r"Token\(5\)"):
        table.run([("derive", Token(99), 0, (0, 0), Token(5), "raw")])
    assert 99 not in table.results
