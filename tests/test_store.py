"""store: compress / open_store / verify / inspect, bit-exact against the checkpoint, and every bad input."""

from __future__ import annotations

import errno
import glob
import json
import shutil

import msgpack
import pytest
import torch
from safetensors.torch import load_file, save_file

from zipmoe_ray import open_store
from zipmoe_ray.errors import (
    ArchitectureError,
    CheckpointError,
    ChecksumError,
    DTypeError,
    FormatVersionError,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
)
from zipmoe_ray.store import CompressOptions, ReadOptions, compress
from zipmoe_ray.store.format import ALIGN, INDEX_NAME, PARTIAL_DIR
from zipmoe_ray.store.inspect import inspect_store
from zipmoe_ray.store.verify import verify_store

from .conftest import ARCHS


def checkpoint_tensors(model_dir) -> dict[str, torch.Tensor]:
    ref = {}
    for f in glob.glob(f"{model_dir}/*.safetensors"):
        ref.update(load_file(f))
    return ref


def reference_for(ref, name: str) -> torch.Tensor:
    if "[" in name:
        base, idx = name.split("[")
        return ref[base][int(idx.rstrip("]"))]
    return ref[name]


@pytest.mark.parametrize("name", [*ARCHS, "qwen2_moe-fused", "mixtral-sharded"])
def test_read_expert_is_bit_exact(tiny_models, tiny_stores, name):
    ref = checkpoint_tensors(tiny_models[name])
    store = open_store(tiny_stores[name])
    n = 0
    for layer, expert in store.experts():
        for tname, t in store.read_expert(layer, expert).items():
            r = reference_for(ref, tname)
            assert r.dtype == t.dtype and r.shape == t.shape
            assert torch.equal(r.view(torch.int16), t.view(torch.int16)), tname
            n += 1
    expected = sum(1 for k in ref if ".experts." in k and ".shared" not in k)
    if name.endswith("fused"):
        expected = expected * store.num_experts
    assert n == expected > 0


def test_expert_tensors_are_one_contiguous_buffer_in_gate_up_down_order(tiny_stores):
    store = open_store(tiny_stores["qwen2_moe"])
    tensors = list(store.read_expert(0, 3).values())
    assert [t.shape for t in tensors] == [(64, 128), (64, 128), (128, 64)]
    base = tensors[0].data_ptr()
    assert tensors[1].data_ptr() == base + tensors[0].numel() * 2  # gate then up: a free gate_up view
    assert tensors[2].data_ptr() == tensors[1].data_ptr() + tensors[1].numel() * 2


@pytest.mark.parametrize("name", [*ARCHS, "qwen2_moe-fused", "mixtral-sharded"])
def test_verify_against_checkpoint(tiny_models, tiny_stores, name):
    report = verify_store(tiny_stores[name], tiny_models[name])
    assert report.ok, report.failures
    assert report.compared_tensors > report.tensors > 0


def test_store_is_a_complete_model(tiny_models, tiny_stores):
    s = tiny_stores["qwen2_moe"]
    for f in ("config.json", "tokenizer.json", "generation_config.json", "model.zipmoe-dense.safetensors"):
        assert (s / f).is_file(), f
    dense = load_file(str(s / "model.zipmoe-dense.safetensors"))
    assert not any(".experts." in k for k in dense)
    assert any("shared_expert" in k for k in dense)  # shared experts are dense weights
    assert not (s / PARTIAL_DIR).exists()


def test_extents_are_aligned_and_exp_region_first(tiny_stores):
    store = open_store(tiny_stores["olmoe"])
    for rec in store.index.experts:
        assert rec.offset % ALIGN == 0
        assert all(s.offset < rec.e_length for t in rec.tensors for s in t.shards)
        assert all(t.raw.offset >= rec.e_length for t in rec.tensors)
    # the E region and the SM region can be read and checked on their own (the SM-only cache form)
    layer, expert = store.experts()[5]
    exp = store.read_extent(layer, expert, "exp")
    raw = store.read_extent(layer, expert, "raw")
    store.verify_part(layer, expert, "exp", exp)
    store.verify_part(layer, expert, "raw", raw)
    joined = store.join_parts(layer, expert, exp, raw)
    a = store.decode_extent(layer, expert, joined)
    b = store.read_expert(layer, expert)
    assert all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


@pytest.mark.parametrize("cache", ["page-cache", "drop", "bypass"])
def test_read_modes_return_identical_bytes(tiny_stores, cache):
    plain = open_store(tiny_stores["qwen3_moe"])
    other = open_store(tiny_stores["qwen3_moe"], read_options=ReadOptions(read_mode=cache, bandwidth=1e9))
    for key in plain.experts()[:4]:
        for part in ("all", "exp", "raw"):
            assert bytes(plain.read_extent(*key, part)) == bytes(other.read_extent(*key, part))
    assert other.reader.stats.snapshot()["bytes"] > 0
    assert other.reader.mode_in_use in ("page-cache", "direct", "drop")


def test_store_pickles_and_reopens(tiny_stores):
    import pickle

    store = open_store(tiny_stores["mixtral"], read_options=ReadOptions(read_mode="drop"))
    clone = pickle.loads(pickle.dumps(store))
    assert clone.experts() == store.experts() and clone.read_options == store.read_options
    a, b = store.read_expert(1, 2), clone.read_expert(1, 2)
    assert all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def test_inspect_reports_ratio_and_bound(tiny_stores):
    r = inspect_store(tiny_stores["qwen2_moe"])
    for key in ("expert_bytes_original", "expert_bytes_stored", "ratio", "bound_ratio"):
        assert key in r
    assert r["expert_bytes_original"] == 3 * 16 * 3 * 64 * 128 * 2
    assert r["ratio"] == pytest.approx(r["expert_bytes_stored"] / r["expert_bytes_original"])
    assert r["bound_ratio"] < r["ratio"] < r["bound_ratio"] + 0.015
    assert [t["role"] for t in r["tensors"][:3]] == ["gate", "up", "down"]
    json.dumps(r)


# --- corruption ---------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("where", ["shard", "raw"])
def test_flipped_byte_is_caught_and_named(tiny_stores, tmp_path, where):
    s = copy_store(tiny_stores["qwen2_moe"], tmp_path)
    store = open_store(s)
    rec = store.record(1, 5)
    t = rec.tensors[1]
    chunk = t.shards[0] if where == "shard" else t.raw
    flip(s / rec.file, rec.offset + chunk.offset + chunk.length // 2)
    with pytest.raises(
        ChecksumError, match=r"layer 1, expert 5, tensor model\.layers\.1\.mlp\.experts\.5\.up_proj"
    ):
        open_store(s).read_expert(1, 5)
    report = verify_store(s)
    assert not report.ok
    assert any("layer 1, expert 5" in f and "up_proj" in f for f in report.failures)
    assert open_store(s).read_expert(1, 4)  # other experts are unaffected


def test_flipped_padding_is_caught(tiny_stores, tmp_path):
    s = copy_store(tiny_stores["qwen2_moe"], tmp_path)
    rec = open_store(s).record(0, 0)
    assert rec.padded_length > rec.length
    flip(s / rec.file, rec.offset + rec.length + 1)
    report = verify_store(s)
    assert any("padding" in f and "layer 0, expert 0" in f for f in report.failures)


def test_truncated_data_file_is_detected_at_open(tiny_stores, tmp_path):
    s = copy_store(tiny_stores["qwen2_moe"], tmp_path)
    data = s / "experts" / "layer-0001.zmx"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(StoreCorruptError, match=r"truncated.*layer 1, expert \d+ and the experts after it"):
        open_store(s)


def test_missing_data_file(tiny_stores, tmp_path):
    s = copy_store(tiny_stores["qwen2_moe"], tmp_path)
    (s / "experts" / "layer-0000.zmx").unlink()
    with pytest.raises(StoreCorruptError, match="missing"):
        open_store(s)


def test_data_file_from_another_store_is_refused(tiny_stores, tmp_path):
    s = copy_store(tiny_stores["qwen2_moe"], tmp_path)
    other = tiny_stores["qwen3_moe"] / "experts" / "layer-0000.zmx"
    shutil.copyfile(other, s / "experts" / "layer-0000.zmx")
    with pytest.raises(StoreCorruptError, match="another store"):
        open_store(s)


def test_damaged_index(tiny_stores, tmp_path):
    s = copy_store(tiny_stores["qwen2_moe"], tmp_path)
    raw = (s / INDEX_NAME).read_bytes()
    (s / INDEX_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StoreCorruptError, match="index"):
        open_store(s)
    outer = msgpack.unpackb(raw)
    outer["body"] = outer["body"][:-1] + bytes([outer["body"][-1] ^ 1])
    (s / INDEX_NAME).write_bytes(msgpack.packb(outer))
    with pytest.raises(StoreCorruptError, match="checksum"):
        open_store(s)


@pytest.mark.parametrize("version, match", [(2, "newer"), (0, "re-create")])
def test_other_format_version(tiny_stores, tmp_path, version, match):
    s = copy_store(tiny_stores["qwen2_moe"], tmp_path)
    outer = msgpack.unpackb((s / INDEX_NAME).read_bytes())
    outer["format_version"] = version
    (s / INDEX_NAME).write_bytes(msgpack.packb(outer))
    with pytest.raises(FormatVersionError, match=match):
        open_store(s)


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


# --- bad input -----------------------------------------------------------------------------------------


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
    compress(tiny_models["mixtral"], tmp_path / "s")
    with pytest.raises(StoreError, match="--overwrite"):
        compress(tiny_models["mixtral"], tmp_path / "s")
    compress(tiny_models["qwen3_moe"], tmp_path / "s", CompressOptions(overwrite=True))
    assert open_store(tmp_path / "s").model_type == "qwen3_moe"


def test_refuses_a_foreign_non_empty_directory(tiny_models, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="not empty"):
        compress(tiny_models["mixtral"], tmp_path / "s")
    assert (tmp_path / "s" / "thesis.tex").read_text() == "precious"


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a zipmoe store"):
        open_store(tmp_path / "empty")


# --- interruption, resume, full disk ---------------------------------------------------------------------


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
