"""The Scheduler stage without Ray: classification by form, one request per layer, waves, budgets."""

from __future__ import annotations

import pytest
import torch

from zipmoe_ray.cache import Form, SplitRule
from zipmoe_ray.cache.layout import expert_sizes
from zipmoe_ray.errors import BudgetError
from zipmoe_ray.runtime.budget import minimum_budget
from zipmoe_ray.stages.protocol import Delivery, LayerResponse
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


def test_step_ages_and_counts_full_hits(store):
    sched, _ = make(store)
    sched.step(hits=[(0, 1, 3)], released=[])
    st = sched.stats()
    assert st["hits"]["full"] == 1 and st["steps"] == 1


# -- several nodes -----------------------------------------------------------------------------------------
def make_cluster(store, nodes=("a", "b"), share=0.5):
    from zipmoe_ray.stages.cluster_scheduler import ClusterScheduler, NodeSetup

    s = open_store(store)
    total = sum(x.full for x in expert_sizes(s).values())
    runners = {n: FakeRunner(1) for n in nodes}
    setups = [
        NodeSetup(n, int(total * share), runners[n], executor=(i == 0), inflight=1)
        for i, n in enumerate(nodes)
    ]
    return ClusterScheduler(str(store), SchedulerConfig(budget=int(total * share)), setups), runners


def call_key(call):
    return call[1] if call[0] in ("read", "derive") else call[2]


def test_cluster_homes_interleave_and_remote_work_runs_on_the_experts_node(store):
    sched, runners = make_cluster(store)
    assert sched.stats()["homes"] == {"a": 24, "b": 24}  # 3 layers x 16 experts, half each
    resp = sched.request(0, [(2, 1), (3, 1)])  # (0+2) % 2 -> a, (0+3) % 2 -> b
    by = {d.expert: d for d in resp.deliveries}
    assert by[2].node is None and by[3].node == "b" and not by[3].keep
    assert {call_key(c) for c in runners["a"].calls} == {(0, 2)}
    assert {call_key(c) for c in runners["b"].calls} == {(0, 3)}
    nodes = sched.stats()["nodes"]
    assert nodes["a"]["misses"] == 1 and nodes["b"]["misses"] == 1


def test_cluster_serves_a_remote_full_expert_without_new_tasks(store):
    sched, runners = make_cluster(store, share=1.0)
    sched.request(0, [(3, 1)])
    sched.step(released=[(0, 3)])
    before = len(runners["b"].calls)
    resp = sched.request(0, [(3, 1)])
    assert resp.deliveries[0].node == "b" and resp.deliveries[0].form == "full"
    assert len(runners["b"].calls) == before  # held in b's object store: handed out again
    assert sched.stats()["nodes"]["b"]["hits"]["full"] == 1


def test_a_failed_node_s_experts_move_to_the_nodes_left(store):
    sched, _runners = make_cluster(store, nodes=("a", "b", "c"), share=0.4)
    assert sched.node_failed("b") == ["a", "c"]
    st = sched.stats()
    assert st["homes"]["b"] == 0 and st["homes"]["a"] + st["homes"]["c"] == 48 and st["failed"] == ["b"]
    resp = sched.request(0, [(e, 1) for e in range(16)])
    assert {d.node for d in resp.deliveries} <= {None, "c"}
    assert sched.node_failed("a") == ["a", "c"]  # the executor's node cannot be failed: it is this program


class _FlakyNodeTransport:
    """Layer 0 asks for experts 0-2: expert 0 goes to node b, which dies; 1 and 2 wait for the next wave."""

    node_timeout = 0.01

    def __init__(self):
        self.asked: list[list[int]] = []
        self.failed: list[str] = []

    def request(self, layer, misses, hits, released):
        self.asked.append([e for e, _ in misses])
        if len(self.asked) == 1:
            return LayerResponse(layer, [Delivery(0, None, "words", False, "full", node="b")], [], misses[1:])
        return LayerResponse(layer, [Delivery(e, None, "words", False, "full", node="c") for e, _ in misses])

    def compute(self, node, layer, expert, kind, x, w, values):
        return (node, expert)

    def wait_any(self, handles, timeout=None):
        return handles

    def get(self, handle):
        node, expert = handle
        if node == "b":
            raise RuntimeError("node b died")
        return torch.full((1,), float(expert))

    def is_node_failure(self, e):
        return "died" in str(e)

    def unresponsive(self, nodes, timeout):
        return set()

    def node_failed(self, node):
        self.failed.append(node)


def test_experts_waiting_for_a_wave_survive_a_node_failure(store):
    from zipmoe_ray.stages.client import ExpertClient

    transport = _FlakyNodeTransport()
    client = ExpertClient(transport, open_store(store))
    rows = lambda e: (torch.zeros(1, 4), torch.ones(1))  # noqa: E731
    got = [e for e, _ in client.fetch(0, [0, 1, 2], [3, 2, 1], rows)]
    assert sorted(got) == [0, 1, 2]  # every routed expert computed exactly once
    assert transport.failed == ["b"] and transport.asked[1] == [0, 1, 2]  # the redo carries the deferred
