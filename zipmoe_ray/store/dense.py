"""Writing a checkpoint's non-expert weights into the store, as a transformers ``variant`` (safetensors).

The executor loads them with ``from_pretrained(..., variant=DENSE_VARIANT)``, so transformers' own renaming,
tying and buffer initialisation apply exactly as they do to the original checkpoint. Large models are split
into shards of about ``DENSE_SHARD_BYTES`` with a safetensors index, as transformers writes them.

Checksums (the index's ``dense`` record): per file its size and CRC-32, the CRC-32 of its header (bytes
``[0, data_start)``) and of every tensor's bytes (``tensors: {name: [offset, length, crc32]}``, offsets
absolute); the header and the tensors tile the file, so every byte is covered and a damaged one is named
by tensor (:func:`check_dense_file`). The shards' weight map, when there is one, is covered whole
(``index``). Stores written before the per-tensor checksums have only the whole-file CRC, which is then
what is checked.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..codec.checksum import crc32
from ..errors import ChecksumError, StoreCorruptError
from .checkpoint import _ST_DTYPES, Checkpoint
from .durable import FILE_MODE, disk_full_guard, file_crc32, fsync_dir, temp_name, write_atomic
from .format import DENSE_VARIANT

__all__ = [
    "DENSE_SHARD_BYTES",
    "check_dense_file",
    "dense_bytes",
    "dense_checksums",
    "st_dtype",
    "write_dense",
]

DENSE_SHARD_BYTES = 2 << 30  # non-expert weights are split into safetensors shards of about this size


def st_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (a byte-sized stand-in for exotic ones: sizing only)."""
    return _ST_DTYPES.get(dtype, torch.uint8)


def _nbytes(ckpt: Checkpoint, name: str) -> int:
    _, dtype, shape = ckpt.tensors[name]
    return int(np.prod(shape, dtype=np.int64)) * st_dtype(dtype).itemsize


def dense_bytes(ckpt: Checkpoint) -> int:
    """Bytes of the checkpoint's non-expert weights."""
    return sum(_nbytes(ckpt, n) for n in ckpt.dense_names)


def write_dense(store: Path, ckpt: Checkpoint, progress) -> dict:
    """Write the non-expert weights durably; returns the journal/index record (files with size and CRC-32).
    Raises StoreError when the disk fills up."""
    names = ckpt.dense_names
    groups: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = _nbytes(ckpt, n)
        if groups[-1] and size + nbytes > DENSE_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nbytes
    files, weight_map, total = [], {}, 0
    for i, group in enumerate(groups):
        if len(groups) == 1:
            fname = f"model.{DENSE_VARIANT}.safetensors"
        else:
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.{DENSE_VARIANT}.safetensors"
        tensors = {n: ckpt.tensor(n).contiguous() for n in group}
        path = store / fname
        tmp = temp_name(path)
        with disk_full_guard(path, tmp):
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, FILE_MODE)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        total += nbytes
        progress.advance(nbytes, len(tensors))
        files.append({"name": fname, **dense_checksums(path)})
        weight_map.update({n: fname for n in group})
    record = {"files": files, "num_tensors": len(names), "bytes": total}
    if len(groups) > 1:
        idx = {"metadata": {"total_size": total}, "weight_map": weight_map}
        idx_path = store / f"model.safetensors.index.{DENSE_VARIANT}.json"
        write_atomic(idx_path, json.dumps(idx, indent=2).encode())
        record["index"] = {
            "name": idx_path.name,
            "size": idx_path.stat().st_size,
            "crc32": file_crc32(idx_path),
        }
    fsync_dir(store)
    return record


def _crc(buf) -> int:
    return crc32(buf)


def dense_checksums(path: Path) -> dict:
    """The checksum record of a safetensors file zipmoe just wrote: size, whole-file CRC-32, header CRC-32
    and one CRC-32 per tensor (absolute byte ranges, from its own header)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        start = 8 + n
        tensors = {}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                head_crc = _crc(view[:start])
                for name, meta in header.items():
                    if name == "__metadata__":
                        continue
                    a, b = meta["data_offsets"]
                    tensors[name] = [start + a, b - a, _crc(view[start + a : start + b])]
            finally:
                view.release()
    return {
        "size": size,
        "crc32": file_crc32(path),
        "data_start": start,
        "header_crc32": head_crc,
        "tensors": tensors,
    }


def check_dense_file(path: Path, record: dict) -> None:
    """Check one dense weights file against its index record before anything loads it: size, header and
    every tensor (or, for a store without per-tensor checksums, the whole file). Blocks (reads the file
    once). Raises ChecksumError naming the file and the tensor, StoreCorruptError for a missing or
    truncated file."""
    name = record["name"]
    try:
        size = path.stat().st_size
    except OSError:
        raise StoreCorruptError(
            f"{path}: missing (the store's non-expert weights); re-create the store"
        ) from None
    if size != record["size"]:
        raise StoreCorruptError(
            f"{path}: {size} bytes, the index records {record['size']} (truncated or altered); re-create "
            "the store with `zipmoe compress`"
        )
    if "tensors" not in record:
        if file_crc32(path) != record["crc32"]:
            raise ChecksumError(
                f"dense weights {name}: fail their checksum (altered or damaged); re-create the store (a "
                "store written by this version names the damaged tensor)"
            )
        return
    if size == 0:
        raise StoreCorruptError(f"{path}: empty")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        try:
            if _crc(view[: record["data_start"]]) != record["header_crc32"]:
                raise ChecksumError(
                    f"dense weights {name}: the safetensors header (tensor names, shapes, offsets) fails its "
                    "checksum; the file is damaged, re-create the store"
                )
            for tname, (off, length, want) in record["tensors"].items():
                if _crc(view[off : off + length]) != want:
                    raise ChecksumError(
                        f"dense weights {name}, tensor {tname}: fails its checksum; the file is damaged, "
                        "re-create the store"
                    )
        finally:
            view.release()
