"""A store's life cycle (store/lifecycle.py, writer.py): one writer at a time, --overwrite never loses the
old store, every interrupted or failed compression is resumed or restarted by the same command, and a
resume re-checks what it keeps and says so; input that cannot be served is refused before writing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zipmoe_ray import open_store
from zipmoe_ray.errors import CheckpointError, DTypeError, StoreError
from zipmoe_ray.store import CompressOptions, compress
from zipmoe_ray.store.format import INDEX_NAME, PARTIAL_DIR
from zipmoe_ray.store.lifecycle import StoreLock, finish_swap, staging_dir
from zipmoe_ray.store.verify import verify_store


class Boom(Exception):
    pass


class Notes:
    def __init__(self):
        self.lines: list[str] = []

    def start(self, total_bytes, total_tensors):
        pass

    def advance(self, nbytes, ntensors):
        pass

    def note(self, message):
        self.lines.append(message)


def _fail_at_layer(monkeypatch, layer: int):
    import zipmoe_ray.store.writer as writer

    real = writer.write_layer

    def failing(store, ckpt, lay, *a, **kw):
        if lay == layer:
            raise Boom("killed")
        return real(store, ckpt, lay, *a, **kw)

    monkeypatch.setattr(writer, "write_layer", failing)
    return real


def test_a_second_writer_is_refused_naming_the_holder(tiny_models, tmp_path):
    s = tmp_path / "s"
    with StoreLock(s) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())
        with pytest.raises(StoreError, match=rf"another `zipmoe compress` \(pid {os.getpid()}\) is writing"):
            compress(tiny_models["qwen2_moe"], s)
    assert not lock.path.exists()
    compress(tiny_models["qwen2_moe"], s)  # released: the next one runs


def test_overwrite_keeps_the_old_store_until_the_new_one_is_complete(tiny_models, tmp_path, monkeypatch):
    s = tmp_path / "s"
    old = compress(tiny_models["mixtral"], s)
    (s / "my-notes.txt").write_text("mine")
    real = _fail_at_layer(monkeypatch, 1)
    with pytest.raises(Boom):
        compress(tiny_models["qwen3_moe"], s, CompressOptions(overwrite=True))
    assert open_store(s).index.store_id == old.store_id  # the old store, whole and servable
    assert verify_store(s, tiny_models["mixtral"]).ok
    assert staging_dir(s).exists()
    monkeypatch.setattr("zipmoe_ray.store.writer.write_layer", real)
    notes = Notes()
    compress(tiny_models["qwen3_moe"], s, CompressOptions(overwrite=True), progress=notes)
    assert open_store(s).model_type == "qwen3_moe" and verify_store(s, tiny_models["qwen3_moe"]).ok
    assert (s / "my-notes.txt").read_text() == "mine"  # the user's files travel to the new store
    assert not staging_dir(s).exists() and not list(tmp_path.glob(".s.zipmoe-*"))
    assert any("kept 1 of" in n for n in notes.lines), notes.lines  # resumed in the staging directory


@pytest.mark.parametrize("stage", ["before the renames", "between the renames", "after the renames"])
def test_a_swap_cut_short_is_finished_by_the_next_run(tiny_models, tmp_path, stage):
    s = tmp_path / "s"
    compress(tiny_models["mixtral"], s)
    new = staging_dir(s)
    compress(tiny_models["qwen3_moe"], new)  # a complete new store beside the old one
    old = s.parent / ".s.zipmoe-old"
    if stage != "before the renames":
        os.rename(s, old)
    if stage == "after the renames":
        os.rename(new, s)
    compress(tiny_models["qwen3_moe"], s, CompressOptions(overwrite=True))
    assert open_store(s).model_type == "qwen3_moe" and verify_store(s, tiny_models["qwen3_moe"]).ok
    assert not old.exists() and not new.exists()


def test_finish_swap_restores_the_old_store_when_the_new_one_is_incomplete(tiny_models, tmp_path):
    s = tmp_path / "s"
    index = compress(tiny_models["mixtral"], s)
    os.rename(s, s.parent / ".s.zipmoe-old")
    staging_dir(s).mkdir()
    finish_swap(s, lambda m: None)
    assert open_store(s).index.store_id == index.store_id


def test_resume_rechecks_finished_layers_and_says_what_it_kept(tiny_models, tmp_path, monkeypatch):
    s = tmp_path / "s"
    real = _fail_at_layer(monkeypatch, 2)
    with pytest.raises(Boom):
        compress(tiny_models["qwen2_moe"], s)
    with open(s / "experts" / "layer-0001.zmx", "r+b") as f:  # damage a finished layer: same size
        f.seek(9000)
        b = f.read(1)
        f.seek(9000)
        f.write(bytes([b[0] ^ 0x10]))
    monkeypatch.setattr("zipmoe_ray.store.writer.write_layer", real)
    notes = Notes()
    compress(tiny_models["qwen2_moe"], s, progress=notes)
    assert any("kept 1 of 3 finished layers" in n and "layer 1 (" in n for n in notes.lines), notes.lines
    assert verify_store(s, tiny_models["qwen2_moe"]).ok  # the damage was not carried into the store


def test_rerunning_a_finished_command_is_a_no_op(tiny_models, tmp_path):
    s = tmp_path / "s"
    first = compress(tiny_models["qwen2_moe"], s)
    (s / PARTIAL_DIR).mkdir()  # killed while removing its journal
    notes = Notes()
    assert compress(tiny_models["qwen2_moe"], s, progress=notes).store_id == first.store_id
    assert "nothing to do" in notes.lines[-1] and not (s / PARTIAL_DIR).exists()


def test_a_directory_holding_only_a_begun_journal_starts_over(tiny_models, tmp_path):
    s = tmp_path / "s"
    (s / PARTIAL_DIR).mkdir(parents=True)
    (s / PARTIAL_DIR / "manifest.msgpack.tmp").write_bytes(b"\x00")  # killed while writing the manifest
    compress(tiny_models["qwen2_moe"], s)
    assert verify_store(s, tiny_models["qwen2_moe"]).ok


def test_a_damaged_store_needs_overwrite_and_then_is_replaced(tiny_models, tmp_path):
    s = tmp_path / "s"
    compress(tiny_models["qwen2_moe"], s)
    (s / INDEX_NAME).write_bytes(b"garbage")
    with pytest.raises(StoreError, match="damaged store; pass --overwrite"):
        compress(tiny_models["qwen2_moe"], s)
    compress(tiny_models["qwen2_moe"], s, CompressOptions(overwrite=True))
    assert verify_store(s, tiny_models["qwen2_moe"]).ok


def _copy_model(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    shutil.copytree(src, dst)
    return load_file(str(dst / "model.safetensors"))


def test_a_truncated_checkpoint_is_refused_before_anything_is_written(tiny_models, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(tiny_models["qwen2_moe"], m)
    f = m / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match="truncated"):
        compress(m, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_integer_non_expert_weights_are_refused(tiny_models, tmp_path):
    m = tmp_path / "m"
    sd = _copy_model(tiny_models["qwen2_moe"], m)
    name = next(k for k in sd if "q_proj.weight" in k)
    sd[name] = sd[name].to(torch.int8)
    save_file(sd, str(m / "model.safetensors"))
    with pytest.raises(DTypeError, match=f"non-expert weight {name} has dtype I8"):
        compress(m, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_mixed_dtype_experts_are_refused(tiny_models, tmp_path):
    m = tmp_path / "m"
    sd = _copy_model(tiny_models["qwen2_moe"], m)
    name = next(k for k in sd if ".experts.3.up_proj" in k)
    sd[name] = sd[name].to(torch.float32)
    save_file(sd, str(m / "model.safetensors"))
    with pytest.raises(DTypeError, match="mix dtypes BF16, F32"):
        compress(m, tmp_path / "s")
