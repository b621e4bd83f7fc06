"""The Ray backend with its lanes in the executor's process (``lanes="executor"``, backends/colocated.py; its
bit-exactness on every architecture is test_bit_exact's, the default lanes): no result outlives the
scheduler's last token for it."""

from __future__ import annotations

import pytest

from zipmoe_ray.engine import ZipMoEEngine

from ..runtime_helpers import BATCH1, BATCH4, assert_bit_exact, reference, start_ray

MAX_NEW = 10


@pytest.fixture(scope="module")
def ray_cluster():
    ray = start_ray()
    yield ray
    ray.shutdown()


def test_the_executor_holds_only_results_the_scheduler_still_names(tiny_stores, tiny_models, ray_cluster):
    import ray

    with ZipMoEEngine(
        tiny_stores["deepseek_v2"],
        memory_budget="10%",
        backend="ray",
        lanes="executor",
        num_decompressors=2,
        policy="compressed-only",  # cached extents are results the executor holds for the scheduler
        calibrate=False,
    ) as engine:
        for batch in (BATCH1, BATCH4):
            ref = reference(tiny_models["deepseek_v2"], "deepseek_v2", batch, MAX_NEW, do_sample=False)
            assert_bit_exact(engine.generate(batch, MAX_NEW, output_logits=True), *ref)
            backend = engine._backend
            held = ray.get(backend.scheduler.live_tokens.remote())
            results = ray.get(backend.executor.held_results.remote())
            # every result the executor keeps is one the scheduler still names (cached forms, FULL weights
            # kept for demotion); tokens it let go of were forgotten by the end of the generation
            assert results <= held, sorted(results - held)[:5]
            assert results  # the cached extents, not all dropped
        s = engine.stats()
        assert s["peak_cache_bytes"] <= s["budget"] and s["misses"]["disk"] > 0
        # the bytes and decodes are counted by the executor's own lanes
        assert s["bytes_read"] > 0 and [n["decodes"] > 0 for n in s["nodes"].values()] == [True]
