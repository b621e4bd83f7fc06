"""The lanes on their own (stages/loader.py, stages/decompressor.py): what a read returns, what a decode
returns, whole or in pieces, and that a damaged chunk is refused before it is decoded."""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import time

import numpy as np
import pytest
import torch

from zipmoe_ray.codec import layout_for
from zipmoe_ray.errors import ChecksumError
from zipmoe_ray.stages.decompressor import Decompressor
from zipmoe_ray.stages.loader import IOLoader
from zipmoe_ray.stages.protocol import Later
from zipmoe_ray.store import ReadOptions, open_store


@pytest.fixture(scope="module")
def store(tiny_stores):
    return str(tiny_stores["qwen2_moe"])


def _flat_bits(store_dir: str, layer: int, expert: int) -> np.ndarray:
    """The expert's tensors back to back (gate, up, down), as unsigned words: what decode must return."""
    tensors = open_store(store_dir).read_expert(layer, expert)
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    return layout_for(flat.dtype).words(flat)


def test_loader_reads_each_region_and_counts_them(store):
    loader = IOLoader(store, ReadOptions(read_mode="drop"))
    s = open_store(store)
    rec = s.record(0, 3)
    whole = np.array(loader.read(0, 3, "all"))
    assert len(whole) == rec.length
    assert np.array_equal(np.array(loader.read(0, 3, "exp")), whole[: rec.e_length])
    assert np.array_equal(np.array(loader.read(0, 3, "raw")), whole[rec.e_length : rec.length])
    exp, sm = loader.read_split(0, 3)
    assert np.array_equal(np.concatenate([exp, sm]), whole)
    st = loader.stats()
    assert st["reads"] == 4 and st["bytes_read"] >= 3 * rec.length and st["read_mode"] in ("drop", "direct")
    loader.reset_stats()
    assert loader.stats()["reads"] == 0 and loader.stats()["bytes_read"] == 0
    assert loader.store_id() == s.index.store_id.hex()


def test_loader_copies_the_sm_region_in_process(store):
    exp, sm = IOLoader(store, copy_parts=True).read_split(1, 0)
    assert sm.base is None or not np.shares_memory(exp, sm)  # caching SM alone must not pin the E region


@pytest.mark.parametrize("key", [(0, 0), (2, 15)])
def test_decode_returns_the_expert_bit_for_bit(store, key):
    s = open_store(store)
    extent = s.read_extent(*key)
    rec = s.record(*key)
    dec = Decompressor(store)
    want = _flat_bits(store, *key)
    assert np.array_equal(dec.decode(*key, extent=extent), want)
    held = dec.decode(*key, exp=extent[: rec.e_length], sm=extent[rec.e_length : rec.length])
    assert np.array_equal(held, want)
    assert dec.stats()["tasks"] == 2 and dec.stats()["decoded_bytes"] == 2 * rec.original_bytes


@pytest.mark.parametrize("pieces", [2, 3])
def test_decode_in_pieces_reassembles_to_the_whole(tiny_models, tmp_path, pieces):
    from zipmoe_ray.store import CompressOptions, compress

    compress(tiny_models["qwen2_moe"], tmp_path / "s", CompressOptions(shards=4))
    store = str(tmp_path / "s")
    s = open_store(store)
    extent = s.read_extent(1, 5)
    dec = Decompressor(store)
    want = _flat_bits(store, 1, 5)
    got = np.zeros_like(want)
    covered = np.zeros(len(want), dtype=bool)
    for i in range(pieces):
        for off, words in dec.decode(1, 5, extent=extent, part=(i, pieces)):
            assert not covered[off : off + len(words)].any()  # pieces never overlap
            got[off : off + len(words)] = words
            covered[off : off + len(words)] = True
    assert covered.all() and np.array_equal(got, want)


@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_decode_starts_on_the_exponents_before_the_sm_region_arrives(tiny_models, tmp_path, pieces):
    """The SM region handed over as a Later still being read: the lane decompresses the exponent shards,
    then waits for it; the weights are the same bits, whole or in pieces written into one buffer."""
    from zipmoe_ray.store import CompressOptions, compress

    compress(tiny_models["qwen2_moe"], tmp_path / "s", CompressOptions(shards=4))
    store = str(tmp_path / "s")
    s = open_store(store)
    rec = s.record(1, 5)
    extent = s.read_extent(1, 5)
    exp, sm = extent[: rec.e_length], extent[rec.e_length : rec.length]
    dec = Decompressor(store)
    want = _flat_bits(store, 1, 5)
    with cf.ThreadPoolExecutor(1) as pool:
        if pieces == 1:
            pool.submit(time.sleep, 0.05)  # the read below is still queued when the lane starts
            later = Later(pool.submit(lambda: sm))
            assert np.array_equal(dec.decode(1, 5, exp=exp, sm=later), want)
            return
        got = np.zeros_like(want)
        for i in range(pieces):
            assert (
                dec.decode(1, 5, exp=exp, sm=Later(pool.submit(lambda: sm)), part=(i, pieces), out=got) is got
            )
        assert np.array_equal(got, want)


def test_a_damaged_exponent_shard_is_refused_without_waiting_for_the_sm_region(store, tmp_path):
    shutil.copytree(store, tmp_path / "s")
    s = open_store(tmp_path / "s")
    rec = s.record(0, 4)
    extent = np.array(s.read_extent(0, 4))
    extent[rec.tensors[2].shards[0].offset + 5] ^= 0x01  # the down projection's first exponent shard
    never = cf.Future()  # a read that never finishes: waiting on it would hang the test
    with pytest.raises(ChecksumError, match=r"layer 0, expert 4, tensor .*down_proj.*exponent shard 0"):
        Decompressor(str(tmp_path / "s")).decode(0, 4, exp=extent[: rec.e_length], sm=Later(never))


def test_a_damaged_sm_region_that_arrives_late_is_refused(store, tmp_path):
    s = open_store(store)
    rec = s.record(2, 1)
    extent = np.array(s.read_extent(2, 1))
    sm = extent[rec.e_length : rec.length].copy()
    sm[rec.tensors[0].raw.offset - rec.e_length + 9] ^= 0x40
    done = cf.Future()
    done.set_result(sm)
    with pytest.raises(ChecksumError, match=r"layer 2, expert 1, tensor .*gate_proj.*sign\+mantissa"):
        Decompressor(store).decode(2, 1, exp=extent[: rec.e_length], sm=Later(done))


def test_planes_only_merge_to_the_same_weights(store):
    s = open_store(store)
    rec = s.record(0, 7)
    planes = Decompressor(store).decode(0, 7, extent=s.read_extent(0, 7), planes_only=True)
    lay = layout_for(rec.tensors[0].dtype)
    n = rec.numel
    out = np.empty(n, dtype=lay.word)
    lay.merge(planes[:n], planes[n:], out, 0, n)
    assert np.array_equal(out, _flat_bits(store, 0, 7))


def test_a_damaged_chunk_is_refused_naming_the_tensor(store, tmp_path):
    shutil.copytree(store, tmp_path / "s")
    s = open_store(tmp_path / "s")
    rec = s.record(1, 2)
    extent = np.array(s.read_extent(1, 2))
    extent[rec.tensors[1].raw.offset + 3] ^= 0x10  # one bit of the up projection's SM plane
    with pytest.raises(ChecksumError, match=r"layer 1, expert 2, tensor .*up_proj"):
        Decompressor(str(tmp_path / "s")).decode(1, 2, extent=extent)


def test_every_piece_refuses_a_damaged_sm_plane_with_a_checksum_error(store, tmp_path):
    """A piece other than the first reads the raw plane too, so it checks it (it used to be left to piece
    0), and the error stays a ChecksumError naming the tensor once."""
    shutil.copytree(store, tmp_path / "s")
    s = open_store(tmp_path / "s")
    rec = s.record(1, 2)
    extent = np.array(s.read_extent(1, 2))
    extent[rec.tensors[1].raw.offset + 3] ^= 0x10
    out = np.zeros(rec.numel, dtype=np.uint16)
    with pytest.raises(ChecksumError, match=r"^layer 1, expert 2, tensor [^:]*up_proj[^:]*: sign"):
        Decompressor(str(tmp_path / "s")).decode(1, 2, extent=extent, part=(1, 2), out=out)
    assert not out.any()  # nothing was written from the damaged piece


def test_derive_rebuilds_the_sm_region_from_the_weights(store):
    s = open_store(store)
    rec = s.record(2, 4)
    extent = s.read_extent(2, 4)
    dec = Decompressor(store)
    words = dec.decode(2, 4, extent=extent)
    sm = dec.derive(2, 4, words, "raw")
    assert np.array_equal(sm, np.asarray(extent[rec.e_length : rec.length]))
