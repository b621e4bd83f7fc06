"""`zipmoe calibrate`: measure this machine into a DeviceProfile.

Micro-measurements (always): exponent decompression and recombination per core on a Qwen-sized expert,
the SSD (sequential reads with the page cache bypassed, and 4 KiB reads for latency) on the store's data
files or a temporary file, the executor's expert application rate (GEMV streaming expert-sized BF16
matrices), memory. With an engine probe and a store, the runtime itself is measured too (``--engine``,
cli/calibrate_engine.py): an all-hit run gives the time per layer outside the experts, per token outside the layers and the
executor's real expert rate; a run under a small budget gives the scheduler round trip, the hand-off per
expert and the decode rate of the lanes while everything else runs, which is what the simulator needs to
predict this machine's engine.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..store.io import aligned_empty
from .profile import DeviceProfile

__all__ = ["calibrate"]

log = logging.getLogger(__name__)


def _codec_rates(seconds: float = 1.0) -> tuple[float, float]:
    import torch

    from ..codec import decompress_exponents, encode, layout_for

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1408 * 2048 * 3, generator=g) * 0.02).to(torch.bfloat16)
    enc = encode(x)
    lay = layout_for(torch.bfloat16)
    exp = np.empty(x.numel(), np.uint8)
    out = np.empty(x.numel(), np.uint16)
    raw = np.asarray(enc.raw)
    n = t_dec = t_rec = 0.0
    while t_dec + t_rec < seconds or n < 3:
        t = time.perf_counter()
        decompress_exponents(enc, out=exp, threads=1)
        t_dec += time.perf_counter() - t
        t = time.perf_counter()
        lay.merge(exp, raw, out, 0, x.numel())
        t_rec += time.perf_counter() - t
        n += 1
    nbytes = n * x.numel() * 2
    return nbytes / t_dec / 1e9, nbytes / t_rec / 1e9


def _ssd(store_path: str | None, seconds: float = 2.0) -> tuple[float, float, str]:
    """(GB/s, latency s, how): 8 MiB sequential reads and 4 KiB random reads of the store's expert files
    (or of a 256 MiB scratch file) through the store's own reader with the page cache bypassed (O_DIRECT
    where possible, else fadvise(DONTNEED); ``how`` says which)."""
    from ..store.format import ALIGN
    from ..store.io import ExtentReader, ReadOptions

    tmp = None
    files = sorted(Path(store_path, "experts").glob("*.zmx")) if store_path else []
    try:
        if not files or sum(f.stat().st_size for f in files) < (64 << 20):
            fd, tmp = tempfile.mkstemp(prefix="zipmoe-calibrate-", dir=os.environ.get("TMPDIR", "/tmp"))
            with os.fdopen(fd, "wb") as f:
                block = os.urandom(1 << 20)
                for _ in range(256):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
            files = [Path(tmp)]
        reader = ExtentReader(str(files[0].parent), ReadOptions(read_mode="bypass"))
        try:
            sized = [(f.name, f.stat().st_size) for f in files]
            chunk = 8 << 20
            buf = aligned_empty(chunk)
            total, t0 = 0, time.perf_counter()
            i = 0
            while time.perf_counter() - t0 < seconds:
                name, size = sized[i % len(sized)]
                for off in range(0, size - chunk + 1, chunk):
                    total += len(reader.read(name, off, chunk, out=buf))
                    if time.perf_counter() - t0 > seconds:
                        break
                i += 1
            gbps = total / (time.perf_counter() - t0) / 1e9
            small = aligned_empty(ALIGN)
            rng = random.Random(0)
            lat = []
            for _ in range(200):
                name, size = sized[rng.randrange(len(sized))]
                off = rng.randrange(0, max(1, size // ALIGN - 1)) * ALIGN  # whole blocks only
                t = time.perf_counter()
                reader.read(name, off, ALIGN, out=small)
                lat.append(time.perf_counter() - t)
            how = reader.mode_in_use
        finally:
            reader.close()
    finally:
        if tmp:
            os.unlink(tmp)
    return gbps, float(np.median(lat)), how


def _executor_gbps(seconds: float = 1.0) -> float:
    import torch

    x = torch.randn(1, 2048).to(torch.bfloat16)
    ws = [(torch.randn(2816, 2048) * 0.02).to(torch.bfloat16) for _ in range(24)]  # 277 MB: beyond caches
    for w in ws:
        torch.mm(x, w.t())
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for w in ws:
            torch.mm(x, w.t())
        n += len(ws)
    return n * ws[0].numel() * 2 / (time.perf_counter() - t0) / 1e9


def _memory() -> int:
    """Physical memory in bytes (raises where the OS cannot say: no guess is written as measured)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


EngineProbe = Callable[[str, int, DeviceProfile], tuple[dict, dict]]


def calibrate(
    store: str | os.PathLike | None = None,
    *,
    engine_probe: EngineProbe | None = None,
    workers: int | None = None,
) -> DeviceProfile:
    """Measure this machine (blocks for a few seconds). ``engine_probe(store, workers, profile)`` measures
    the runtime itself on ``store`` and returns (profile fields, their sources) to overwrite: the CLI's
    ``zipmoe calibrate --engine`` passes ``zipmoe_ray.cli.calibrate_engine.measure_engine`` (about a
    minute). Raises ConfigError for a probe without a store."""
    cores = os.cpu_count() or 1
    workers = workers or cores
    dec, rec = _codec_rates()
    gbps, lat, how = _ssd(str(store) if store else None)
    exe = _executor_gbps()
    accel = _has_accelerator()
    sources = {
        "cpu_cores": "measured: os.cpu_count()",
        "decode_workers": "one decode lane per core (the runtime's default)",
        "decompress_gbps_per_core": "measured: zstd exponent decompression of a Qwen1.5-MoE expert, one thread",
        "recombine_gbps_per_core": "measured: recombination of its planes, one thread",
        "recombine_on_device": "measured: no accelerator" if not accel else "an accelerator is present",
        "ssd_read_gbps": f"measured: 8 MiB reads, page cache bypassed ({how})"
        + (" on the store's files" if store else ""),
        "ssd_latency_s": "measured: median 4 KiB read",
        "executor_gbps": "measured: GEMV over expert-sized BF16 matrices (torch, default threads)",
        "executor_cores": "measured: no accelerator; the executor computes with a torch thread per core "
        "(the engine's default torch_threads)"
        if not accel
        else "an accelerator is present: the executor computes on it",
        "memory_bytes": "measured: physical pages x page size (sysconf)",
    }
    profile = DeviceProfile(
        name=f"calibrated-{os.uname().nodename}",
        cpu_cores=cores,
        decode_workers=workers,
        decompress_gbps_per_core=dec,
        recombine_gbps_per_core=rec,
        recombine_on_device=accel,
        ssd_read_gbps=gbps,
        ssd_latency_s=lat,
        executor_gbps=exe,
        executor_cores=0 if accel else cores,
        memory_bytes=_memory(),
        sources=sources,
    )
    if engine_probe is not None:
        if store is None:
            raise ConfigError("measuring the engine (--engine) needs a store to run: give --store STORE_DIR")
        measured, src = engine_probe(str(store), workers, profile)
        profile = profile.with_(**measured, sources={**sources, **src})
    return profile


def _has_accelerator() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
