"""Reading a store (store/reader.py, format.py): bit-exact experts, the extent layout, read modes, and every kind of damage detected before a weight is used."""

from __future__ import annotations

import glob
import shutil

import msgpack
import pytest
import torch
from safetensors.torch import load_file

from zipmoe_ray import open_store
from zipmoe_ray.errors import (
    ChecksumError,
    FormatVersionError,
    StoreCorruptError,
    StoreError,
)
from zipmoe_ray.store import ReadOptions
from zipmoe_ray.store.format import ALIGN, INDEX_NAME
from zipmoe_ray.store.verify import verify_store

from ..conftest import ARCHS


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


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a zipmoe store"):
        open_store(tmp_path / "empty")
