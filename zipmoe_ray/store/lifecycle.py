"""Where a compression writes, and how a store is replaced without ever being lost.

    STORE_DIR                  the store: written in place when it holds no complete store yet
    .STORE_DIR.zipmoe-new/     ``--overwrite`` of a complete store: the new one is written here, beside it
    .STORE_DIR.zipmoe-old/     only during the swap at the end (old store moved aside, new one moved in)
    .STORE_DIR.zipmoe-lock     held (flock) by the one compression writing STORE_DIR; holds its pid

The old store stays whole and servable until the new one is complete; the swap is two renames, and a run
that finds a swap cut short finishes it (or undoes it) before anything else, so every state a kill can
leave is one the same command resumes from. Everything here runs under :class:`StoreLock`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import StoreError, ZipMoEError
from .durable import fsync_dir
from .extents import EXPERTS_DIR
from .format import DENSE_VARIANT, INDEX_NAME, PARTIAL_DIR, StoreIndex, loads_index

__all__ = [
    "StoreLock",
    "clean_store_files",
    "complete_index",
    "finish_swap",
    "own_files",
    "staging_dir",
    "swap_in",
]

log = logging.getLogger(__name__)

Note = Callable[[str], None]


def _sibling(store: Path, suffix: str) -> Path:
    return store.parent / f".{store.name}.{suffix}"


def staging_dir(store: Path) -> Path:
    """Where ``--overwrite`` writes the new store."""
    return _sibling(store, "zipmoe-new")


def _old_dir(store: Path) -> Path:
    return _sibling(store, "zipmoe-old")


class StoreLock:
    """An exclusive lock on writing ``store`` (``flock`` on a file beside it: released by the kernel if the
    holder dies, so a killed run never leaves a stale lock). Raises StoreError naming the holder's pid."""

    def __init__(self, store: Path):
        self.store = store
        self.path = _sibling(store, "zipmoe-lock")
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        try:
            self.store.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {self.store.parent}: {e.strerror}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise StoreError(f"cannot write in {self.store.parent}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise StoreError(f"cannot lock {self.path}: {e.strerror}") from None
                who = f" (pid {holder})" if holder else ""
                raise StoreError(
                    f"{self.store}: another `zipmoe compress`{who} is writing this store right now; wait for "
                    f"it to finish, or stop it and run this command again (the lock is {self.path})"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its last holder unlinked while we waited for it
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None


def complete_index(d: Path) -> StoreIndex | None:
    """The index of the complete store in ``d``, or None (none there, or unreadable)."""
    p = d / INDEX_NAME
    if not p.is_file():
        return None
    try:
        return loads_index(p.read_bytes(), str(p))
    except ZipMoEError:
        return None


def own_files(d: Path, index: StoreIndex | None) -> set[str]:
    """Top-level names in ``d`` that belong to the zipmoe store there (its index, data, dense and copied
    files, journal, temporary files); everything else there is the user's."""
    names = {INDEX_NAME, EXPERTS_DIR, PARTIAL_DIR}
    if index is not None:
        names |= {f["name"] for f in index.aux_files} | {f["name"] for f in index.dense["files"]}
        if "index" in index.dense:
            names.add(index.dense["index"]["name"])
    return names | {p.name for p in d.iterdir() if DENSE_VARIANT in p.name or p.name.endswith(".tmp")}


def clean_store_files(d: Path, index: StoreIndex | None = None) -> None:
    """Remove what a compression wrote into ``d`` (files of the user's are left alone); the journal goes
    last, so that a run killed meanwhile is still recognised as a compression's by the next one."""
    names = sorted(own_files(d, index), key=lambda n: n == PARTIAL_DIR) if d.is_dir() else []
    for name in names:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def finish_swap(store: Path, note: Note) -> None:
    """Complete (or undo) a swap a killed ``--overwrite`` left half done; nothing when there was none."""
    old, new = _old_dir(store), staging_dir(store)
    if not old.exists():
        return
    if not store.exists():
        if complete_index(new) is not None:
            os.rename(new, store)
            note(f"finished replacing {store} (an earlier --overwrite was stopped during its swap)")
        else:
            os.rename(old, store)
            note(f"restored the previous store in {store} (an earlier --overwrite was stopped)")
        fsync_dir(store.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def swap_in(store: Path, new: Path, note: Note) -> None:
    """Replace the complete store in ``store`` by the complete one in ``new``: the user's own files in
    ``store`` are moved into ``new`` first, then two renames and the old store is removed. A kill at any
    point leaves a state :func:`finish_swap` completes."""
    old_index = complete_index(store)
    mine = own_files(store, old_index)
    kept = []
    for p in sorted(store.iterdir()):
        if p.name not in mine and not (new / p.name).exists():
            os.rename(p, new / p.name)
            kept.append(p.name)
    if kept:
        note(f"kept {len(kept)} file(s) of yours from the old store directory: {', '.join(kept[:5])}")
    fsync_dir(new)
    old = _old_dir(store)
    os.rename(store, old)
    fsync_dir(store.parent)
    os.rename(new, store)
    fsync_dir(store.parent)
    shutil.rmtree(old, ignore_errors=True)
