"""The engine with planning: it records a trace that converts and drives the simulator, and it runs a given plan."""

from __future__ import annotations

from zipmoe_ray.plan import BUILTIN_PROFILES, Workload, make_plan
from zipmoe_ray.runtime.budget import minimum_budget
from zipmoe_ray.sim import simulate
from zipmoe_ray.trace import CountTrace, load_recorded

ORIN = BUILTIN_PROFILES["orin-agx-64gb"]


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
    # prefetch is on: every layer but the first was predicted by the one before it, in every step
    assert all(set(s.predicted) == set(tr.layers[1:]) for s in tr.steps)
    ct = CountTrace.from_recorded(tr)
    assert len(ct.counts) == 2
    assert sum(map(sum, ct.counts[0])) == 5 * 3 * 2  # 5 decode steps x 3 layers x top-2
    with ZipMoEEngine(  # appending to the same file continues the request numbering
        tiny_stores["qwen3_moe"], memory_budget="20%", backend="local", trace_path=path, calibrate=False
    ) as e:
        e.generate([5, 6], 2)
    assert load_recorded(path).steps[-1].request == 2


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


def test_calibrating_the_engine_measures_its_overheads_under_load(tiny_stores):
    """``calibrate --engine``'s probe on a real Ray pipeline: every figure it returns is measured, the round
    trip and hand-over from a run whose lanes decode every cached expert."""
    from zipmoe_ray.cli.calibrate_engine import measure_engine

    from ..runtime_helpers import start_ray

    ray = start_ray()
    try:
        base = ORIN.with_(cpu_cores=2, decode_workers=2, recombine_on_device=False, executor_cores=2)
        out, src = measure_engine(str(tiny_stores["qwen3_moe"]), 2, base)
    finally:
        ray.shutdown()
    assert out["executor_gbps"] > 0 and out["non_moe_s_per_token"] >= 0
    assert out["request_overhead_s"] > 0 and out["delivery_overhead_s"] >= 0
    assert out["decompress_gbps_per_core"] > 0
    assert set(src) == set(out) and all(s.startswith("measured") for s in src.values())
    assert "lanes busy" in src["request_overhead_s"]
