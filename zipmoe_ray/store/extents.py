"""Writing one MoE layer's data file: a header, then one 4 KiB-aligned extent per expert (format.py).

Experts are encoded on a thread pool in order, with a bounded window in flight (memory stays at a few
experts whatever the model's size); each extent is the expert's E region (the compressed exponent shards
of all its tensors) followed by its SM region (the raw sign+mantissa planes), zero-padded to alignment.
"""

from __future__ import annotations

import mmap
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..codec import encode, entropy_bits, exponent_histogram, layout_for
from ..codec.encoded import crc32
from .checkpoint import Checkpoint, CheckpointExpert
from .durable import disk_full_guard, fsync_dir, temp_name
from .format import DATA_HEADER_SIZE, ChunkRef, ExpertRecord, TensorRecord, align_up, data_header

__all__ = ["EXPERTS_DIR", "check_layer", "layer_file", "write_layer"]

EXPERTS_DIR = "experts"


def layer_file(layer: int) -> str:
    """The data file of ``layer``, relative to the store directory."""
    return f"{EXPERTS_DIR}/layer-{layer:04d}.zmx"


def _encode_expert(ckpt: Checkpoint, src: CheckpointExpert, opts):
    out = []
    for t in src.tensors:
        x = ckpt.tensor(t.source, t.index)
        enc = encode(x, codec=opts.codec, level=opts.level, shards=opts.shards)
        entropy = entropy_bits(exponent_histogram(x))
        source_crc = crc32(layout_for(x.dtype).words(x.contiguous()))
        out.append((t, enc, entropy, source_crc))
    return out


def _ordered(pool: ThreadPoolExecutor, fn, items, window: int) -> Iterator:
    """Results of fn over items in order, with at most ``window`` tasks in flight (bounds memory)."""
    pending: deque[Future] = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            break
    while pending:
        yield pending.popleft().result()
        for item in it:
            pending.append(pool.submit(fn, item))
            break


def _write_extent(f, pos: int, rel_path: str, src: CheckpointExpert, encoded) -> tuple[ExpertRecord, int]:
    """Write one expert at ``pos`` (aligned); returns its record and the next aligned position."""
    chunks: list[bytes | memoryview | np.ndarray] = []
    rel = 0
    shard_refs = []
    for _, enc, _, _ in encoded:
        refs = []
        for shard, c in zip(enc.exp_shards, enc.exp_crc32):
            refs.append(ChunkRef(rel, len(shard), c))
            chunks.append(shard)
            rel += len(shard)
        shard_refs.append(tuple(refs))
    e_length = rel
    raw_refs = []
    for _, enc, _, _ in encoded:
        raw_refs.append(ChunkRef(rel, enc.raw_nbytes, enc.raw_crc32))
        chunks.append(enc.raw)
        rel += enc.raw_nbytes
    for c in chunks:
        f.write(c)
    padded = align_up(rel)
    if padded > rel:
        f.write(bytes(padded - rel))
    tensors = tuple(
        TensorRecord(
            name=t.name,
            role=t.role,
            dtype=enc.dtype,
            shape=tuple(enc.shape),
            shard_elems=enc.shard_elems,
            shards=shard_refs[i],
            raw=raw_refs[i],
            entropy=entropy,
            source_crc32=scrc,
        )
        for i, (t, enc, entropy, scrc) in enumerate(encoded)
    )
    rec = ExpertRecord(src.layer, src.expert, rel_path, pos, rel, e_length, tensors)
    return rec, pos + padded


def write_layer(
    store: Path,
    ckpt: Checkpoint,
    layer: int,
    experts: list[CheckpointExpert],
    opts,
    store_id: bytes,
    pool,
    progress,
) -> dict:
    """Encode and write ``layer``'s experts durably; returns its journal record (with every expert's record
    packed). Raises StoreError when the disk fills up; a failed write leaves no partial data file."""
    rel_path = layer_file(layer)
    final = store / rel_path
    tmp = temp_name(final)
    final.parent.mkdir(exist_ok=True)
    records = []
    with disk_full_guard(tmp, tmp):
        with open(tmp, "wb") as f:
            f.write(data_header(store_id, layer))
            pos = DATA_HEADER_SIZE
            window = 2 * opts.effective_workers
            for src, encoded in zip(
                experts, _ordered(pool, lambda s: _encode_expert(ckpt, s, opts), experts, window)
            ):
                rec, pos = _write_extent(f, pos, rel_path, src, encoded)
                records.append(rec)
                progress.advance(rec.original_bytes, len(encoded))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    fsync_dir(final.parent)
    return {
        "layer": layer,
        "module": experts[0].module,
        "file": rel_path,
        "file_size": pos,
        "num_experts": len(experts),
        "experts": [r.pack() for r in records],
    }


def check_layer(store: Path, done: dict, store_id: bytes) -> str | None:
    """What is wrong with a layer's data file that the journal records as finished, or None when it is
    whole: its size, its header, every chunk's CRC-32 and the zero padding. Reads the file once (a resume
    re-checks every finished layer rather than trusting its size)."""
    try:
        path = store / done["file"]
        size = path.stat().st_size
        if size != done["file_size"] or size < DATA_HEADER_SIZE:
            return f"{size} bytes, the journal recorded {done['file_size']}"
        records = [ExpertRecord.unpack(r) for r in done["experts"]]
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            mv = memoryview(m)
            try:
                return _check_extents(mv, size, records, data_header(store_id, done["layer"]))
            finally:
                mv.release()
    except (OSError, KeyError, TypeError, ValueError) as e:
        return f"unreadable ({e})"


def _check_extents(mv: memoryview, size: int, records: list[ExpertRecord], header: bytes) -> str | None:
    if mv[:DATA_HEADER_SIZE] != header:
        return "its header is damaged or belongs to another store"
    pos = DATA_HEADER_SIZE
    for rec in records:
        if rec.offset != pos or rec.offset + rec.padded_length > size:
            return f"{rec.label()} lies outside the file"
        for t in rec.tensors:
            for ref in (*t.shards, t.raw):
                if crc32(mv[rec.offset + ref.offset : rec.offset + ref.offset + ref.length]) != ref.crc32:
                    return f"{rec.label(t.name)} fails its checksum"
        if any(mv[rec.offset + rec.length : rec.offset + rec.padded_length]):
            return f"{rec.label()}: padding is not zero"
        pos = rec.offset + rec.padded_length
    return None if pos == size else f"{size - pos} bytes follow the last extent"
