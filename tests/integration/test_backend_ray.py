"""The Backend contract (backends/base.py) kept by the Ray backend on the Ray instance this module starts
(never "the" one on the machine: others may run beside it)."""

from __future__ import annotations

import pytest

from zipmoe_ray.backends import open_backend
from zipmoe_ray.backends.ray_backend import RayBackend
from zipmoe_ray.errors import ChecksumError
from zipmoe_ray.plan.choice import scheduler_config
from zipmoe_ray.runtime.config import EngineConfig
from zipmoe_ray.schedule.costs import CostModel
from zipmoe_ray.stages.executor import GenerateRequest
from zipmoe_ray.store import open_store

from ..runtime_helpers import BATCH1, reference, start_ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = start_ray()
    yield ray
    ray.shutdown()


def _start(store_dir, **kw):
    cfg = EngineConfig(memory_budget="100%", backend="ray", num_decompressors=2, **kw)
    backend = open_backend(str(store_dir), open_store(store_dir), cfg)
    backend.start_lanes()
    budget = sum(r.original_bytes for r in backend.store.index.experts)
    costs = backend.calibrate() if cfg.calibrate else CostModel.nominal()
    backend.start_pipeline(scheduler_config(cfg, budget, "cpu"), costs)
    return backend


def test_one_node_runs_every_stage_as_an_actor_and_close_kills_them(tiny_stores, tiny_models, ray_cluster):
    ray = ray_cluster
    backend = _start(tiny_stores["qwen3_moe"], lanes="actors")  # lanes="auto" runs them in the executor
    try:
        assert isinstance(backend, RayBackend) and backend.nodes == 1 and not backend.colocated
        assert not backend.started_ray  # attached to the module's instance: close must not shut it down
        ref, _ = reference(tiny_models["qwen3_moe"], "qwen3_moe", BATCH1, 5)
        assert backend.call("executor", "generate", GenerateRequest(BATCH1, 5)).token_ids == ref
        tokens = [v[0] for k, v in backend.stream(GenerateRequest(BATCH1, 5)) if k == "tokens"]
        assert tokens == ref[0]
        lanes = backend.lane_stats(backend.call("scheduler", "stats"))
        assert len(lanes.nodes) == 1 and len(lanes.decompressors) == 2
        actors = backend._stages()
    finally:
        backend.close()
    assert ray.is_initialized()
    for a in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(a.ping.remote(), timeout=30)


@pytest.mark.parametrize("lanes", ["actors", "executor"])
def test_read_timeline_comes_from_the_loader_wherever_it_runs(tiny_stores, ray_cluster, lanes):
    backend = _start(tiny_stores["qwen3_moe"], lanes=lanes, timeline=True, bandwidth=2e9)
    try:
        assert backend.colocated == (lanes == "executor")
        backend.call("executor", "generate", GenerateRequest(BATCH1, 3))
        (node, got), *rest = backend.read_timelines()
        lanes_now = backend.lane_stats(backend.call("scheduler", "stats"))
        assert not rest and [node] == list(lanes_now.nodes) and got["dropped"] == 0  # named as in stats()
        assert got["reads"] and sum(r[2] for r in got["reads"]) == lanes_now.loaders[0]["bytes_read"]
        assert "read_timeline" not in lanes_now.loaders[0]  # stats() stays small: the reads come on request
        backend.reset_stats()
        assert backend.read_timelines()[0][1] == {"reads": [], "dropped": 0}
    finally:
        backend.close()


def test_errors_of_the_stages_arrive_as_zipmoe_errors(tiny_stores, tmp_path, ray_cluster):
    import shutil

    shutil.copytree(tiny_stores["mixtral"], tmp_path / "s")
    s = open_store(tmp_path / "s")
    for rec in s.index.experts:  # one flipped bit in every layer-0 expert's SM plane: any routing hits one
        if rec.layer == 0:
            with open(tmp_path / "s" / rec.file, "r+b") as f:
                f.seek(rec.offset + rec.tensors[0].raw.offset + 5)
                b = f.read(1)
                f.seek(rec.offset + rec.tensors[0].raw.offset + 5)
                f.write(bytes([b[0] ^ 4]))
    backend = _start(tmp_path / "s", calibrate=False)
    try:
        with pytest.raises(ChecksumError, match=r"layer 0, expert \d+, tensor"):
            backend.call("executor", "generate", GenerateRequest(BATCH1, 3))
        with pytest.raises(ChecksumError, match=r"layer 0, expert \d+, tensor"):
            list(backend.stream(GenerateRequest(BATCH1, 3)))
    finally:
        backend.close()
