"""Writing a store (store/writer.py, extents.py, dense.py, journal.py, durable.py): a complete model, bad checkpoints refused before anything is written, resume after an interruption, a full disk, options."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from zipmoe_ray import open_store
from zipmoe_ray.errors import (
    ArchitectureError,
    CheckpointError,
    DTypeError,
    StoreError,
)
from zipmoe_ray.store import CompressOptions, compress
from zipmoe_ray.store.format import INDEX_NAME, PARTIAL_DIR
from zipmoe_ray.store.verify import verify_store


def test_store_is_a_complete_model(tiny_models, tiny_stores):
    s = tiny_stores["qwen2_moe"]
    for f in ("config.json", "tokenizer.json", "generation_config.json", "model.zipmoe-dense.safetensors"):
        assert (s / f).is_file(), f
    dense = load_file(str(s / "model.zipmoe-dense.safetensors"))
    assert not any(".experts." in k for k in dense)
    assert any("shared_expert" in k for k in dense)  # shared experts are dense weights
    assert not (s / PARTIAL_DIR).exists()


def test_missing_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        compress(tmp_path / "nope", tmp_path / "s")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="config.json"):
        compress(tmp_path / "m", tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_pytorch_bin_only(tiny_models, tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    shutil.copy(tiny_models["qwen2_moe"] / "config.json", m)
    (m / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="convert it to safetensors"):
        compress(m, tmp_path / "s")


def test_unsupported_architecture(tiny_models, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(tiny_models["qwen2_moe"], m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "llama"
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArchitectureError, match="'llama' is not supported.*qwen2_moe"):
        compress(m, tmp_path / "s")


def test_integer_experts_are_refused(tiny_models, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(tiny_models["olmoe"], m)
    sd = load_file(str(m / "model.safetensors"))
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    sd[name] = sd[name].to(torch.int8)
    save_file(sd, str(m / "model.safetensors"))
    with pytest.raises(DTypeError, match=r"experts\.3\.up_proj.*int8|I8"):
        compress(m, tmp_path / "s")
    assert not (tmp_path / "s" / INDEX_NAME).exists()


def test_incomplete_checkpoint(tiny_models, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(tiny_models["olmoe"], m)
    sd = load_file(str(m / "model.safetensors"))
    for k in [k for k in sd if ".experts.7." in k and "layers.1." in k]:
        del sd[k]
    save_file(sd, str(m / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layer 1 has experts.*incomplete"):
        compress(m, tmp_path / "s")


def test_existing_store_needs_overwrite(tiny_models, tmp_path):
    first = compress(tiny_models["mixtral"], tmp_path / "s")
    # the same command again finds the very store it would make: nothing to do (a rerun always succeeds)
    assert compress(tiny_models["mixtral"], tmp_path / "s").store_id == first.store_id
    with pytest.raises(StoreError, match="another checkpoint.*--overwrite"):
        compress(tiny_models["qwen3_moe"], tmp_path / "s")
    with pytest.raises(StoreError, match="other settings.*--overwrite"):
        compress(tiny_models["mixtral"], tmp_path / "s", CompressOptions(shards=2))
    compress(tiny_models["qwen3_moe"], tmp_path / "s", CompressOptions(overwrite=True))
    assert open_store(tmp_path / "s").model_type == "qwen3_moe"


def test_refuses_a_foreign_non_empty_directory(tiny_models, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="not empty"):
        compress(tiny_models["mixtral"], tmp_path / "s")
    assert (tmp_path / "s" / "thesis.tex").read_text() == "precious"


class Boom(Exception):
    pass


def test_interrupted_compress_resumes(tiny_models, tmp_path, monkeypatch):
    import zipmoe_ray.store.writer as writer

    real = writer.write_layer
    calls = []

    def failing(store, ckpt, layer, *a, **kw):
        calls.append(layer)
        if layer == 1:
            raise Boom("power cut")
        return real(store, ckpt, layer, *a, **kw)

    monkeypatch.setattr(writer, "write_layer", failing)
    with pytest.raises(Boom):
        compress(tiny_models["qwen2_moe"], tmp_path / "s")
    s = tmp_path / "s"
    assert not (s / INDEX_NAME).exists()
    with pytest.raises(StoreError, match="interrupted"):
        open_store(s)
    first = (s / "experts" / "layer-0000.zmx").stat()
    assert not list((s / "experts").glob("*.tmp"))

    monkeypatch.setattr(writer, "write_layer", lambda *a, **kw: (calls.append(a[2]), real(*a, **kw))[1])
    calls.clear()
    compress(tiny_models["qwen2_moe"], s)
    assert calls == [1, 2]  # layer 0 was not redone
    assert (s / "experts" / "layer-0000.zmx").stat().st_ino == first.st_ino
    assert verify_store(s, tiny_models["qwen2_moe"]).ok


def test_interrupted_compress_restarts_with_other_settings(tiny_models, tmp_path, monkeypatch):
    import zipmoe_ray.store.writer as writer

    real = writer.write_layer

    def failing(store, ckpt, layer, *a, **kw):
        if layer == 1:
            raise Boom("killed")
        return real(store, ckpt, layer, *a, **kw)

    monkeypatch.setattr(writer, "write_layer", failing)
    with pytest.raises(Boom):
        compress(tiny_models["qwen2_moe"], tmp_path / "s")
    monkeypatch.setattr(writer, "write_layer", real)
    compress(tiny_models["qwen2_moe"], tmp_path / "s", CompressOptions(shards=2, level=3))
    store = open_store(tmp_path / "s")
    assert store.level == 3
    assert verify_store(tmp_path / "s", tiny_models["qwen2_moe"]).ok


def test_full_disk_leaves_no_complete_store(tiny_models, tmp_path, monkeypatch):
    import zipmoe_ray.store.extents as extents

    real = extents._write_extent
    n = {"calls": 0}

    def full(f, *a, **kw):
        n["calls"] += 1
        if n["calls"] == 11:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, *a, **kw)

    monkeypatch.setattr(extents, "_write_extent", full)
    with pytest.raises(StoreError, match="no space left.*resumes"):
        compress(tiny_models["qwen2_moe"], tmp_path / "s")
    assert not (tmp_path / "s" / INDEX_NAME).exists()
    assert not list((tmp_path / "s" / "experts").glob("*.tmp"))
    monkeypatch.setattr(extents, "_write_extent", real)
    compress(tiny_models["qwen2_moe"], tmp_path / "s")
    assert verify_store(tmp_path / "s", tiny_models["qwen2_moe"]).ok


@pytest.mark.parametrize(
    "opts", [CompressOptions(shards=1), CompressOptions(shards=5, workers=1), CompressOptions(level=1)]
)
def test_compress_options(tiny_models, tmp_path, opts):
    compress(tiny_models["deepseek_v2"], tmp_path / "s", opts)
    store = open_store(tmp_path / "s")
    assert all(len(t.shards) == (opts.shards or 1) for r in store.index.experts for t in r.tensors)
    assert verify_store(tmp_path / "s", tiny_models["deepseek_v2"]).ok


def test_lz4_store(tiny_models, tmp_path):
    pytest.importorskip("lz4")
    compress(tiny_models["qwen3_moe"], tmp_path / "s", CompressOptions(codec="lz4"))
    assert open_store(tmp_path / "s").codec == "lz4"
    assert verify_store(tmp_path / "s", tiny_models["qwen3_moe"]).ok
