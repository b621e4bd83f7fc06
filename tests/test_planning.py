"""Traces, device profiles, the planner and the simulator, on small hand-checkable cases."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from zipmoe_ray.cache.forms import Form
from zipmoe_ray.errors import ConfigError
from zipmoe_ray.plan import BUILTIN_PROFILES, Plan, Workload, load_profile, make_plan
from zipmoe_ray.runtime.budget import minimum_budget
from zipmoe_ray.sim import belady_misses, simulate
from zipmoe_ray.trace import CountTrace, load_any, load_recorded, synth

ORIN = BUILTIN_PROFILES["orin-agx-64gb"]
SHAPE = dict(num_layers=3, num_experts=12, top_k=2, expert_bytes=1_000_000)


def workload(skew: float, prompts=3, tokens=40, seed=0, batch=1) -> Workload:
    w = Workload.from_count_trace(
        synth(**SHAPE, prompts=prompts, tokens=tokens, skew=skew, seed=seed), batch=batch
    )
    for k in w.sizes:
        w.sizes[k] = dataclasses.replace(w.sizes[k], shards=4)
    return w


# --- traces ------------------------------------------------------------------------------------------------


def test_count_trace_steps_reproduce_the_counts_exactly():
    t = synth(**SHAPE, prompts=2, tokens=30, skew=1.0, seed=3)
    drawn = [[0] * 12 for _ in range(3)]
    for step in t.steps(batch=1, seed=5):
        for layer, picks in enumerate(step):
            assert len(picks) <= 2 and len({e for e, _ in picks}) == len(picks)  # at most top-k, distinct
            for e, tok in picks:
                drawn[layer][e] += tok
    assert drawn == t.totals()


def test_batch_steps_activate_more_experts():
    t = synth(**SHAPE, prompts=8, tokens=20, skew=0.0)
    b1 = sum(len(p) for s in t.steps(batch=1) for p in s) / len(list(t.steps(batch=1)))
    b4 = sum(len(p) for s in t.steps(batch=4) for p in s) / len(list(t.steps(batch=4)))
    assert b4 > 2 * b1


def test_count_trace_json_round_trip_and_errors(tmp_path):
    t = synth(**SHAPE, prompts=1, tokens=5)
    t.save(tmp_path / "t.json")
    again = load_any(tmp_path / "t.json")
    assert isinstance(again, CountTrace) and again.counts == t.counts
    bad = t.to_json() | {"format": "something/9"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="format"):
        load_any(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="negative"):
        CountTrace(t.model, [[[-1] * 12] * 3])


def test_traces_load_without_torch(tmp_path):
    synth(**SHAPE, prompts=1, tokens=5).save(tmp_path / "t.json")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from zipmoe_ray.trace import load_any\n"
        f"print(load_any({str(tmp_path / 't.json')!r}).num_layers)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "3"


def test_engine_records_a_trace_that_converts(tiny_stores, tmp_path):
    from zipmoe_ray.engine import ZipMoEEngine

    path = tmp_path / "t.jsonl"
    with ZipMoEEngine(
        tiny_stores["qwen3_moe"], memory_budget="20%", backend="local", trace_path=path, calibrate=False
    ) as e:
        e.generate([5, 6, 7, 8], 6)
        e.generate([[1, 2, 3], [9, 9]], 3)
    tr = load_recorded(path)
    assert [(s.request, s.kind) for s in tr.steps[:2]] == [(0, "prefill"), (0, "decode")]
    assert tr.steps[-1].batch == 2 and tr.layers == [0, 1, 2]
    assert all(sum(t for _, t in tr.steps[0].layers[layer]) == 4 * 2 for layer in tr.layers)  # prompt x top-k
    ct = CountTrace.from_recorded(tr)
    assert len(ct.counts) == 2
    assert sum(map(sum, ct.counts[0])) == 5 * 3 * 2  # 5 decode steps x 3 layers x top-2
    with ZipMoEEngine(  # appending to the same file continues the request numbering
        tiny_stores["qwen3_moe"], memory_budget="20%", backend="local", trace_path=path, calibrate=False
    ) as e:
        e.generate([5, 6], 2)
    assert load_recorded(path).steps[-1].request == 2


# --- device profiles -----------------------------------------------------------------------------------------


def test_profiles(tmp_path):
    assert set(BUILTIN_PROFILES) >= {"orin-agx-64gb", "orin-agx-32gb"}
    for p in BUILTIN_PROFILES.values():
        assert set(p.sources) >= {"ssd_read_gbps", "decompress_gbps_per_core", "cpu_cores", "memory_bytes"}
    ORIN.save(tmp_path / "p.json")
    assert load_profile(str(tmp_path / "p.json")) == ORIN
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_profile("pdp-11")
    with pytest.raises(ConfigError, match="ssd_read_gbps"):
        dataclasses.replace(ORIN, ssd_read_gbps=0)
    assert ORIN.decode_gbps_per_core == ORIN.decompress_gbps_per_core  # GPU recombination
    cpu = dataclasses.replace(ORIN, recombine_on_device=False)
    assert cpu.decode_gbps_per_core < cpu.decompress_gbps_per_core


# --- planner ---------------------------------------------------------------------------------------------


def test_a_budget_that_fits_everything_plans_everything_and_only_hits():
    w = workload(1.0)
    budget = 2 * w.expert_bytes
    plan = make_plan(w, budget, ORIN.costs(), ORIN.decode_workers, reserve=minimum_budget(w.sizes, 2))
    used = {k for k, p in w.access.items() if p > 0}
    assert all(plan.forms[k] != Form.DISK for k in used)
    r = simulate(w, budget, ORIN, "zipmoe")
    assert r.hit_rates["disk"] == 0.0 and r.bytes_read == 0


def test_zero_skew_gives_a_uniform_plan():
    w = workload(0.0, prompts=6, tokens=200)
    w.access = {k: 2 / 12 for k in w.sizes}  # the exact uniform prior, without sampling noise
    budget = int(0.3 * w.expert_bytes)
    plan = make_plan(w, budget, ORIN.costs(), ORIN.decode_workers, reserve=minimum_budget(w.sizes, 2))
    per_layer = {}
    for (layer, _), f in plan.forms.items():
        per_layer.setdefault(layer, []).append(f)
    counts = [sum(f != Form.DISK for f in forms) for forms in per_layer.values()]
    assert max(counts) - min(counts) <= 1  # every layer gets the same share of the budget
    kinds = {f for forms in per_layer.values() for f in forms if f != Form.DISK}
    assert len(kinds) == 1  # one form for all: with no skew no expert earns a better one than another


@pytest.mark.parametrize("skew", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("share", [0.15, 0.4])
def test_plan_fits_the_budget_and_round_trips(skew, share):
    w = workload(skew)
    budget = int(share * w.expert_bytes)
    reserve = minimum_budget(w.sizes, 2)
    plan = make_plan(w, budget, ORIN.costs(), ORIN.decode_workers, reserve=reserve)
    assert 0 < sum(plan.held(w.sizes).values()) <= budget - reserve  # holds something, within the cache
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert (
        again.forms == {k: f for k, f in plan.forms.items() if f != Form.DISK} and again.chosen == plan.chosen
    )


# --- simulator and bounds ----------------------------------------------------------------------------------------


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


def test_a_recorded_trace_drives_the_simulator_too(tiny_stores, tmp_path):
    from zipmoe_ray.cache.layout import expert_sizes
    from zipmoe_ray.engine import ZipMoEEngine
    from zipmoe_ray.store import open_store

    path = tmp_path / "t.jsonl"
    with ZipMoEEngine(
        tiny_stores["olmoe"], memory_budget="20%", backend="local", trace_path=path, calibrate=False
    ) as e:
        e.generate([5, 6, 7, 8], 20)
    w = Workload.from_recorded(load_recorded(path), sizes=expert_sizes(open_store(tiny_stores["olmoe"])))
    r = simulate(w, int(0.2 * w.expert_bytes), ORIN, "zipmoe")
    assert r.steps > 10 and r.lower_bound["kind"] == "offline"
    assert r.offline_lower_bound_tpot_s <= r.tpot_s


def test_engine_uses_a_plan(tiny_stores, tmp_path):
    from zipmoe_ray.cache.layout import expert_sizes
    from zipmoe_ray.engine import ZipMoEEngine
    from zipmoe_ray.store import open_store

    store = open_store(tiny_stores["mixtral"])
    sizes = expert_sizes(store)
    w = Workload.uniform(store.layers(), store.num_experts, store.top_k, sizes)
    budget = int(0.4 * sum(s.full for s in sizes.values()))
    plan = make_plan(w, budget, ORIN.costs(), 2, reserve=minimum_budget(sizes, store.top_k))
    plan.save(tmp_path / "plan.json")
    with ZipMoEEngine(
        tiny_stores["mixtral"],
        memory_budget=budget,
        backend="local",
        plan=tmp_path / "plan.json",
        calibrate=False,
    ) as e:
        e.generate([1, 2, 3], 4)
        s = e.stats()
    assert s["split"]["source"] == "given plan"
    cached = {k: v for k, v in plan.counts().items() if k != "disk"}
    assert {k: v for k, v in s["split"]["plan"].items() if k != "disk"} == cached


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
