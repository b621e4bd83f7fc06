"""`zipmoe compress`: a safetensors checkpoint in, a store directory out (format: see format.py).

Durability: every data file is written under a temporary name, fsynced and renamed; a journal in
``.zipmoe-partial/`` records each finished layer; the index, whose presence alone marks a store complete,
is written last, also atomically. An interrupted run leaves no index, and the next run with the same
checkpoint and settings resumes after the last finished layer (other settings: it starts over).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .._version import __version__
from ..codec import get_codec
from ..errors import ConfigError, StoreError, ZipMoEError
from .checkpoint import Checkpoint, CheckpointExpert
from .dense import dense_bytes, st_dtype, write_dense
from .durable import disk_full_guard, file_crc32, fsync_dir, temp_name, write_atomic
from .extents import EXPERTS_DIR, layer_file, write_layer
from .format import (
    DENSE_VARIANT,
    FORMAT_VERSION,
    INDEX_NAME,
    PARTIAL_DIR,
    ExpertRecord,
    StoreIndex,
    dumps_index,
    loads_index,
)
from .journal import Journal

__all__ = ["CompressOptions", "Progress", "compress"]

log = logging.getLogger(__name__)


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


def _clean_store_files(store: Path) -> None:
    shutil.rmtree(store / EXPERTS_DIR, ignore_errors=True)
    shutil.rmtree(store / PARTIAL_DIR, ignore_errors=True)
    for p in store.glob(f"*{DENSE_VARIANT}*"):
        p.unlink(missing_ok=True)


def _prepare(store: Path, ckpt: Checkpoint, opts: CompressOptions) -> tuple[Journal, bytes]:
    """Create or reuse ``store``; returns the journal and the store id (new, or the resumed run's)."""
    if store.exists() and not store.is_dir():
        raise StoreError(f"{store}: exists and is not a directory; choose a directory for the store")
    store.mkdir(parents=True, exist_ok=True)
    journal = Journal(store)
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
        fsync_dir(store)
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


def _source_bytes(src: CheckpointExpert) -> int:
    return sum(int(np.prod(t.shape, dtype=np.int64)) * st_dtype(t.dtype).itemsize for t in src.tensors)


def _copy_aux(store: Path, ckpt: Checkpoint) -> list[dict]:
    out = []
    for p in ckpt.aux_files():
        dst = store / p.name
        tmp = temp_name(dst)
        with disk_full_guard(dst, tmp):
            shutil.copyfile(p, tmp)
            os.replace(tmp, dst)
        out.append({"name": p.name, "size": dst.stat().st_size, "crc32": file_crc32(dst)})
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
    by_layer: dict[int, list[CheckpointExpert]] = {}
    for e in experts:
        by_layer.setdefault(e.layer, []).append(e)
    total_tensors = sum(len(e.tensors) for e in experts) + len(ckpt.dense_names)
    expert_bytes = sum(_source_bytes(e) for e in experts)
    progress.start(expert_bytes + dense_bytes(ckpt), total_tensors)
    layers_out = []
    with ThreadPoolExecutor(opts.effective_workers, thread_name_prefix="zipmoe-compress") as pool:
        for layer, group in sorted(by_layer.items()):
            done = journal.load(f"layer-{layer:04d}")
            data = store / layer_file(layer)
            if done is not None and data.is_file() and data.stat().st_size == done["file_size"]:
                log.info("layer %d already compressed, skipping", layer)
                progress.advance(sum(_source_bytes(e) for e in group), sum(len(e.tensors) for e in group))
            else:
                done = write_layer(store, ckpt, layer, group, opts, store_id, pool, progress)
                journal.record(f"layer-{layer:04d}", done)
            layers_out.append(done)
    dense = journal.load("dense")
    if dense is None or not all((store / f["name"]).is_file() for f in dense["files"]):
        dense = write_dense(store, ckpt, progress)
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
    write_atomic(store / INDEX_NAME, dumps_index(index))
    journal.remove()
    ckpt.close()
    log.info("store complete: %s (%d experts)", store, len(index.experts))
    return index
