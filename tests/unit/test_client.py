"""The ExpertClient (stages/client.py) over a real in-process scheduler and lanes, and over a transport whose node fails."""

from __future__ import annotations

import pytest
import torch

from zipmoe_ray.stages.prefetch_gate import MIN_PRECISION
from zipmoe_ray.stages.protocol import Delivery, LayerResponse
from zipmoe_ray.store import open_store


@pytest.fixture
def store(tiny_stores):
    return tiny_stores["qwen2_moe"]


class _FlakyNodeTransport:
    """Layer 0 asks for experts 0-2: expert 0 goes to node b, which dies; 1 and 2 wait for the next wave."""

    node_timeout = 0.01

    def __init__(self):
        self.asked: list[list[int]] = []
        self.failed: list[str] = []

    def request(self, layer, misses, hits, released, used):
        self.asked.append([e for e, _ in misses])
        if len(self.asked) == 1:
            return LayerResponse(layer, [Delivery(0, None, "words", False, "full", node="b")], [], misses[1:])
        return LayerResponse(layer, [Delivery(e, None, "words", False, "full", node="c") for e, _ in misses])

    def resolve(self, pending):  # request answers at once here
        return pending

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
    # the deferred experts are asked for once the wave in flight is done with, the failed one again after
    assert transport.failed == ["b"] and transport.asked[1:] == [[1, 2], [0]]


class _RefillAcrossAFailureTransport(_FlakyNodeTransport):
    """Layer 0 asks for experts 0-2: 0 goes to node c, 1 to node b (which dies), 2 waits. The request for 2,
    sent when 0 is released, is answered before the scheduler learns that b died: it places 2 on b too
    (``answer="on b"``) or defers it again because b still holds 1 (``answer="defer"``)."""

    def __init__(self, answer: str):
        super().__init__()
        self.answer = answer
        self.hosts = {"b", "c"}

    def request(self, layer, misses, hits, released, used):
        self.asked.append([e for e, _ in misses])
        on = lambda node, es: [Delivery(e, None, "words", False, "full", node=node) for e in es]  # noqa: E731
        if len(self.asked) == 1:
            return LayerResponse(layer, on("c", [0]) + on("b", [1]), [], misses[2:])
        if len(self.asked) == 2 and self.answer == "on b":
            return LayerResponse(layer, on("b", [e for e, _ in misses]))
        if len(self.asked) == 2:
            return LayerResponse(layer, [], [], list(misses))
        return LayerResponse(layer, on("c", [e for e, _ in misses]))

    def compute(self, node, layer, expert, kind, x, w, values):
        if node not in self.hosts:
            raise KeyError(node)  # as RayTransport.compute on a node it was told failed
        return (node, expert)

    def wait_any(self, handles, timeout=None):
        return handles[:1]

    def node_failed(self, node):
        super().node_failed(node)
        self.hosts.discard(node)


@pytest.mark.parametrize("answer", ["on b", "defer"])
def test_a_request_for_deferred_experts_on_its_way_when_a_node_fails(store, answer):
    from zipmoe_ray.stages.client import ExpertClient

    transport = _RefillAcrossAFailureTransport(answer)
    client = ExpertClient(transport, open_store(store))
    rows = lambda e: (torch.zeros(1, 4), torch.ones(1))  # noqa: E731
    got = []
    for e, _ in client.fetch(0, [0, 1, 2], [3, 2, 1], rows):
        got.append(e)
        client.done(0, e)
    assert sorted(got) == [0, 1, 2] and transport.failed == ["b"]  # every routed expert computed once
    assert all(0 not in asked for asked in transport.asked[1:])  # and only the lost ones asked for again
    assert transport.asked[1] == [2]  # asked for when 0 was released, before 1's node was found failed


# -- over the real parts: a Scheduler in this process, reads and decodes on threads --------------------------
def _pipeline(store_dir, share: float, parts: int | None = 1, split=None):
    from zipmoe_ray.backends.local import LocalRunner, LocalTransport
    from zipmoe_ray.cache.layout import ModelLayout
    from zipmoe_ray.stages.client import ExpertClient
    from zipmoe_ray.stages.decompressor import Decompressor
    from zipmoe_ray.stages.loader import IOLoader
    from zipmoe_ray.stages.scheduler import Scheduler, SchedulerConfig

    s = open_store(store_dir)
    budget = int(ModelLayout.of_store(s).expert_bytes * share)
    runner = LocalRunner(IOLoader(str(store_dir)), [Decompressor(str(store_dir), i) for i in range(2)])
    cfg = SchedulerConfig(budget=budget, decode_parts=parts, **({"split": split} if split else {}))
    sched = Scheduler(str(store_dir), cfg, runner)
    return ExpertClient(LocalTransport(sched), s), sched, runner


def _reference(store_dir, layer, expert):
    t = list(open_store(store_dir).read_expert(layer, expert).values())
    return torch.cat([t[0], t[1]]), t[2]  # fused gate_up, down


@pytest.mark.parametrize("parts", [1, None])  # whole experts, or spread over both lanes in pieces
def test_fetched_weights_are_the_experts_bit_for_bit(tiny_models, tmp_path, parts):
    from zipmoe_ray.store import CompressOptions, compress

    compress(tiny_models["qwen2_moe"], tmp_path / "s", CompressOptions(shards=4))
    client, sched, runner = _pipeline(tmp_path / "s", 1.0, parts)
    try:
        experts = [1, 4, 9]
        got = {}
        for e, w in client.fetch(0, experts, [2, 1, 1]):
            got[e] = w
            client.done(0, e)
        assert sorted(got) == experts
        for e, w in got.items():
            gate_up, down = _reference(tmp_path / "s", 0, e)
            assert torch.equal(w.first, gate_up) and torch.equal(w.second, down)
        client.end_step()
        client.finish()  # sends the step's report, which waits for the client's next message otherwise
        assert sched.cache.staging == 0  # the step released every buffer in flight
        before = client.stats.requests
        again = dict(client.fetch(0, experts, [1, 1, 1]))  # everything fits: now held in FULL form
        assert client.stats.requests == before and client.stats.full_hits == len(experts)
        assert all(again[e] is got[e] for e in experts)
    finally:
        runner.shutdown()


def _messages(client, kind: str) -> list[tuple[str, int]]:
    """Record what ``client`` sends, in order: ("steps", reports in it) and (``kind``, layer), ``kind`` being
    "request" or "prefetch"; the messages still reach the scheduler."""
    sent: list[tuple[str, int]] = []
    steps, other = client.transport.steps, getattr(client.transport, kind)
    client.transport.steps = lambda reports: (sent.append(("steps", len(reports))), steps(reports))[1]
    setattr(client.transport, kind, lambda layer, *a: (sent.append((kind, layer)), other(layer, *a))[1])
    return sent


def test_steps_without_requests_go_out_in_batches_and_before_anything_else(store):
    from zipmoe_ray.stages.client import STEP_BATCH

    client, sched, runner = _pipeline(store, 1.0)
    sent = _messages(client, "request")

    def step(layer, experts):
        for e, _ in client.fetch(layer, experts, [1] * len(experts)):
            client.done(layer, e)
        client.end_step()

    try:
        step(0, [1, 4])  # fetched, then held in full: the steps after it make no request
        for _ in range(STEP_BATCH):
            step(0, [1, 4])
        assert sent == [("request", 0), ("steps", STEP_BATCH)]  # one message for 8 steps, one step waiting
        assert sched.counters["steps"] == STEP_BATCH
        assert sched.counters["hits"]["full"] == 2 * (STEP_BATCH - 1)  # the 7 steps after the fetch
        step(1, [2])  # a miss: the waiting step reaches the scheduler before the request does
        assert sent[2:] == [("steps", 1), ("request", 1)]
        assert sched.counters["steps"] == STEP_BATCH + 1
        client.finish()  # the end of a generation sends what waits
        assert sent[-1] == ("steps", 1) and sched.counters["steps"] == STEP_BATCH + 2
        assert sched.cache.staging == 0
    finally:
        runner.shutdown()


def test_a_prefetch_after_a_layer_of_full_hits_goes_out_behind_the_waiting_step_reports(store):
    client, sched, runner = _pipeline(store, 1.0)
    sent = _messages(client, "prefetch")
    try:
        for e, _ in client.fetch(0, [0], [1]):  # a miss: fetched by a request, then held in full
            client.done(0, e)
        client.end_step()  # waits: nothing else went out since
        assert sent == []
        client.predict(1, [2], [1])
        assert [e for e, _ in client.fetch(0, [0], [1])] == [0]  # a FULL hit, no request: the prefetch alone
        assert sent == [("steps", 1), ("prefetch", 1)]
        client.finish()
        assert sched.cache.staging == 0
    finally:
        runner.shutdown()


def test_step_reports_that_fail_at_the_end_of_a_generation_do_not_stop_its_releases(store, caplog):
    client, sched, runner = _pipeline(store, 1.0)
    try:
        assert sorted(e for e, _ in client.fetch(0, [1, 4], [1, 1])) == [1, 4]  # never released: it failed
        client.end_step()

        def broken(reports):
            raise RuntimeError("the scheduler is gone")

        client.transport.steps = broken
        client.finish()
        assert sched.cache.staging == 0  # the delivered experts were given back all the same
        assert "step reports could not be sent: the scheduler is gone" in caplog.text
    finally:
        runner.shutdown()


def _two_in_flight(store):
    """The pipeline over ``store`` with a budget of the staging reserve alone: two experts in flight at once."""
    from zipmoe_ray.cache.layout import ModelLayout
    from zipmoe_ray.runtime.budget import minimum_budget

    s = open_store(store)
    layout = ModelLayout.of_store(s)
    return _pipeline(store, minimum_budget(layout.sizes, s.top_k) / layout.expert_bytes)


def test_a_small_budget_fetches_in_waves_and_still_delivers_everything(store):
    client, sched, runner = _two_in_flight(store)
    try:
        experts = list(range(6))
        seen, requests = [], []
        for e, w in client.fetch(1, experts, [1] * 6):
            gate_up, down = _reference(store, 1, e)
            assert torch.equal(w.first, gate_up) and torch.equal(w.second, down)
            seen.append(e)
            requests.append(client.stats.requests)
            client.done(1, e)
        assert sorted(seen) == experts and client.stats.waves >= 1
        # the next wave was asked for as soon as the first expert was released, before the wave's last one
        # was computed (the I/O lane reads it meanwhile), not after the whole wave
        assert requests[:2] == [1, 2]
        assert sched.cache.peak <= sched.cache.budget
    finally:
        runner.shutdown()


def test_a_generation_failing_with_a_request_for_deferred_experts_on_its_way_gives_everything_back(store):
    client, sched, runner = _two_in_flight(store)
    try:
        layer = client.fetch(1, list(range(6)), [1] * 6)
        e, _ = next(layer)
        client.done(1, e)
        next(layer)  # the first expert's release went out with a request for the deferred ones
        assert client.stats.requests == 2
        pinned = sum(entry.pins for entry in sched.cache.entries.values())
        assert pinned == 2  # the expert in use and one the request for the deferred ones was given
        layer.close()  # the layer's computation fails here: its answer is never taken by fetch
        client.finish()
        assert sched.cache.staging == 0  # every buffer in flight, the unanswered request's included
        assert all(entry.pins == 0 for entry in sched.cache.entries.values())
        for e, _ in client.fetch(1, list(range(6)), [1] * 6):  # and the next generation gets the budget
            client.done(1, e)
        client.finish()
        assert sched.cache.staging == 0
    finally:
        runner.shutdown()


def test_predicted_experts_arrive_bit_exact_without_a_request_and_wrong_guesses_are_released(
    tiny_models, tmp_path
):
    from zipmoe_ray.backends.local import LocalRunner, LocalTransport
    from zipmoe_ray.cache.layout import ModelLayout
    from zipmoe_ray.runtime.budget import minimum_budget
    from zipmoe_ray.stages.client import ExpertClient
    from zipmoe_ray.stages.decompressor import Decompressor
    from zipmoe_ray.stages.loader import IOLoader
    from zipmoe_ray.stages.scheduler import Scheduler, SchedulerConfig
    from zipmoe_ray.store import CompressOptions, compress

    compress(tiny_models["qwen2_moe"], tmp_path / "s", CompressOptions(shards=2))
    s = open_store(tmp_path / "s")
    layout = ModelLayout.of_store(s)
    budget = 3 * minimum_budget(layout.sizes, s.top_k) + layout.expert_bytes // 8
    runner = LocalRunner(IOLoader(str(tmp_path / "s")), [Decompressor(str(tmp_path / "s"), 0)])
    sched = Scheduler(str(tmp_path / "s"), SchedulerConfig(budget=budget), runner)
    client = ExpertClient(LocalTransport(sched), s)
    try:
        client.predict(1, [2, 5], [1, 1])  # noted while layer 0 computes; sent after layer 0's request
        for e, _ in client.fetch(0, [0], [1]):
            client.done(0, e)
        assert client.stats.predicted == 2 and client.stats.requests == 1
        got = {}
        for e, w in client.fetch(1, [2], [1]):  # 2 was predicted, 5 was a wrong guess
            got[e] = w
            client.done(1, e)
        assert client.stats.requests == 1  # layer 1 made no request: its only expert was on its way
        gate_up, down = _reference(tmp_path / "s", 1, 2)
        assert torch.equal(got[2].first, gate_up) and torch.equal(got[2].second, down)
        client.end_step()
        client.finish()
        rep = client.report()["prefetch"]
        assert rep["used"] == 1 and rep["wasted"] == 1 and rep["recall"] == 0.5
        st = sched.stats()
        assert st["prefetch_used"] == 1 and st["prefetch_wasted_bytes"] > 0
        assert sched.cache.staging == 0 and sched.cache.peak <= budget
    finally:
        runner.shutdown()


def test_predictions_that_keep_missing_stop_being_fetched_and_are_scored_until_they_hit_again(store):
    from zipmoe_ray.cache import SplitRule

    # compressed form only: a wrong guess stays cached compressed and is decoded again when guessed again
    client, sched, runner = _pipeline(store, 1.0, split=SplitRule(full=0.0, compressed=1.0, sm=0.0))

    def steps(n, guess, route):
        for _ in range(n):
            if client.wants_prediction(1):  # what the next router asks before it computes
                client.predict(1, [guess], [1])
            for e, _ in client.fetch(0, [0], [1]):
                client.done(0, e)
            for e, _ in client.fetch(1, [route], [1]):
                client.done(1, e)
            client.end_step()

    try:
        steps(40, guess=5, route=2)  # always wrong
        rep = client.report()["prefetch"]
        assert rep["running_precision"] < MIN_PRECISION
        assert rep["gated"] > 0 and rep["predicted"] + rep["gated"] == 40
        fetched, gated = rep["predicted"], rep["gated"]
        assert fetched < 20  # the gate shut early: once shut, nothing more was fetched
        steps(10, guess=5, route=2)
        rep = client.report()["prefetch"]
        assert rep["predicted"] == fetched and rep["gated"] == gated + 10  # scored, never fetched
        steps(40, guess=3, route=3)  # the routing turns predictable: the scored guesses reopen the gate
        rep = client.report()["prefetch"]
        assert rep["running_precision"] >= MIN_PRECISION
        assert rep["predicted"] > fetched and rep["used"] > 0
        client.finish()
        assert sched.cache.staging == 0
    finally:
        runner.shutdown()


def test_response_waits_count_only_the_time_blocked_on_the_answer():
    from zipmoe_ray.stages.client import response_waits

    events = [
        (0.0, "layer", 0, 4, 2),
        (1.0, "request", 0, 2, None),
        (1.5, "computed", 0, 3, None),  # a FULL hit computed while the request is answered
        (4.0, "computed", 0, 5, None),
        (4.5, "response", 0, -1, None),  # blocked 0.5 s, not 3.5 s
        (5.0, "request", 0, 1, None),  # a later wave: nothing computed meanwhile
        (7.0, "response", 0, -1, None),
        (8.0, "computed", 0, 9, None),  # no request pending: ignored
    ]
    assert response_waits(events) == [0.5, 2.0]
