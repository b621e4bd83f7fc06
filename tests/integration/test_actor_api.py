"""The public actor API: stages started by the caller and wired into engines (Ray, loopback)."""

from __future__ import annotations

import os

import pytest

from zipmoe_ray.actors import (
    Stages,
    start_decompressors,
    start_executor,
    start_loader,
    start_scheduler,
)
from zipmoe_ray.cache import SplitRule
from zipmoe_ray.cache.layout import expert_sizes
from zipmoe_ray.engine import ZipMoEEngine
from zipmoe_ray.stages.scheduler import SchedulerConfig
from zipmoe_ray.store import ReadOptions, open_store

from ..runtime_helpers import BATCH1, reference, start_ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = start_ray()
    yield ray
    ray.shutdown()


class _Plain:
    pass


def budget(store_dir, share: float) -> int:
    return int(sum(s.full for s in expert_sizes(open_store(store_dir)).values()) * share)


def test_user_started_stages_wired_into_an_engine(tiny_stores, tiny_models, ray_cluster):
    ray = ray_cluster
    store = str(tiny_stores["qwen2_moe"])
    b = budget(store, 0.2)
    loader = start_loader(store, ReadOptions(read_mode="drop"))
    decompressors = start_decompressors(store, 1)
    scheduler = start_scheduler(store, SchedulerConfig(budget=b), loader, decompressors)
    # Ray hides the node's GPUs from an actor that asks for none where RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1
    # (and did so by default before 2.50): provoke that, with a caller's own runtime_env to merge with ours
    hide = {"env_vars": {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1", "CUDA_VISIBLE_DEVICES": "0"}}
    executor = start_executor(store, scheduler, device="cpu", runtime_env=hide)
    stages = Stages(loader, decompressors, scheduler, executor)
    ref, _ = reference(tiny_models["qwen2_moe"], "qwen2_moe", BATCH1, 8)
    with ZipMoEEngine(store, memory_budget=b, backend="ray", stages=stages) as engine:
        assert engine.generate(BATCH1[0], 8).token_ids == ref[0]
        assert engine.stats()["lanes"]["workers"] == 1
    assert ray.get(executor.ping.remote())  # the engine does not kill stages it did not start
    visible = lambda self: os.environ.get("CUDA_VISIBLE_DEVICES")  # noqa: E731
    control = ray.remote(num_cpus=0)(_Plain).options(runtime_env=hide).remote()
    assert ray.get(control.__ray_call__.remote(visible)) == ""  # the hiding really happens here
    assert ray.get(executor.__ray_call__.remote(visible)) == "0"  # yet the executor still sees the GPU
    ray.kill(control)
    for a in stages.all():
        ray.kill(a, no_restart=True)


@pytest.mark.slow
def test_one_scheduler_shared_by_two_executors(tiny_stores, tiny_models, ray_cluster):
    """Host-memory forms live in the object store and are shared; full copies are per executor, so a shared
    scheduler runs without the FULL form (see README)."""
    ray = ray_cluster
    store = str(tiny_stores["mixtral"])
    b = budget(store, 0.3)
    loader = start_loader(store)
    decompressors = start_decompressors(store, 2)
    cfg = SchedulerConfig(budget=b, split=SplitRule(full=0.0, compressed=0.5, sm=0.5))
    scheduler = start_scheduler(store, cfg, loader, decompressors)
    executors = [start_executor(store, scheduler, device="cpu") for _ in range(2)]
    ref, _ = reference(tiny_models["mixtral"], "mixtral", BATCH1, 8)
    engines = [
        ZipMoEEngine(
            store, memory_budget=b, backend="ray", stages=Stages(loader, decompressors, scheduler, ex)
        )
        for ex in executors
    ]
    for e in engines:
        assert e.generate(BATCH1[0], 8).token_ids == ref[0]
    st = engines[1].stats()
    assert (
        st["hits"]["compressed"] + st["hits"]["sm"] > 0
    )  # the second executor found the first one's experts
    for e in engines:
        e.close()
    for a in [loader, *decompressors, scheduler, *executors]:
        ray.kill(a, no_restart=True)
