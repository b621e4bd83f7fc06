"""`zipmoe compress`: a safetensors checkpoint in, a store directory out (format: see format.py).

Durability: every data file is written under a temporary name, fsynced and renamed; a journal in
``.zipmoe-partial/`` records each finished layer; the index, whose presence alone marks a store complete,
is written last, also atomically. An interrupted run leaves no index, and the next run with the same
checkpoint and settings resumes after the last finished layer (other settings: it starts over).
"""

from __future__ import annotations

import datetime as _dt
import errno
import logging
import os
import shutil
import uuid
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import msgpack
import numpy as np
import torch
from safetensors.torch import save_file

from .. import __version__
from ..codec import encode, entropy_bits, exponent_histogram, get_codec, layout_for
from ..codec.encoded import crc32
from ..errors import ConfigError, StoreError, ZipMoEError
from .checkpoint import Checkpoint, ExpertSource
from .format import (
    DATA_HEADER_SIZE,
    DENSE_VARIANT,
    FORMAT_VERSION,
    INDEX_NAME,
    PARTIAL_DIR,
    ChunkRef,
    ExpertRecord,
    StoreIndex,
    TensorRecord,
    align_up,
    data_header,
    dumps_index,
    loads_index,
)

__all__ = ["CompressOptions", "Progress", "compress"]

log = logging.getLogger(__name__)

DENSE_SHARD_BYTES = 2 << 30  # non-expert weights are split into safetensors shards of about this size
EXPERTS_DIR = "experts"
_UMASK = os.umask(0)
os.umask(_UMASK)


@dataclass(frozen=True)
class CompressOptions:
    """Settings of one compression (each is also a `zipmoe compress` flag)."""

    codec: str = "zstd"  # --codec: zstd or lz4
    level: int | None = None  # --level: None = zstd parameters tuned for exponent planes
    shards: int | None = None  # --shards: K exponent shards per tensor; None = one per ~256 KiB, at most 8
    workers: int | None = None  # --workers: encoding threads; None = CPU count
    overwrite: bool = False  # --overwrite: replace a complete store in the target directory

    def __post_init__(self):
        get_codec(self.codec, self.level)  # validates both
        if self.shards is not None and (not isinstance(self.shards, int) or self.shards < 1):
            raise ConfigError(f"shards must be a positive integer, got {self.shards!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError(f"workers must be a positive integer, got {self.workers!r}")

    @property
    def effective_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    def manifest_key(self) -> dict:
        return {"codec": self.codec, "level": self.level, "shards": self.shards}


class Progress(Protocol):
    """What compress reports while it works (the CLI draws it as a progress bar)."""

    def start(self, total_bytes: int, total_tensors: int) -> None: ...

    def advance(self, nbytes: int, ntensors: int) -> None: ...


class _NoProgress:
    def start(self, total_bytes: int, total_tensors: int) -> None:
        pass

    def advance(self, nbytes: int, ntensors: int) -> None:
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _disk_full(path: Path, e: OSError) -> StoreError:
    return StoreError(
        f"no space left on the device while writing {path}: free some space (or choose another STORE_DIR) "
        "and run the same command again; finished layers are kept and the compression resumes from there"
    )


class _Journal:
    """The ``.zipmoe-partial`` directory: manifest of this run plus one record per finished piece."""

    def __init__(self, store: Path):
        self.dir = store / PARTIAL_DIR

    def manifest(self) -> dict | None:
        try:
            return msgpack.unpackb((self.dir / "manifest.msgpack").read_bytes(), raw=False)
        except (OSError, ValueError, msgpack.UnpackException):
            return None

    def begin(self, manifest: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.dir / "manifest.msgpack", msgpack.packb(manifest, use_bin_type=True))

    def record(self, name: str, value) -> None:
        _write_atomic(self.dir / f"{name}.msgpack", msgpack.packb(value, use_bin_type=True))

    def load(self, name: str):
        try:
            return msgpack.unpackb((self.dir / f"{name}.msgpack").read_bytes(), raw=False)
        except (OSError, ValueError, msgpack.UnpackException):
            return None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _clean_store_files(store: Path) -> None:
    shutil.rmtree(store / EXPERTS_DIR, ignore_errors=True)
    shutil.rmtree(store / PARTIAL_DIR, ignore_errors=True)
    for p in store.glob(f"*{DENSE_VARIANT}*"):
        p.unlink(missing_ok=True)


def _prepare(store: Path, ckpt: Checkpoint, opts: CompressOptions) -> tuple[_Journal, bytes]:
    """Create or reuse ``store``; returns the journal and the store id (new, or the resumed run's)."""
    if store.exists() and not store.is_dir():
        raise StoreError(f"{store}: exists and is not a directory; choose a directory for the store")
    store.mkdir(parents=True, exist_ok=True)
    journal = _Journal(store)
    index = store / INDEX_NAME
    fresh = False
    if index.exists():
        if not opts.overwrite:
            raise StoreError(
                f"{store}: already holds a complete store; pass --overwrite to replace it, or choose another directory"
            )
        try:
            old_files = [f["name"] for f in loads_index(index.read_bytes(), str(index)).aux_files]
        except ZipMoEError:
            old_files = []
        index.unlink()  # from here on the directory no longer claims to hold a complete store
        _fsync_dir(store)
        _clean_store_files(store)
        for name in old_files:
            (store / name).unlink(missing_ok=True)
        fresh = True
    want = {"format_version": FORMAT_VERSION, "fingerprint": ckpt.fingerprint, **opts.manifest_key()}
    old = journal.manifest()
    if old is not None:
        if {k: old.get(k) for k in want} == want:
            log.info("resuming an interrupted compression in %s", store)
            for tmp in (store / EXPERTS_DIR).glob("*.tmp"):
                tmp.unlink()
            return journal, old["store_id"]
        log.warning(
            "%s holds an interrupted compression of another checkpoint or settings; starting over", store
        )
        _clean_store_files(store)
    elif not fresh and any(store.iterdir()):
        raise StoreError(
            f"{store}: is not empty and holds no zipmoe store; choose a new or empty directory for the store"
        )
    store_id = uuid.uuid4().bytes
    journal.begin({**want, "store_id": store_id})
    return journal, store_id


def _encode_expert(ckpt: Checkpoint, src: ExpertSource, opts: CompressOptions):
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


def _write_extent(f, pos: int, layer_file: str, src: ExpertSource, encoded) -> tuple[ExpertRecord, int]:
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
    rec = ExpertRecord(src.layer, src.expert, layer_file, pos, rel, e_length, tensors)
    return rec, pos + padded


def _write_layer(store, ckpt, layer, experts, opts, store_id, pool, progress) -> dict:
    rel_path = f"{EXPERTS_DIR}/layer-{layer:04d}.zmx"
    final = store / rel_path
    tmp = final.with_name(final.name + ".tmp")
    final.parent.mkdir(exist_ok=True)
    records = []
    try:
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
        _fsync_dir(final.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise _disk_full(tmp, e) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "layer": layer,
        "module": experts[0].module,
        "file": rel_path,
        "file_size": pos,
        "num_experts": len(experts),
        "experts": [r.pack() for r in records],
    }


def _write_dense(store: Path, ckpt: Checkpoint, progress) -> dict:
    names = ckpt.dense_names
    groups: list[list[str]] = [[]]
    size = 0
    for n in names:
        _, dtype, shape = ckpt.tensors[n]
        nbytes = int(np.prod(shape, dtype=np.int64)) * _st_dtype(dtype).itemsize
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
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors creates files 0600
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise _disk_full(path, e) from None
            raise
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        total += nbytes
        progress.advance(nbytes, len(tensors))
        files.append({"name": fname, "size": path.stat().st_size, "crc32": _file_crc32(path)})
        weight_map.update({n: fname for n in group})
    if len(groups) > 1:
        import json

        idx = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_atomic(
            store / f"model.safetensors.index.{DENSE_VARIANT}.json", json.dumps(idx, indent=2).encode()
        )
    _fsync_dir(store)
    return {"files": files, "num_tensors": len(names), "bytes": total}


def _st_dtype(dtype: str) -> torch.dtype:
    from .checkpoint import _ST_DTYPES

    if dtype not in _ST_DTYPES:
        return torch.uint8  # byte-sized fallback for exotic dtypes (only used for shard sizing)
    return _ST_DTYPES[dtype]


def _source_bytes(src: ExpertSource) -> int:
    return sum(int(np.prod(t.shape, dtype=np.int64)) * _st_dtype(t.dtype).itemsize for t in src.tensors)


def _file_crc32(path: Path) -> int:
    c = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            c = zlib.crc32(chunk, c)
    return c & 0xFFFFFFFF


def _copy_aux(store: Path, ckpt: Checkpoint) -> list[dict]:
    out = []
    for p in ckpt.aux_files():
        dst = store / p.name
        tmp = dst.with_name(dst.name + ".tmp")
        try:
            shutil.copyfile(p, tmp)
            os.replace(tmp, dst)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise _disk_full(dst, e) from None
            raise
        out.append({"name": p.name, "size": dst.stat().st_size, "crc32": _file_crc32(dst)})
    return out


def compress(
    model_dir: str | os.PathLike,
    store_dir: str | os.PathLike,
    options: CompressOptions | None = None,
    progress: Progress | None = None,
) -> StoreIndex:
    """Compress a checkpoint's routed experts into a store; blocks until the store is complete.

    Returns the store's index. Raises CheckpointError/ArchitectureError/DTypeError for bad input (before
    anything is written), StoreError when ``store_dir`` cannot be used or the disk fills up.

    Example:
        >>> from zipmoe_ray.store import compress, CompressOptions
        >>> index = compress("tiny-qwen", "tiny-qwen.zmoe", CompressOptions(workers=2))  # doctest: +SKIP
    """
    opts = options or CompressOptions()
    progress = progress or _NoProgress()
    ckpt = Checkpoint(model_dir)
    experts = ckpt.experts  # validates names, dtypes and completeness before anything is written
    store = Path(store_dir).expanduser()
    journal, store_id = _prepare(store, ckpt, opts)
    by_layer: dict[int, list[ExpertSource]] = {}
    for e in experts:
        by_layer.setdefault(e.layer, []).append(e)
    dense_bytes = sum(
        int(np.prod(ckpt.tensors[n][2], dtype=np.int64)) * _st_dtype(ckpt.tensors[n][1]).itemsize
        for n in ckpt.dense_names
    )
    total_tensors = sum(len(e.tensors) for e in experts) + len(ckpt.dense_names)
    expert_bytes = sum(_source_bytes(e) for e in experts)
    progress.start(expert_bytes + dense_bytes, total_tensors)
    layers_out = []
    with ThreadPoolExecutor(opts.effective_workers, thread_name_prefix="zipmoe-compress") as pool:
        for layer, group in sorted(by_layer.items()):
            done = journal.load(f"layer-{layer:04d}")
            data = store / f"{EXPERTS_DIR}/layer-{layer:04d}.zmx"
            if done is not None and data.is_file() and data.stat().st_size == done["file_size"]:
                log.info("layer %d already compressed, skipping", layer)
                progress.advance(sum(_source_bytes(e) for e in group), sum(len(e.tensors) for e in group))
            else:
                done = _write_layer(store, ckpt, layer, group, opts, store_id, pool, progress)
                journal.record(f"layer-{layer:04d}", done)
            layers_out.append(done)
    dense = journal.load("dense")
    if dense is None or not all((store / f["name"]).is_file() for f in dense["files"]):
        dense = _write_dense(store, ckpt, progress)
        journal.record("dense", dense)
    else:
        progress.advance(dense["bytes"], dense["num_tensors"])
    aux = _copy_aux(store, ckpt)
    index = StoreIndex(
        store_id=store_id,
        source={
            "fingerprint": ckpt.fingerprint,
            "model_type": ckpt.model_type,
            "path": str(ckpt.path.resolve()),
            "num_experts": ckpt.spec.num_experts(ckpt.config),
            "top_k": ckpt.spec.top_k(ckpt.config),
        },
        codec={**opts.manifest_key(), "describe": get_codec(opts.codec, opts.level).describe},
        layers=[{k: v for k, v in d.items() if k != "experts"} for d in layers_out],
        experts=[ExpertRecord.unpack(r) for d in layers_out for r in d["experts"]],
        dense=dense,
        aux_files=aux,
        created_by=f"zipmoe-ray {__version__}",
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        extra={"options": asdict(opts)},
    )
    try:
        _write_atomic(store / INDEX_NAME, dumps_index(index))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _disk_full(store / INDEX_NAME, e) from None
        raise
    journal.remove()
    ckpt.close()
    log.info("store complete: %s (%d experts)", store, len(index.experts))
    return index
