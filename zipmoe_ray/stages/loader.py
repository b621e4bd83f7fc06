"""IOLoader: the I/O lane. Reads an expert's extent, or one region of it, from the store.

One IOLoader models one storage device: reads run one at a time in the order they are submitted (the
scheduler's I/O order), through the store's ExtentReader with its page-cache bypass and bandwidth cap.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from ..store import ReadOptions, open_store
from ..store.format import align_up
from ..store.io import aligned_empty

__all__ = ["IOLoader"]

log = logging.getLogger(__name__)


class IOLoader:
    """Plain class; the Ray backend wraps it in an actor, the local backend runs it on one thread.

    ``read`` returns a new uint8 array owned by the caller (in Ray: stored in the object store)."""

    def __init__(self, store_path: str, read_options: ReadOptions | None = None, copy_parts: bool = False):
        self.store = open_store(store_path, read_options=read_options or ReadOptions())
        self.copy_parts = copy_parts
        self._busy = 0.0
        self._reads = 0
        self._lock = threading.Lock()
        self._born = time.monotonic()

    def read(self, layer: int, expert: int, part: str = "all") -> np.ndarray:
        """Bytes of ``part`` (all, exp or raw) of an expert's extent. Blocks for the (emulated) read."""
        t0 = time.monotonic()
        _, length = self.store.extent_span(layer, expert, part)
        buf = aligned_empty(align_up(length) + 4096)
        out = self.store.read_extent(layer, expert, part, out=buf)
        with self._lock:
            self._busy += time.monotonic() - t0
            self._reads += 1
        return out

    def read_split(self, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole extent in one read, returned as its two regions (exponent shards, sign+mantissa
        planes) so that each can be cached on its own. In Ray each becomes its own object; in one process
        (``copy_parts``) the SM region is copied so that caching it does not keep the E region alive."""
        rec = self.store.record(layer, expert)
        buf = self.read(layer, expert, "all")
        exp, sm = buf[: rec.e_length], buf[rec.e_length : rec.length]
        if self.copy_parts:
            sm = sm.copy()
        return exp, sm

    def calibrate(self, keys: list[tuple[int, int]] | None = None, min_bytes: int = 32 << 20) -> dict:
        """Measure read bandwidth and latency with this loader's read options (emulation included)."""
        from ..schedule.costs import measure_read

        keys = keys or self.store.experts()[:16]
        bps, latency, n = measure_read(self.store, keys, min_bytes)
        return {"read_bps": bps, "read_latency": latency, "bytes": n, "mode": self.store.reader.mode_in_use}

    def store_id(self) -> str:
        """The identity of the store this loader reads (equal on every node holding a copy of one store)."""
        return self.store.index.store_id.hex()

    def stats(self) -> dict:
        s = self.store.reader.stats.snapshot()
        with self._lock:
            return {
                "reads": self._reads,
                "bytes_read": s["bytes"],
                # with an emulated device its booked time is the lane's busy time (reads may overlap copies)
                "busy_s": self.store.reader.limiter.busy if self.store.reader.limiter else self._busy,
                "uptime_s": time.monotonic() - self._born,
                "read_mode": self.store.reader.mode_in_use,
                "read_options": self.store.read_options.describe(),
            }

    def read_timeline(self) -> dict:
        """The device interval of each read since the last reset, oldest first (``reads``: (unix start,
        seconds, bytes, (layer, expert, part))), and how many older ones fell off (``dropped``); empty unless
        the loader's ReadOptions.timeline keeps them."""
        reads, dropped = self.store.reader.stats.timeline()
        return {"reads": reads, "dropped": dropped}

    def reset_stats(self) -> None:
        with self._lock:
            self._busy, self._reads, self._born = 0.0, 0, time.monotonic()
        if self.store.reader.limiter is not None:
            self.store.reader.limiter.busy = 0.0
        self.store.reader.stats.reset()

    def ping(self) -> bool:
        return True
