"""Shared fixtures (tiny seeded checkpoints and their stores, built once per test session) and the tiers.

    tests/unit/         plain classes, no Ray (seconds each)
    tests/integration/  a real Ray on loopback with fixed num_cpus, the CLI, the benchmarks' baselines
    tests/cluster/      several Ray nodes in network namespaces (root; skipped otherwise)

Each test is marked with its tier (``-m unit``, ``-m "not cluster"``, ...); ``slow`` marks the long ones
(``-m "not slow"`` for a quick loop) and ``gpu`` those that need CUDA (skipped without it).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from zipmoe_ray.models.registry import supported_architectures

ARCHS = supported_architectures()
TIERS = ("unit", "integration", "cluster")


def pytest_collection_modifyitems(config, items):
    gpu = None
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
        if item.get_closest_marker("gpu"):
            if gpu is None:
                import torch

                gpu = torch.cuda.is_available()
            if not gpu:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint per supported architecture (seed 0), plus fused and sharded variants."""
    from zipmoe_ray.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    out = {arch: build_tiny_model(root / arch, arch, seed=0) for arch in ARCHS}
    out["qwen2_moe-fused"] = build_tiny_model(root / "qwen2_moe-fused", "qwen2_moe", seed=0, fused=True)
    out["mixtral-sharded"] = build_tiny_model(
        root / "mixtral-sharded", "mixtral", seed=0, max_shard_size="100KB"
    )
    return out


@pytest.fixture(scope="session")
def tiny_stores(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A store for every tiny checkpoint, default settings. Tests must not modify these: copy first."""
    from zipmoe_ray.store import compress

    root = tmp_path_factory.mktemp("stores")
    out = {}
    for name, model in tiny_models.items():
        compress(model, root / name)
        out[name] = root / name
    return out
