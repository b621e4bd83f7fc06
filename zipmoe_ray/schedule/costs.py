"""Per-task costs for the layer scheduler, from a start-up calibration of this machine (not constants).

    io time  = latency + bytes read / read bandwidth            (the single I/O lane)
    cpu time = decoded bytes / decode bandwidth of one worker    (one of W decompression lanes)

``decode_bps`` is the full decode (decompress + recombine) rate of one worker in BF16 output bytes per
second; ``decompress_bps`` the rate when recombination happens on the accelerator instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..cache.forms import ExpertSizes, Form

__all__ = ["CostModel", "measure_decode", "measure_read"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CostModel:
    read_bps: float  # bytes/s of the I/O lane (the emulated cap when one is set)
    read_latency: float  # seconds per read request
    decode_bps: float  # BF16 bytes/s of one worker's full decode
    decompress_bps: float  # BF16-equivalent bytes/s of one worker decompressing only
    copy_bps: float = 8e9  # bytes/s of a plain memory copy (raw-codec stores, SM slices)
    source: str = "calibrated"

    def io_time(self, sizes: ExpertSizes, form: Form) -> float:
        n = sizes.read(form)
        return 0.0 if n == 0 else self.read_latency + n / self.read_bps

    def cpu_time(self, sizes: ExpertSizes, form: Form, recombine_on_device: bool = False) -> float:
        if form == Form.FULL or sizes.raw_codec:
            return 0.0
        return sizes.full / (self.decompress_bps if recombine_on_device else self.decode_bps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        return cls(**d)

    @classmethod
    def calibrated(cls, io: dict, dec: dict) -> CostModel:
        """From an IOLoader's and a Decompressor's ``calibrate()`` results (measured on the lanes)."""
        return cls(
            read_bps=io["read_bps"],
            read_latency=io["read_latency"],
            decode_bps=dec["decode_bps"],
            decompress_bps=dec["decompress_bps"],
            source=f"calibrated at start-up ({io['mode']} reads)",
        )

    @classmethod
    def nominal(cls) -> CostModel:
        """Round figures of this project's reference machine; for tests and dry runs, not for serving."""
        return cls(read_bps=2e9, read_latency=1e-4, decode_bps=2.5e9, decompress_bps=5e9, source="nominal")


def measure_read(
    store, keys: list[tuple[int, int]], min_bytes: int = 64 << 20, min_seconds: float = 0.5
) -> tuple[float, float, int]:
    """Read whole extents of ``keys`` (cycling) through the store's reader until ``min_bytes`` and
    ``min_seconds`` (at most 5 s); returns (sustained bytes/s, seconds per request of latency estimated from
    the smallest read, bytes read). Uses the store's read options, so a bandwidth cap or page-cache bypass is
    measured as configured. The rate excludes the first read and takes half a second: block-layer throttles
    (cgroups) and device caches let a short burst through far above the sustained rate, and a plan made
    from a burst would be wrong for every read after it."""
    total, n = 0, 0
    smallest = None
    i = 0
    t0 = t_first = time.perf_counter()
    first = 0
    while total < min_bytes or n < 4 or time.perf_counter() - t0 < min_seconds:
        layer, expert = keys[i % len(keys)]
        i += 1
        rec = store.record(layer, expert)
        t = time.perf_counter()
        store.read_extent(layer, expert)
        dt = time.perf_counter() - t
        total += rec.length
        n += 1
        if n == 1:
            t_first, first = time.perf_counter(), rec.length
        if smallest is None or rec.length < smallest[0]:
            smallest = (rec.length, dt)
        if time.perf_counter() - t0 > 5 and n >= 4:
            break
    elapsed = time.perf_counter() - t_first
    bps = (total - first) / elapsed if n > 1 and elapsed > 0 else total / (time.perf_counter() - t0)
    latency = max(0.0, smallest[1] - smallest[0] / bps) if smallest else 0.0
    return bps, latency, total


def measure_decode(store, keys: list[tuple[int, int]], min_bytes: int = 64 << 20) -> tuple[float, float]:
    """Decode extents of ``keys`` on the calling thread; returns (full-decode, decompress-only) BF16 bytes/s."""
    from ..codec import decompress_exponents

    extents = [(k, np.array(store.read_extent(*k))) for k in keys[:4]]
    full_t = exp_t = 0.0
    done = 0
    while done < min_bytes or full_t < 0.05:
        for (layer, expert), buf in extents:
            rec = store.record(layer, expert)
            t = time.perf_counter()
            store.decode_extent(layer, expert, buf, threads=1, verify=True)
            full_t += time.perf_counter() - t
            t = time.perf_counter()
            for enc in store.encoded_tensors(layer, expert, buf):
                decompress_exponents(enc, threads=1)
            exp_t += time.perf_counter() - t
            done += rec.original_bytes
        if full_t > 3:
            break
    return done / full_t, done / max(exp_t, 1e-9)
