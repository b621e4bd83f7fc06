"""Writing a checkpoint's non-expert weights into the store, as a transformers ``variant`` (safetensors).

The executor loads them with ``from_pretrained(..., variant=DENSE_VARIANT)``, so transformers' own renaming,
tying and buffer initialisation apply exactly as they do to the original checkpoint. Large models are split
into shards of about ``DENSE_SHARD_BYTES`` with a safetensors index, as transformers writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .checkpoint import _ST_DTYPES, Checkpoint
from .durable import FILE_MODE, disk_full_guard, file_crc32, fsync_dir, temp_name, write_atomic
from .format import DENSE_VARIANT

__all__ = ["DENSE_SHARD_BYTES", "dense_bytes", "st_dtype", "write_dense"]

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
        files.append({"name": fname, "size": path.stat().st_size, "crc32": file_crc32(path)})
        weight_map.update({n: fname for n in group})
    if len(groups) > 1:
        idx = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_atomic(
            store / f"model.safetensors.index.{DENSE_VARIANT}.json", json.dumps(idx, indent=2).encode()
        )
    fsync_dir(store)
    return {"files": files, "num_tensors": len(names), "bytes": total}
