"""The end-to-end benchmark's baselines are what they claim to be: Accelerate really offloads the experts of
the layers beyond the budget, and its tokens are those of plain transformers (benchmarks/bench_e2e.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..bench_helpers import BENCH, benchmark_modules

pytest.importorskip(
    "accelerate", reason="the benchmark extras are not installed (scripts/install.sh --bench)"
)


@pytest.fixture(scope="module")
def bench():
    with benchmark_modules("bench_e2e") as (module,):
        yield module


def spec(model, tmp_path, system, frac):
    ids = [[3, 14, 15, 92, 65, 35, 89, 79], [7, 7, 2, 9, 100, 200, 300, 400]]
    return {
        "system": system,
        "model": str(model),
        "device": "cpu",
        "budget_frac": frac,
        "offload_dir": str(tmp_path / "offload"),
        "prompts": ids,
        "warm": ids[:1],
        "new_tokens": 6,
        "warm_tokens": 2,
        "cgroup": None,
    }


def test_device_map_offloads_whole_layers_of_experts(bench, tiny_models):
    dm, keep, n = bench._device_map(str(tiny_models["qwen2_moe"]), 0.5, "cpu")
    disk = sorted(k for k, v in dm.items() if v == "disk")
    assert n >= 2 and keep == n // 2
    assert disk == [f"model.layers.{i}.mlp.experts" for i in range(keep, n)]
    assert all(v == "cpu" for k, v in dm.items() if k not in disk)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_accelerate_disk_matches_transformers(bench, tiny_models, tmp_path, arch):
    floor = bench.run_hf(spec(tiny_models[arch], tmp_path, "transformers", 1.0))
    acc = bench.run_hf(spec(tiny_models[arch], tmp_path, "accelerate-disk", 0.25))
    assert acc["offloaded_layers"] >= 1 and acc["offloaded_bytes"] > 0
    assert acc["token_ids"] == floor["token_ids"]
    assert len(floor["token_ids"]) == 2 and all(floor["token_ids"])
    assert not (tmp_path / "offload").exists()  # the offload folder is removed after the run


def test_disk_of_names_a_whole_disk(bench):
    import storage

    st = BENCH.stat()
    if not (Path("/sys/dev/block") / f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}").exists():
        with pytest.raises(RuntimeError, match="not a block device"):  # overlay, tmpfs: said, not guessed
            storage.disk_of(BENCH)
        return
    dev = Path("/sys/dev/block") / storage.disk_of(BENCH)
    assert dev.exists() and not (dev / "partition").exists()
