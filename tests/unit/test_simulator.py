"""The simulator (sim/): the lower bounds, determinism, batches, and the cluster simulation reducing to one device."""

from __future__ import annotations

import dataclasses

import pytest

from zipmoe_ray.errors import ConfigError
from zipmoe_ray.plan import BUILTIN_PROFILES, Workload
from zipmoe_ray.sim import belady_misses, simulate
from zipmoe_ray.trace import synth

ORIN = BUILTIN_PROFILES["orin-agx-64gb"]


SHAPE = dict(num_layers=3, num_experts=12, top_k=2, expert_bytes=1_000_000)


def workload(skew: float, prompts=3, tokens=40, seed=0, batch=1) -> Workload:
    w = Workload.from_count_trace(
        synth(**SHAPE, prompts=prompts, tokens=tokens, skew=skew, seed=seed), batch=batch
    )
    for k in w.sizes:
        w.sizes[k] = dataclasses.replace(w.sizes[k], shards=4)
    return w


def test_belady_by_hand():
    a, b, c = (0, 0), (0, 1), (0, 2)
    # capacity 2, sequence a b c a b: pre-filled {a, b}; c misses and evicts b (used after a); b misses again
    assert belady_misses([[a], [b], [c], [a], [b]], 2) == [0, 0, 1, 0, 1]
    assert sum(belady_misses([[a], [b], [c]], 0)) == 3


@pytest.mark.parametrize("skew", [0.5, 1.5])
@pytest.mark.parametrize("share", [0.1, 0.3, 0.6])
def test_the_lower_bound_is_never_above_any_policy(skew, share):
    w = workload(skew, prompts=2, tokens=60)
    budget = int(share * w.expert_bytes)
    for policy in ("zipmoe", "full-lru", "full-lfu", "compressed-only", "sm-only"):
        r = simulate(w, budget, ORIN, policy)
        assert r.lower_bound_tpot_s <= r.tpot_s, policy
        assert r.offline_lower_bound_tpot_s <= r.tpot_s, policy
        assert 0.0 <= r.io_utilisation <= 1.0 and abs(sum(r.hit_rates.values()) - 1.0) < 1e-9


def test_simulation_is_deterministic_and_policies_differ():
    w = workload(1.0)
    budget = int(0.3 * w.expert_bytes)
    a = simulate(w, budget, ORIN, "full-lru")
    b = simulate(w, budget, ORIN, "full-lru")
    assert a.tpot_s == b.tpot_s and a.bytes_read == b.bytes_read
    assert a.hit_rates["compressed"] == 0 and a.hit_rates["sm"] == 0
    z = simulate(w, budget, ORIN, "zipmoe")
    assert z.tpot_s < a.tpot_s  # compression holds more experts in the same budget
    with pytest.raises(ConfigError, match="policy"):
        simulate(w, budget, ORIN, "magic")


def test_bigger_batches_read_more_per_step():
    w1, w4 = workload(1.0, prompts=4, batch=1), workload(1.0, prompts=4, batch=4)
    budget = int(0.3 * w1.expert_bytes)
    r1, r4 = simulate(w1, budget, ORIN, "zipmoe"), simulate(w4, budget, ORIN, "zipmoe")
    assert r4.bytes_read_per_step > r1.bytes_read_per_step and r4.batch == 4


# -- several devices -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["zipmoe", "full-lru"])
def test_a_one_device_cluster_simulates_exactly_like_one_device(policy):
    from zipmoe_ray.sim import simulate_cluster

    w = workload(1.0)
    b = int(0.3 * w.expert_bytes)
    one = simulate(w, b, ORIN, policy)
    cl = simulate_cluster(w, 1, b, ORIN, policy=policy, hidden_size=2048)
    assert cl.tpot_s == one.tpot_s and cl.bytes_read == one.bytes_read and cl.remote_share == 0


def test_more_devices_hold_more_and_send_hidden_states_not_experts():
    from zipmoe_ray.sim import simulate_cluster

    w = workload(0.5)
    per = w.expert_bytes // 2
    one, two = (simulate_cluster(w, n, per, ORIN, hidden_size=2048) for n in (1, 2))
    assert two.bytes_read < one.bytes_read  # twice the memory: fewer misses
    assert 0.3 < two.remote_share < 0.7  # half the experts live on the second device
    tokens = sum(tok for step in w.steps for picks in step for _, tok in picks) / len(w.steps)
    assert two.network_bytes_per_step <= 2 * tokens * 2048 * 2  # rows out and back, never weights
    assert [d["experts_homed"] for d in two.per_device] == [len(w.sizes) // 2] * 2
    with pytest.raises(ConfigError, match="devices"):
        simulate_cluster(w, 0, per, ORIN, hidden_size=2048)


def test_planner_trials_beside_the_replay_choose_the_same_plan(monkeypatch):
    """Half the planner's trial replays run in a forked child on long workloads: the scores, and so the
    plan, are exactly those of running them one after another."""
    import zipmoe_ray.sim.simulator as simulator
    from zipmoe_ray.runtime.budget import minimum_budget

    w = workload(1.0, prompts=4)
    profile = BUILTIN_PROFILES["orin-agx-64gb"]
    args = (w, int(0.3 * w.expert_bytes), profile, minimum_budget(w.sizes, w.top_k))
    monkeypatch.setattr(simulator, "BACKGROUND_TRIAL_PAIRS", 10**12)
    inline = simulator.choose_plan(*args)
    monkeypatch.setattr(simulator, "BACKGROUND_TRIAL_PAIRS", 0)
    forked = simulator.choose_plan(*args)
    assert forked.candidates == inline.candidates and forked.chosen == inline.chosen
    assert forked.forms == inline.forms and forked.decay == inline.decay


def test_shared_cores_slow_the_executor_while_lanes_decode():
    from zipmoe_ray.sim.runner import SimRunner

    r = SimRunner({}, ORIN.costs(), 2, cores=2, executor_cores=2)
    r._lane(0, 0.0, 1.0)  # lane 0 decodes over [0, 1)
    # 2 executor threads and 1 lane on 2 cores: the executor runs at 2/3 while the lane is busy
    assert r.compute(0.0, 1.0) == pytest.approx(1.0 + 1.0 / 3)
    r._lane(0, 2.0, 1.0)
    r._lane(1, 2.0, 1.0)  # both lanes over [2, 3): half speed
    assert r.compute(2.0, 1.0) == pytest.approx(3.5)
    assert r.compute(5.0, 1.0) == 6.0  # no lane busy any more
    alone = SimRunner({}, ORIN.costs(), 2, cores=2, executor_cores=0)  # an accelerator: undisturbed
    alone._lane(0, 0.0, 1.0)
    assert alone.compute(0.0, 1.0) == 1.0 and not alone.contended


def test_a_cpu_executor_pays_for_decoding_beside_it_and_plain_offloading_does_not():
    w = workload(1.0)
    budget = int(0.3 * w.expert_bytes)
    cpu = ORIN.with_(cpu_cores=2, decode_workers=2, recombine_on_device=False, executor_gbps=2.0)
    shared = cpu.with_(executor_cores=2)
    for policy in ("compressed-only", "zipmoe"):
        assert simulate(w, budget, shared, policy).tpot_s > simulate(w, budget, cpu, policy).tpot_s, policy
    # classic offloading reads full experts and decodes nothing: the shared cores cost it nothing
    assert simulate(w, budget, shared, "full-lru").tpot_s == simulate(w, budget, cpu, "full-lru").tpot_s
    with pytest.raises(ConfigError, match="executor_cores"):
        cpu.with_(executor_cores=3)


def test_the_simulator_re_plans_online_like_the_engine_and_leaves_a_plan_too_slow_to_decode():
    from zipmoe_ray.runtime.budget import minimum_budget
    from zipmoe_ray.sim.simulator import choose_plan

    w = workload(0.5, prompts=4, tokens=100)
    budget = int(0.5 * w.expert_bytes)
    # these experts are 1 MB: Orin's fixed hand-over per delivered expert (0.2 ms of the executor's time,
    # 30x what computing one takes it) would make every fetch dearer than a FULL hit whatever the decode
    # rate, so it is left out here
    ORIN = BUILTIN_PROFILES["orin-agx-64gb"].with_(delivery_overhead_s=0.0)
    plan = choose_plan(w, budget, ORIN, minimum_budget(w.sizes, w.top_k))
    assert plan.counts()["compressed"] > 0 and plan.counts()["full"] == 0  # Orin decodes fast
    # the same plan on a device whose cores decode 100x slower: every compressed hit is a slow decode,
    # and timing it against full-only (which decodes only its misses) leaves it
    slow = ORIN.with_(decompress_gbps_per_core=ORIN.decompress_gbps_per_core / 100,
                      recombine_gbps_per_core=ORIN.recombine_gbps_per_core / 100)  # fmt: skip
    fixed = simulate(w, budget, slow, "zipmoe", plan=plan)
    tuned = simulate(w, budget, slow, "zipmoe", plan=plan, replan_every=256)
    assert fixed.replan is None and fixed.split["compressed"] > 0
    assert tuned.replan["in_use"] == "full-only" and tuned.replan["switches"] >= 1
    assert tuned.split == {"full": 1.0, "compressed": 0.0, "sm": 0.0}
    assert tuned.tpot_s < fixed.tpot_s
    # on the device the plan was made for, the same rounds keep it: it is the faster there
    kept = simulate(w, budget, ORIN, "zipmoe", plan=plan, replan_every=256)
    assert kept.replan["in_use"] == "start-up plan" and kept.replan["rounds"] >= 1
    assert kept.split == fixed.split


def test_a_delivered_expert_is_handed_over_on_the_executors_clock():
    from zipmoe_ray.sim.simulator import executor_layer

    class Answer:  # the scheduler answering one request with two experts ready at t = 1
        def __init__(self):
            from zipmoe_ray.cache.forms import Form

            entry = type("E", (), {"form": Form.DISK})()
            self.cache = type("C", (), {"entries": {(0, 0): entry, (0, 1): entry}})()

        def request(self, layer, misses, hits, released, used=()):
            from zipmoe_ray.sim.runner import SimHandle
            from zipmoe_ray.stages.protocol import Delivery, LayerResponse

            return LayerResponse(
                layer, [Delivery(e, SimHandle(1.0), "words", False, "disk") for e, _ in misses]
            )

    class Runner:
        contended, now = False, 0.0

    sizes = {(0, 0): type("S", (), {"full": 100})(), (0, 1): type("S", (), {"full": 100})()}
    picks = [(0, 1), (1, 1)]
    plain = executor_layer(Answer(), Runner(), 0, picks, 0.0, sizes, 100.0, 0.0, [], [])[0]
    handed = executor_layer(Answer(), Runner(), 0, picks, 0.0, sizes, 100.0, 0.0, [], [], 0.25)[0]
    assert plain == 3.0  # both ready at 1, computed one after the other in 1 s each
    assert handed == 3.5  # each hand-over is executor time: not hidden behind the other expert


def test_calibration_measures_the_hand_over_beyond_the_slowed_compute():
    from zipmoe_ray.cli.calibrate_engine import _handoff_s

    cpu = BUILTIN_PROFILES["orin-agx-64gb"].with_(cpu_cores=2, recombine_on_device=False, executor_cores=2)
    events = [
        (0.0, "ready", 0, 1, "disk"),
        (0.010, "computed", 0, 1, None),
        (0.010, "ready", 0, 2, "compressed"),
        (0.016, "computed", 0, 2, None),
        (0.020, "computed", 0, 3, None),  # a FULL hit: never delivered, not counted
    ]
    # spans 10 and 6 ms, mean 8; one expert's compute 1 ms alone, 2 ms with the executor's two threads
    # and two busy lanes on two cores
    assert _handoff_s(events, 0.001, cpu, 2) == pytest.approx(0.006)
    assert _handoff_s(events, 0.001, cpu.with_(executor_cores=0), 2) == pytest.approx(0.007)  # a GPU
    assert _handoff_s(events[-1:], 0.001, cpu, 2) is None


def test_recorded_predictions_are_replayed_through_the_prefetch_gate():
    w = workload(1.0, prompts=4, tokens=60)
    n = w.num_experts

    def predicted(guess):
        return [[[]] + [guess(picks) for picks in step[1:]] for step in w.steps]

    budget = int(0.3 * w.expert_bytes)
    plain = simulate(w, budget, ORIN, "full-lru", warm_start=False, measure_from=20)
    assert plain.prefetch is None
    right = dataclasses.replace(w, predictions=predicted(list))  # each layer's own routing: always right
    wrong = dataclasses.replace(
        w, predictions=predicted(lambda picks: [((e + n // 2) % n, t) for e, t in picks])
    )
    r = simulate(right, budget, ORIN, "full-lru", warm_start=False, measure_from=20)
    assert r.prefetch["predicted"] > 0 and r.prefetch["wasted"] == 0 and r.prefetch["gated"] == 0
    assert r.prefetch["recall"] > 0.3 and r.prefetch["running_precision"] == 1.0
    assert r.tpot_s < plain.tpot_s  # the reads start a layer early
    x = simulate(wrong, budget, ORIN, "full-lru", warm_start=False, measure_from=20)
    assert x.prefetch["used"] == 0 and x.prefetch["gated"] > 0  # the gate shut after the first misses
    assert x.prefetch["predicted"] < x.prefetch["gated"]
    assert simulate(right, budget, ORIN, "full-lru", warm_start=False, measure_from=20) == r  # deterministic


def test_the_breakdown_adds_up_to_the_step_time_like_the_engines():
    w = workload(1.0)
    for share, policy in ((0.3, "zipmoe"), (0.3, "full-lru"), (1.5, "full-lru")):
        r = simulate(w, int(share * w.expert_bytes), ORIN, policy)
        b = r.breakdown_s
        assert set(b) == {"round_trips", "waiting_for_experts", "expert_compute", "outside_moe"}
        assert min(b.values()) >= 0 and b["expert_compute"] > 0 and b["outside_moe"] > 0
        if share > 1:  # every expert held in full after the warm-up: nothing to wait for
            assert b["round_trips"] == b["waiting_for_experts"] == 0
        else:
            assert b["waiting_for_experts"] > 0


def test_a_used_prefetch_is_counted_before_a_later_prefetch_releases_it():
    """Layers that miss nothing send their releases with the next prediction: the use of a prefetched expert
    finished with must reach the scheduler first, or its bytes count as wasted and its hit as a miss."""
    shape = dict(SHAPE, num_layers=8)
    w = Workload.from_count_trace(synth(**shape, prompts=3, tokens=40, skew=1.0, seed=0))
    right = dataclasses.replace(w, predictions=[[[]] + [list(p) for p in step[1:]] for step in w.steps])
    r = simulate(right, int(0.3 * w.expert_bytes), ORIN, "full-lru", warm_start=False, measure_from=20)
    f = r.prefetch
    assert f["used"] > 0 and f["issued"] == f["used"] and f["precision"] == 1.0
    assert f["wasted_bytes"] == 0 and f["wasted"] == 0
