"""`zipmoe verify` and `zipmoe inspect` (store/verify.py, inspect.py): every checksum, every tensor bit for bit, the compression figures."""

from __future__ import annotations

import json
import shutil

import pytest

from zipmoe_ray.errors import (
    StoreMismatchError,
)
from zipmoe_ray.store.inspect import inspect_store
from zipmoe_ray.store.verify import verify_store

from ..conftest import ARCHS


@pytest.mark.parametrize("name", [*ARCHS, "qwen2_moe-fused", "mixtral-sharded"])
def test_verify_against_checkpoint(tiny_models, tiny_stores, name):
    report = verify_store(tiny_stores[name], tiny_models[name])
    assert report.ok, report.failures
    assert report.compared_tensors > report.tensors > 0


def test_inspect_reports_ratio_and_bound(tiny_stores):
    r = inspect_store(tiny_stores["qwen2_moe"])
    for key in ("expert_bytes_original", "expert_bytes_stored", "ratio", "bound_ratio"):
        assert key in r
    assert r["expert_bytes_original"] == 3 * 16 * 3 * 64 * 128 * 2
    assert r["ratio"] == pytest.approx(r["expert_bytes_stored"] / r["expert_bytes_original"])
    assert r["bound_ratio"] < r["ratio"] < r["bound_ratio"] + 0.015
    assert [t["role"] for t in r["tensors"][:3]] == ["gate", "up", "down"]
    json.dumps(r)


def copy_store(src, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    return dst


def flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def test_verify_against_the_wrong_checkpoint(tiny_stores, tmp_path):
    from zipmoe_ray.models.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "qwen2_moe", seed=1)
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        verify_store(tiny_stores["qwen2_moe"], other)


def test_altered_dense_file_is_caught(tiny_stores, tmp_path):
    s = copy_store(tiny_stores["qwen2_moe"], tmp_path)
    flip(s / "model.zipmoe-dense.safetensors", 5000)
    report = verify_store(s)
    assert any("model.zipmoe-dense.safetensors" in f for f in report.failures)
