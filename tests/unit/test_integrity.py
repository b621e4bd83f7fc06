"""Every file a store serves from is covered by its index and checked before use (store/files.py, dense.py):
the non-expert weights tensor by tensor, config and tokenizer files whole, data file headers including
their padding; a file the model would read but the index does not cover is refused."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import msgpack
import pytest

from zipmoe_ray import open_store
from zipmoe_ray.errors import ChecksumError, StoreCorruptError
from zipmoe_ray.store.format import INDEX_NAME
from zipmoe_ray.store.verify import verify_store

from ..damage_helpers import flip

DENSE = "model.zipmoe-dense.safetensors"


@pytest.fixture
def store(tiny_stores, tmp_path) -> Path:
    s = tmp_path / "store"
    shutil.copytree(tiny_stores["qwen2_moe"], s)
    return s


def _tensor_at(path: Path, offset: int) -> str:
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8 : 8 + n])
    for name, meta in header.items():
        if name != "__metadata__":
            a, b = meta["data_offsets"]
            if 8 + n + a <= offset < 8 + n + b:
                return name
    raise AssertionError("offset is in no tensor")


def test_index_covers_every_byte_of_the_dense_file(store):
    rec = open_store(store).index.dense["files"][0]
    size = (store / DENSE).stat().st_size
    spans = sorted((off, n) for off, n, _ in rec["tensors"].values())
    assert spans[0][0] == rec["data_start"] and sum(n for _, n in spans) == size - rec["data_start"]


@pytest.mark.parametrize("where", ["first tensor", "last tensor", "middle", "header"])
def test_damaged_dense_weights_are_refused_naming_file_and_tensor(store, where):
    p = store / DENSE
    start = open_store(store).index.dense["files"][0]["data_start"]
    size = p.stat().st_size
    offset = {"first tensor": start, "last tensor": size - 1, "middle": (start + size) // 2, "header": 20}[
        where
    ]
    flip(p, offset)
    s = open_store(store)  # small files are fine: opening still works
    if where == "header":
        with pytest.raises(ChecksumError, match=f"{DENSE}: the safetensors header"):
            s.check_dense()
    else:
        with pytest.raises(
            ChecksumError, match=rf"{DENSE}, tensor {_tensor_at(p, offset)}: fails its checksum"
        ):
            s.check_dense()
    report = verify_store(store)
    assert not report.ok and any(DENSE in f for f in report.failures)


def test_the_executor_never_loads_damaged_dense_weights(store):
    from zipmoe_ray.stages.model_loader import load_model

    flip(store / DENSE, (store / DENSE).stat().st_size - 4096)
    with pytest.raises(ChecksumError, match="tensor model"):
        load_model(open_store(store), source=None)


@pytest.mark.parametrize(
    "name", ["config.json", "tokenizer.json", "generation_config.json", "chat_template.jinja"]
)
def test_damaged_small_files_are_refused_at_open(store, name):
    p = store / name
    flip(p, p.stat().st_size // 2, 0x01)
    with pytest.raises(ChecksumError, match=f"{name}: fails its checksum|copy of {name}"):
        open_store(store)
    report = verify_store(store)  # verify still opens it, and reports the file
    assert any(name in f for f in report.failures)


def test_an_edited_config_is_refused(store):
    cfg = json.loads((store / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (store / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChecksumError, match="config.json"):
        open_store(store)


@pytest.mark.parametrize("offset", [0, 9, 13, 30, 2000, 4095])
def test_data_file_header_damage_is_refused_at_open(store, offset):
    flip(store / "experts" / "layer-0001.zmx", offset, 0x01)
    with pytest.raises(StoreCorruptError, match="layer-0001.zmx"):
        open_store(store)


def test_a_file_the_tokenizer_would_read_that_the_index_does_not_cover_is_refused(store):
    (store / "added_tokens.json").write_text('{"<evil>": 3}')
    with pytest.raises(StoreCorruptError, match="added_tokens.json: not part of this store"):
        open_store(store)
    (store / "added_tokens.json").unlink()
    (store / "notes.md").write_text("mine")  # files transformers never reads are the user's business
    open_store(store)


def test_a_store_without_per_tensor_checksums_is_checked_whole(store):
    """Stores written before the per-tensor records (same format version): the file CRC is checked."""
    outer = msgpack.unpackb((store / INDEX_NAME).read_bytes(), raw=False)
    body = msgpack.unpackb(outer["body"], raw=False)
    for f in body["dense"]["files"]:
        for k in ("tensors", "data_start", "header_crc32"):
            f.pop(k)
    outer["body"] = msgpack.packb(body, use_bin_type=True)
    outer["body_crc32"] = zlib.crc32(outer["body"])
    (store / INDEX_NAME).write_bytes(msgpack.packb(outer, use_bin_type=True))
    open_store(store).check_dense()  # intact: accepted
    flip(store / DENSE, (store / DENSE).stat().st_size // 2)
    with pytest.raises(ChecksumError, match=f"dense weights {DENSE}: fail their checksum"):
        open_store(store).check_dense()


def test_sharded_dense_weights_cover_their_weight_map(tiny_models, tmp_path, monkeypatch):
    import zipmoe_ray.store.dense as dense
    from zipmoe_ray.store import compress

    monkeypatch.setattr(dense, "DENSE_SHARD_BYTES", 200_000)
    compress(tiny_models["mixtral"], tmp_path / "s")
    s = open_store(tmp_path / "s")
    assert len(s.index.dense["files"]) > 1 and "index" in s.index.dense
    s.check_dense()
    mp = tmp_path / "s" / s.index.dense["index"]["name"]
    mp.write_text(mp.read_text().replace('"weight_map"', '"weight_map" ', 1))
    with pytest.raises(ChecksumError, match="shard map"):
        open_store(tmp_path / "s")
