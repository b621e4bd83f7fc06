"""Durable files: written under a temporary name, fsynced, renamed; a full disk reported as a StoreError.

Every file of a store is written through these helpers, so a crash leaves either the old file, or the new
one whole, never a torn one; ``file_crc32`` is the checksum that the index records for whole files and
that ``zipmoe verify`` checks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..codec.checksum import crc32
from ..errors import ConfigError, StoreError

__all__ = ["check_writable", "disk_full_guard", "file_crc32", "fsync_dir", "temp_name", "write_atomic"]

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file (safetensors creates files 0600)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """The temporary name ``path`` is written under until it is complete."""
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def disk_full_guard(path: Path, tmp: Path | None = None) -> Iterator[None]:
    """Remove ``tmp`` if the block fails; turn ENOSPC while writing ``path`` into a StoreError that says how
    to resume (the compression keeps its finished layers)."""
    try:
        yield
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise StoreError(
                f"no space left on the device while writing {path}: free some space (or choose another "
                "STORE_DIR) and run the same command again; finished layers are kept and the compression "
                "resumes from there"
            ) from None
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: a reader sees the old file or the new one, whole."""
    tmp = temp_name(path)
    with disk_full_guard(path, tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)


def file_crc32(path: Path) -> int:
    """CRC-32 of a whole file, read in 16 MiB pieces."""
    c = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            c = crc32(chunk, c)
    return c


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse an output path that cannot be written, before any work is done: a directory, an existing
    file without write permission, or a parent that cannot be created or written. Probes the nearest
    existing parent with a temporary file (permission bits alone lie for root), leaves nothing behind.
    Raises ConfigError naming ``what`` and the path."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory; give a file name")
    if p.exists():
        try:
            with open(p, "ab"):
                return
        except OSError as e:
            raise ConfigError(f"cannot write the {what} {p}: {e.strerror}") from None
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ConfigError(
            f"cannot write the {what} {p}: {parent} is not a writable directory ({e.strerror})"
        ) from None
