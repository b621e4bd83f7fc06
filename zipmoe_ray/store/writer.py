"""`zipmoe compress`: a safetensors checkpoint in, a store directory out (format: see format.py).

Durability: every data file is written under a temporary name, fsynced and renamed; a journal in
``.zipmoe-partial/`` records each finished layer; the index, whose presence alone marks a store complete,
is written last, also atomically. An interrupted or failed run leaves no index, and the same command
resumes it: every finished layer and the dense weights are re-checked against their checksums (kept
when whole, compressed again when not) and what was kept is reported; other settings or another
checkpoint start over. A run finding the very store it would make does nothing. ``--overwrite`` writes
the new store beside the old one and swaps them at the end (lifecycle.py); one run at a time writes a
store (a lock file beside it names the holder's pid).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .._version import __version__
from ..codec import get_codec
from ..errors import ConfigError, StoreError, ZipMoEError
from .checkpoint import Checkpoint, CheckpointExpert
from .dense import check_dense_file, dense_bytes, st_dtype, write_dense
from .durable import disk_full_guard, file_crc32, temp_name, write_atomic
from .extents import EXPERTS_DIR, check_layer, write_layer
from .format import FORMAT_VERSION, INDEX_NAME, PARTIAL_DIR, ExpertRecord, StoreIndex, dumps_index
from .journal import Journal
from .lifecycle import StoreLock, clean_store_files, complete_index, finish_swap, staging_dir, swap_in

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
    """What compress reports while it works (the CLI draws it as a progress bar). It may also have a
    ``note(message)`` method: what a resume kept and redid, a swap finished (else those are logged)."""

    def start(self, total_bytes: int, total_tensors: int) -> None: ...

    def advance(self, nbytes: int, ntensors: int) -> None: ...


Note = Callable[[str], None]


class _NoProgress:
    def start(self, total_bytes: int, total_tensors: int) -> None:
        pass

    def advance(self, nbytes: int, ntensors: int) -> None:
        pass


def _matches(index: StoreIndex, ckpt: Checkpoint, opts: CompressOptions) -> bool:
    """Whether a complete store is what compressing ``ckpt`` with ``opts`` would make."""
    key = opts.manifest_key()
    return index.source.get("fingerprint") == ckpt.fingerprint and {k: index.codec.get(k) for k in key} == key


def _target(
    store: Path, ckpt: Checkpoint, opts: CompressOptions, note: Note
) -> tuple[Path, StoreIndex | None]:
    """The directory to write into (``store``, or beside it for ``--overwrite`` of a complete store), or
    the index of a complete store that already is what this run would make (nothing to do)."""
    if store.exists() and not store.is_dir():
        raise StoreError(f"{store}: exists and is not a directory; choose a directory for the store")
    finish_swap(store, note)
    staging = staging_dir(store)
    has_index = (store / INDEX_NAME).exists()
    index = complete_index(store) if has_index else None
    if has_index and opts.overwrite:
        return staging, None
    if staging.exists():  # an --overwrite that was stopped, and is not what this run does
        shutil.rmtree(staging, ignore_errors=True)
        note(f"removed an unfinished replacement of {store} (from an earlier --overwrite)")
    if not has_index:
        return store, None
    if index is not None and _matches(index, ckpt, opts):
        shutil.rmtree(store / PARTIAL_DIR, ignore_errors=True)
        return store, index
    what = "a damaged store" if index is None else "a complete store of another checkpoint or other settings"
    raise StoreError(
        f"{store}: already holds {what}; pass --overwrite to replace it (the old store is kept until the new "
        "one is complete), or choose another directory"
    )


def _begin(
    target: Path, ckpt: Checkpoint, opts: CompressOptions, own: bool, note: Note
) -> tuple[Journal, bytes, bool]:
    """Create or reuse ``target``; returns the journal, the store id (new, or the resumed run's) and
    whether this resumes an interrupted run.
    ``own``: the directory is this module's (a staging directory), so whatever is in it may go."""
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the store directory {target}: {e.strerror}") from None
    journal = Journal(target)
    want = {"format_version": FORMAT_VERSION, "fingerprint": ckpt.fingerprint, **opts.manifest_key()}
    old = journal.manifest()
    if old is not None and {k: old.get(k) for k in want} == want and isinstance(old.get("store_id"), bytes):
        for tmp in (target / EXPERTS_DIR).glob("*.tmp"):
            tmp.unlink()
        return journal, old["store_id"], True
    if old is not None:
        note(
            f"{target} holds an interrupted compression of another checkpoint or other settings; starting over"
        )
        clean_store_files(target)
    others = [p for p in target.iterdir() if p.name != PARTIAL_DIR]
    if others and own:
        clean_store_files(target)
        for p in target.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    elif others and old is None:
        raise StoreError(
            f"{target}: is not empty and holds no zipmoe store; choose a new or empty directory for the store"
        )
    shutil.rmtree(target / PARTIAL_DIR, ignore_errors=True)  # a journal begun but never written
    store_id = uuid.uuid4().bytes
    journal.begin({**want, "store_id": store_id})
    return journal, store_id, False


def _note(progress) -> Note:
    fn = getattr(progress, "note", None)
    return fn if callable(fn) else (lambda message: log.info("%s", message))


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
    note = _note(progress)
    ckpt = Checkpoint(model_dir)
    ckpt.experts  # noqa: B018  validates names, dtypes and completeness before anything is written
    ckpt.check_servable()
    store = Path(store_dir).expanduser()
    with StoreLock(store):
        target, done = _target(store, ckpt, opts, note)
        if done is not None:
            note(f"{store} already holds this store (same checkpoint and settings): nothing to do")
            ckpt.close()
            return done
        index = _write(target, ckpt, opts, progress, note, own=target != store)
        if target != store:
            swap_in(store, target, note)
    ckpt.close()
    log.info("store complete: %s (%d experts)", store, len(index.experts))
    return index


def _write(
    target: Path, ckpt: Checkpoint, opts: CompressOptions, progress, note: Note, own: bool
) -> StoreIndex:
    """Compress into ``target``, resuming what its journal records (each finished piece re-checked)."""
    experts = ckpt.experts
    journal, store_id, resumed = _begin(target, ckpt, opts, own, note)
    store = target
    by_layer: dict[int, list[CheckpointExpert]] = {}
    for e in experts:
        by_layer.setdefault(e.layer, []).append(e)
    total_tensors = sum(len(e.tensors) for e in experts) + len(ckpt.dense_names)
    expert_bytes = sum(_source_bytes(e) for e in experts)
    progress.start(expert_bytes + dense_bytes(ckpt), total_tensors)
    layers_out = []
    kept, redone = [], []
    with ThreadPoolExecutor(opts.effective_workers, thread_name_prefix="zipmoe-compress") as pool:
        for layer, group in sorted(by_layer.items()):
            done = journal.load(f"layer-{layer:04d}")
            problem = check_layer(store, done, store_id) if isinstance(done, dict) else "not finished"
            if done is not None and problem is None:
                kept.append(layer)
                progress.advance(sum(_source_bytes(e) for e in group), sum(len(e.tensors) for e in group))
            else:
                if done is not None:
                    redone.append(f"layer {layer} ({problem})")
                done = write_layer(store, ckpt, layer, group, opts, store_id, pool, progress)
                journal.record(f"layer-{layer:04d}", done)
            layers_out.append(done)
    dense = journal.load("dense")
    dense_ok = isinstance(dense, dict) and _dense_intact(store, dense)
    if dense_ok:
        progress.advance(dense["bytes"], dense["num_tensors"])
    else:
        if dense is not None:
            redone.append("the dense weights")
        dense = write_dense(store, ckpt, progress)
        journal.record("dense", dense)
    if resumed:
        parts = [f"kept {len(kept)} of {len(by_layer)} finished layers"]
        if dense_ok:
            parts.append("the dense weights")
        msg = (
            f"resumed the interrupted compression in {store}: "
            + " and ".join(parts)
            + " (checksums verified)"
        )
        if redone:
            msg += f"; compressed again what failed its check: {', '.join(redone)}"
        note(msg)
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
    return index


def _dense_intact(store: Path, dense: dict) -> bool:
    """Whether the dense weights the journal records as written are on disk, whole (checked, not trusted)."""
    try:
        for f in dense["files"]:
            check_dense_file(store / f["name"], f)
        idx = dense.get("index")
        if idx is not None and file_crc32(store / idx["name"]) != idx["crc32"]:
            return False
    except (ZipMoEError, OSError, KeyError, TypeError, ValueError):
        return False
    return True
