"""Reading extents from disk the way an edge device would see them.

A file just written sits in the page cache and reads at memory speed, which hides the cost the whole
system exists to fight. :class:`ExtentReader` can therefore

* bypass the page cache: ``O_DIRECT`` (aligned reads into aligned buffers) where the file system allows
  it, else ``posix_fadvise(DONTNEED)`` around every read so the next read of the same bytes hits the disk;
* cap bandwidth: a :class:`BandwidthLimiter` models one serial device of ``bandwidth`` bytes/s and
  ``latency`` seconds per request; a read returns no earlier than that device would have finished it.

Every reader counts its reads, bytes and time. Thread-safe: reads may run concurrently (pread).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
import warnings
from collections import deque
from dataclasses import InitVar, dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, StoreCorruptError
from .format import ALIGN, align_up

__all__ = ["READ_MODES", "BandwidthLimiter", "ExtentReader", "ReadOptions", "ReadStats", "aligned_empty"]

log = logging.getLogger(__name__)

READ_MODES = ("page-cache", "direct", "drop", "bypass")


def aligned_empty(n: int, align: int = ALIGN) -> np.ndarray:
    """An uninitialised uint8 array of ``n`` bytes whose address is a multiple of ``align``."""
    buf = np.empty(n + align, dtype=np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off : off + n]


@dataclass(frozen=True)
class ReadOptions:
    """How extents are read.

    read_mode: ``page-cache`` (plain reads), ``direct`` (O_DIRECT, error where unsupported), ``drop``
        (fadvise DONTNEED around reads) or ``bypass`` (direct where possible, else drop).
    bandwidth: emulated device bandwidth in bytes/s (None: no cap).
    latency: emulated per-request latency in seconds (applies only with a bandwidth cap).
    timeline: keep the device interval of each of the last ``timeline`` reads (0: none), for profiling
        (``ReadStats.timeline()``; ``ZipMoEEngine.read_timeline()`` with ``EngineConfig.timeline``).
    cache: the former name of ``read_mode`` (deprecated; accepted as a keyword).
    """

    read_mode: str = "page-cache"
    bandwidth: float | None = None
    latency: float = 0.0
    timeline: int = 0
    cache: InitVar[str | None] = None

    def __post_init__(self, cache: str | None):
        if cache is not None:
            warnings.warn("ReadOptions(cache=...) is now ReadOptions(read_mode=...)", DeprecationWarning, 2)
            object.__setattr__(self, "read_mode", cache)
        if self.read_mode not in READ_MODES:
            raise ConfigError(f"read mode {self.read_mode!r} is not one of {', '.join(READ_MODES)}")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise ConfigError(f"bandwidth must be positive bytes/s, got {self.bandwidth!r}")
        if self.latency < 0:
            raise ConfigError(f"latency must be >= 0 seconds, got {self.latency!r}")
        if isinstance(self.timeline, bool) or not isinstance(self.timeline, int) or self.timeline < 0:
            raise ConfigError(f"timeline must be a count of reads >= 0, got {self.timeline!r}")

    def describe(self) -> str:
        bw = f", capped at {self.bandwidth / 1e9:.3g} GB/s" if self.bandwidth else ""
        lat = f" + {self.latency * 1e6:.0f} us/request" if self.bandwidth and self.latency else ""
        return f"{self.read_mode}{bw}{lat}"


class BandwidthLimiter:
    """One emulated serial storage device shared by every reader given it."""

    def __init__(self, bandwidth: float, latency: float = 0.0):
        self.bandwidth = float(bandwidth)
        self.latency = float(latency)
        self._free_at = 0.0
        self.busy = 0.0  # seconds the emulated device has been booked
        self._lock = threading.Lock()

    def book(self, nbytes: int) -> tuple[float, float]:
        """Book a transfer of ``nbytes``; returns the monotonic times at which the device starts and finishes
        it (it starts once the transfers booked before it are done)."""
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            dt = self.latency + nbytes / self.bandwidth
            self._free_at = start + dt
            self.busy += dt
            return start, self._free_at


@dataclass
class ReadStats:
    reads: int = 0
    bytes: int = 0
    seconds: float = 0.0  # wall time spent in reads, throttling included
    # (unix time the device started, seconds busy, bytes, tag) of the last reads (ReadOptions.timeline), and
    # how many older ones fell off; kept under the same lock as the counters, so that both cover the same reads
    spans: deque | None = None
    dropped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, nbytes: int, seconds: float, span: tuple | None = None) -> None:
        with self._lock:
            self.reads += 1
            self.bytes += nbytes
            self.seconds += seconds
            if self.spans is not None and span is not None:
                self.dropped += len(self.spans) == self.spans.maxlen
                self.spans.append(span)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {"reads": self.reads, "bytes": self.bytes, "seconds": self.seconds}

    def timeline(self) -> tuple[list[tuple], int]:
        """(the kept spans, oldest first; how many older ones fell off) since the last reset."""
        with self._lock:
            return (list(self.spans) if self.spans is not None else []), self.dropped

    def reset(self) -> None:
        with self._lock:
            self.reads, self.bytes, self.seconds, self.dropped = 0, 0, 0.0, 0
            if self.spans is not None:
                self.spans.clear()


class ExtentReader:
    """Reads byte ranges of the files of one store directory with the given ReadOptions."""

    def __init__(
        self, root: str, options: ReadOptions | None = None, limiter: BandwidthLimiter | None = None
    ):
        self.root = root
        self.options = options or ReadOptions()
        if limiter is None and self.options.bandwidth:
            limiter = BandwidthLimiter(self.options.bandwidth, self.options.latency)
        self.limiter = limiter
        self.stats = ReadStats(spans=deque(maxlen=self.options.timeline) if self.options.timeline else None)
        self._fds: dict[str, tuple[int, bool]] = {}
        self._lock = threading.Lock()

    def _open(self, rel: str) -> tuple[int, bool]:
        with self._lock:
            hit = self._fds.get(rel)
            if hit is not None:
                return hit
            path = os.path.join(self.root, rel)
            mode = self.options.read_mode
            fd, direct = -1, False
            if mode in ("direct", "bypass") and hasattr(os, "O_DIRECT"):
                try:
                    fd, direct = os.open(path, os.O_RDONLY | os.O_DIRECT), True
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        raise StoreCorruptError(f"{path}: missing; the store is incomplete") from None
                    if mode == "direct":
                        raise ConfigError(
                            f"{path}: O_DIRECT is not supported on this file system ({e.strerror}); "
                            "use read mode 'bypass' or 'drop'"
                        ) from None
                    log.info("O_DIRECT unavailable for %s (%s); dropping pages with fadvise instead", path, e)
            elif mode == "direct":
                raise ConfigError("O_DIRECT is not available on this platform; use read mode 'drop'")
            if fd < 0:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    raise StoreCorruptError(f"{path}: missing; the store is incomplete") from None
                if mode != "page-cache" and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self._fds[rel] = (fd, direct)
            return fd, direct

    @property
    def mode_in_use(self) -> str:
        """What reads actually do: 'direct', 'drop' or 'page-cache' (for benchmark reports)."""
        if self.options.read_mode == "page-cache":
            return "page-cache"
        if any(direct for _, direct in self._fds.values()):
            return "direct"
        return "drop" if self.options.read_mode in ("drop", "bypass") else self.options.read_mode

    def read(
        self, rel: str, offset: int, length: int, out: np.ndarray | None = None, tag: Any = None
    ) -> np.ndarray:
        """Read ``length`` bytes at ``offset`` of file ``rel``; returns a uint8 array (a view of ``out`` when
        given, which must hold ``align_up(length)`` bytes at a 4 KiB-aligned address for O_DIRECT).
        Raises StoreCorruptError when the file is shorter than asked (truncated). ``tag`` names the read in
        ``stats.timeline()`` (the emulated device's booked interval, or else the read's own)."""
        fd, direct = self._open(rel)
        t0 = time.monotonic()
        booked = self.limiter.book(length) if self.limiter else None
        done_at = booked[1] if booked else 0.0
        if direct:
            if offset % ALIGN:
                raise ValueError(f"O_DIRECT read at unaligned offset {offset}")
            span = align_up(length)
            buf = out if out is not None else aligned_empty(span)
            if buf.size < span or buf.ctypes.data % ALIGN:
                raise ValueError("O_DIRECT needs an aligned buffer of align_up(length) bytes")
            got = self._pread(fd, buf[:span], offset)
        else:
            buf = out if out is not None else np.empty(length, dtype=np.uint8)
            got = self._pread(fd, buf[:length], offset)
            if self.options.read_mode in ("drop", "bypass") and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        if got < length:
            raise StoreCorruptError(
                f"{os.path.join(self.root, rel)}: truncated (wanted bytes {offset}..{offset + length}, file ends "
                f"at {offset + got})"
            )
        if done_at:
            delay = done_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        t1 = time.monotonic()
        span = None
        if self.stats.spans is not None:
            start, end = booked or (t0, t1)
            span = (time.time() - t1 + start, end - start, length, tag)
        self.stats.add(length, t1 - t0, span)
        return buf[:length]

    @staticmethod
    def _pread(fd: int, buf: np.ndarray, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        got = 0
        while got < len(mv):
            k = os.preadv(fd, [mv[got:]], offset + got)
            if k <= 0:
                break
            got += k
            if got % ALIGN:  # a short, unaligned read only happens at the end of the file
                break
        return got

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
