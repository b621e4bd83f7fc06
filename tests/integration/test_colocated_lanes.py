"""The Ray backend with its lanes in the executor's process (``lanes="executor"``, backends/colocated.py):
bit-exact against plain transformers (misses, re-planning's demotions), and no result outlives the
scheduler's last token for it."""

from __future__ import annotations

import pytest
import torch

from zipmoe_ray.engine import ZipMoEEngine

from ..runtime_helpers import BATCH1, BATCH4, assert_bit_exact, reference, start_ray

MAX_NEW = 10


@pytest.fixture(scope="module")
def ray_cluster():
    ray = start_ray()
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_lanes_in_the_executor_are_bit_exact_and_hold_only_what_the_scheduler_holds(
    arch, tiny_stores, tiny_models, ray_cluster
):
    import ray

    for budget in ("100%", "10%"):
        with ZipMoEEngine(
            tiny_stores[arch],
            memory_budget=budget,
            backend="ray",
            lanes="executor",
            num_decompressors=2,
            calibrate=budget == "10%",
        ) as engine:
            for batch in (BATCH1, BATCH4):
                ref = reference(tiny_models[arch], arch, batch, MAX_NEW, do_sample=False)
                assert_bit_exact(engine.generate(batch, MAX_NEW, output_logits=True), *ref)
            s = engine.stats()
            assert s["peak_cache_bytes"] <= s["budget"]
            if budget == "10%":
                assert s["misses"]["disk"] > 0
                # the bytes and decodes are counted by the executor's own lanes
                assert s["bytes_read"] > 0 and [n["decodes"] > 0 for n in s["nodes"].values()] == [True]
            backend = engine._backend
            held = ray.get(backend.scheduler.live_tokens.remote())
            results = ray.get(backend.executor.held_results.remote())
            # every result the executor keeps is one the scheduler still names (cached forms, FULL weights
            # kept for demotion); tokens it let go of were forgotten
            assert results <= held, sorted(results - held)[:5]


def test_re_planning_demotions_through_tokens_stay_bit_exact(tiny_stores, tiny_models, ray_cluster):
    new = 40
    ref_ids, ref_logits = reference(tiny_models["qwen2_moe"], "qwen2_moe", BATCH1, new)
    with ZipMoEEngine(
        tiny_stores["qwen2_moe"],
        memory_budget="30%",
        backend="ray",
        lanes="executor",
        num_decompressors=2,
        calibrate=False,
        replan_every=2,
    ) as engine:
        out = engine.generate(BATCH1[0], new, output_logits=True)
        s = engine.stats()
    assert out.token_ids == ref_ids[0]
    assert all(torch.equal(out.logits[i], ref_logits[i][0]) for i in range(len(ref_logits)))
    assert s["replan"]["changes"] >= 2
    assert s["peak_cache_bytes"] <= s["budget"]
