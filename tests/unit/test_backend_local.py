"""The Backend contract (backends/base.py) kept by the local backend, driven directly without an engine."""

from __future__ import annotations

import pytest

from zipmoe_ray.backends import open_backend
from zipmoe_ray.backends.local import LocalBackend
from zipmoe_ray.plan.choice import scheduler_config
from zipmoe_ray.runtime.config import EngineConfig
from zipmoe_ray.schedule.costs import CostModel
from zipmoe_ray.stages.executor import GenerateRequest
from zipmoe_ray.store import open_store

from ..runtime_helpers import BATCH1, reference


@pytest.fixture
def started(tiny_stores):
    store_dir = str(tiny_stores["olmoe"])
    cfg = EngineConfig(memory_budget="100%", backend="local", num_decompressors=2, read_mode="page-cache")
    backend = open_backend(store_dir, open_store(store_dir), cfg)
    backend.start_lanes()
    costs = backend.calibrate()
    budget = sum(r.original_bytes for r in backend.store.index.experts)
    backend.start_pipeline(scheduler_config(cfg, budget, "cpu"), costs)
    yield backend, costs
    backend.close()
    backend.close()  # idempotent


def test_open_backend_chooses_local(tiny_stores):
    store_dir = str(tiny_stores["olmoe"])
    b = open_backend(store_dir, open_store(store_dir), EngineConfig(memory_budget="50%", backend="local"))
    assert isinstance(b, LocalBackend) and b.name == "local" and b.nodes == 1


def test_calibration_measures_the_lanes(started):
    _, costs = started
    assert isinstance(costs, CostModel) and costs.source.startswith("calibrated")
    assert costs.read_bps > 0 and costs.decode_bps > 0 and costs.decompress_bps > 0


def test_calls_streams_and_stats(started, tiny_models):
    backend, costs = started
    ref, _ = reference(tiny_models["olmoe"], "olmoe", BATCH1, 6)
    res = backend.call("executor", "generate", GenerateRequest(BATCH1, 6))
    assert res.token_ids == ref
    events = list(backend.stream(GenerateRequest(BATCH1, 6)))
    assert [e[1][0] for e in events if e[0] == "tokens"] == ref[0]
    assert events[-1][0] == "result" and events[-1][1].token_ids == ref
    sched = backend.call("scheduler", "stats")
    assert sched["costs"] == costs.to_dict()
    lanes = backend.lane_stats(sched)
    assert list(lanes.nodes) == ["local"] and len(lanes.decompressors) == 2 and lanes.loaders[0]["reads"] > 0
    backend.reset_stats()
    assert backend.lane_stats(backend.call("scheduler", "stats")).loaders[0]["reads"] == 0
    assert backend.device == "cpu"


def test_pieces_decode_in_place_into_one_buffer(tiny_models, tmp_path):
    """The local lanes write an expert's pieces into one buffer: every piece's handle is that buffer, the
    whole expert bit for bit, and the client builds its weights on it without a copy."""
    import numpy as np

    from zipmoe_ray.backends.local import LocalRunner
    from zipmoe_ray.stages.decompressor import Decompressor
    from zipmoe_ray.stages.loader import IOLoader
    from zipmoe_ray.store import CompressOptions, compress

    compress(tiny_models["qwen2_moe"], tmp_path / "s", CompressOptions(shards=4))
    store = str(tmp_path / "s")
    runner = LocalRunner(IOLoader(store), [Decompressor(store, i) for i in range(2)])
    try:
        exp, sm = runner.read_split((0, 3))
        handles = runner.decode_lane(0, [((0, 3), exp, sm, False, (0, 2))]) + runner.decode_lane(
            1, [((0, 3), exp, sm, False, (1, 2))]
        )
        values = [h.result() for h in handles]
        assert values[0] is values[1] and not runner._buffers
        whole = Decompressor(store).decode(0, 3, extent=open_store(store).read_extent(0, 3))
        assert np.array_equal(values[0], whole)
    finally:
        runner.shutdown()
