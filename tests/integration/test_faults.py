"""Faults and bad input in the runtime: a killed decompressor, a damaged chunk at run time, a budget too
small, and a close that releases every actor and all object-store memory."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from zipmoe_ray.engine import ZipMoEEngine
from zipmoe_ray.errors import BudgetError, ChecksumError
from zipmoe_ray.store import open_store

from ..runtime_helpers import BATCH1, reference, start_ray


@pytest.fixture(scope="module")
def ray_cluster():
    # tiny experts are smaller than Ray's inline-object threshold: send them through plasma like real ones
    ray = start_ray(max_direct_call_object_size=1024)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_killed_decompressor_restarts_and_tokens_are_identical(tiny_stores, tiny_models, ray_cluster):
    ray = ray_cluster
    n = 24
    ref_ids, _ = reference(tiny_models["qwen2_moe"], "qwen2_moe", BATCH1, n)
    # a slow emulated SSD keeps the generation running long enough to kill a decompressor in the middle
    with ZipMoEEngine(
        tiny_stores["qwen2_moe"],
        memory_budget="10%",
        backend="ray",
        lanes="actors",  # restartable lane actors (lanes in the executor live and die with it)
        num_decompressors=2,
        bandwidth=1.5e6,
    ) as engine:
        victim = engine._backend.decompressors[0]
        before = ray.get(victim.stats.remote())["uptime_s"]
        box = {}
        th = threading.Thread(target=lambda: box.setdefault("out", engine.generate(BATCH1[0], n)))
        t0 = time.monotonic()
        th.start()
        time.sleep(1.0)
        ray.kill(victim, no_restart=False)
        th.join(timeout=300)
        elapsed = time.monotonic() - t0
        assert box["out"].token_ids == ref_ids[0]
        after = ray.get(victim.stats.remote())["uptime_s"]  # the same handle reaches the restarted actor
        assert after < elapsed < before + elapsed + 60  # a new process: its uptime began after the kill
        assert elapsed > 1.0, "the generation finished before the kill; slow the emulated SSD further"


def _damage_layer(store_dir, layer: int) -> None:
    store = open_store(store_dir)
    for rec in store.index.experts:
        if rec.layer != layer:
            continue
        raw = rec.tensors[0].raw
        with open(store_dir / rec.file, "r+b") as f:
            f.seek(rec.offset + raw.offset + 7)
            b = f.read(1)
            f.seek(rec.offset + raw.offset + 7)
            f.write(bytes([b[0] ^ 1]))


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_damaged_chunk_fails_the_request_naming_the_expert(tiny_stores, tmp_path, backend, ray_cluster):
    s = tmp_path / "store"
    shutil.copytree(tiny_stores["olmoe"], s)
    _damage_layer(s, 1)
    with (
        ZipMoEEngine(s, memory_budget="10%", backend=backend, num_decompressors=2, calibrate=False) as engine,
        pytest.raises(
            ChecksumError, match=r"layer 1, expert \d+, tensor model\.layers\.1\.mlp\.experts\.\d+\.gate_proj"
        ),
    ):
        engine.generate(BATCH1[0], 4)


def test_budget_too_small_is_refused_at_start_with_the_minimum(tiny_stores):
    with pytest.raises(BudgetError, match=r"too small.*give at least --memory-budget \d+"):
        ZipMoEEngine(tiny_stores["mixtral"], memory_budget="2%", backend="local")
    with pytest.raises(BudgetError, match="is not a size"):
        ZipMoEEngine(tiny_stores["mixtral"], memory_budget="plenty", backend="local")


@pytest.mark.parametrize("lanes", ["actors", "executor"])
def test_close_releases_actors_and_object_store_memory(tiny_stores, ray_cluster, lanes):
    ray = ray_cluster
    from zipmoe_ray.actors import object_store_usage

    deadline = time.monotonic() + 30  # let objects of earlier tests drain first
    while object_store_usage()["objects"] > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    base = object_store_usage()
    engine = ZipMoEEngine(
        tiny_stores["qwen3_moe"], memory_budget="30%", backend="ray", num_decompressors=2, lanes=lanes
    )
    engine.generate(BATCH1[0], 6)
    actors = list(engine._backend._stages())
    if lanes == "actors":  # the lanes' results (the cache's planes) live in the object store
        during = object_store_usage()
        deadline = time.monotonic() + 10  # the raylet's object statistics lag a little
        while during["objects"] <= base["objects"] and time.monotonic() < deadline:
            time.sleep(0.5)
            during = object_store_usage()
        assert during["objects"] > base["objects"]
    else:  # executor lanes: the cache lives in the executor's process, held while the scheduler names it
        assert engine._backend.colocated
        assert ray.get(engine._backend.executor.held_results.remote(), timeout=30)
    engine.close()
    for a in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(a.ping.remote(), timeout=30)
    deadline = time.monotonic() + 20
    while (
        object_store_usage()["objects"] > base["objects"] and time.monotonic() < deadline
    ):  # earlier tests may free more
        time.sleep(0.5)
    assert object_store_usage()["objects"] <= base["objects"], (base, during, object_store_usage())
    with pytest.raises(Exception, match="closed"):
        engine.generate(BATCH1[0], 2)
