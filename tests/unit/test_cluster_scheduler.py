"""The ClusterScheduler without Ray (stages/cluster_scheduler.py): homes interleaved over nodes, remote work on the expert's node, re-homing after a failure."""

from __future__ import annotations

import pytest

from zipmoe_ray.cache.layout import expert_sizes
from zipmoe_ray.stages.scheduler import SchedulerConfig
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
