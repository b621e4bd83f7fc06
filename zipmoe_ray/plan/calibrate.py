"""`zipmoe calibrate`: measure this machine into a DeviceProfile.

Micro-measurements (always): exponent decompression and recombination per core on a Qwen-sized expert,
the SSD (sequential reads with the page cache bypassed, and 4 KiB reads for latency) on the store's data
files or a temporary file, the executor's expert application rate (GEMV streaming expert-sized BF16
matrices), memory. With ``engine=True`` and a store, the runtime itself is measured too (``--engine``):
an all-hit run gives the time per layer outside the experts, per token outside the layers and the
executor's real expert rate; a run under a small budget gives the scheduler round trip, the hand-off per
expert and the decode rate of the lanes while everything else runs, which is what the simulator needs to
predict this machine's engine.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

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
        reader = ExtentReader(str(files[0].parent), ReadOptions(cache="bypass"))
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


def _engine(store: str, workers: int, base: DeviceProfile) -> tuple[dict, dict]:
    """Measure the runtime on ``store`` (Ray backend): an all-hit run and a run under a small budget."""
    from ..engine import ZipMoEEngine

    prompt = [3 + (i * 7) % 200 for i in range(32)]
    out, src = {}, {}
    before = os.environ.get("ZIPMOE_TIMELINE")
    os.environ["ZIPMOE_TIMELINE"] = "1"  # read when the engine starts; not left on for later engines
    try:
        with ZipMoEEngine(store, memory_budget="200%", backend="ray", num_decompressors=workers) as e:
            e.generate(prompt, 16)
            e.generate(prompt, 16)  # everything resident now
            e.reset_stats()
            e.generate(prompt, 16)
            tl = e.timeline()
            expert_bytes = max(s.full for s in e.sizes.values())
            layers = len(e.store.layers())
    finally:
        if before is None:
            os.environ.pop("ZIPMOE_TIMELINE", None)
        else:
            os.environ["ZIPMOE_TIMELINE"] = before
    steps = [t for t, k, *_ in tl if k == "step"]
    moe, n_experts, layer_t = 0.0, 0, None
    for t, kind, _layer, x, _ in tl:
        if steps and (t < steps[0] or t > steps[-1]):
            continue
        if kind == "layer":
            layer_t = t
            n_experts += x
        elif kind == "layer_done" and layer_t is not None:
            moe += t - layer_t
    nsteps = max(1, len(steps) - 1)
    total = steps[-1] - steps[0] if len(steps) > 1 else 0.0
    per_token_outside = (total - moe) / nsteps
    out["executor_gbps"] = n_experts * expert_bytes / max(moe, 1e-9) / 1e9
    src["executor_gbps"] = "measured: the engine applying resident experts (all-hit run)"
    # split the time outside MoE layers into per layer and per token with the base profile's estimate of
    # a layer's non-expert work (4 expert sizes): what the simulator would otherwise assume
    out["non_moe_s_per_layer"] = min(
        per_token_outside / layers, 4 * expert_bytes / (out["executor_gbps"] * 1e9)
    )
    out["non_moe_s_per_token"] = max(0.0, per_token_outside - layers * out["non_moe_s_per_layer"])
    src["non_moe_s_per_layer"] = "measured: time outside MoE layers in an all-hit run, per layer"
    src["non_moe_s_per_token"] = "measured: the rest of that time, per token (embeddings, lm_head, sampling)"
    with ZipMoEEngine(store, memory_budget="15%", backend="ray", num_decompressors=workers) as e:
        e.generate(prompt, 16)
        e.reset_stats()
        e.generate(prompt, 24)
        tl = e.timeline()
        st = e.stats()
    reqs = [b[0] - a[0] for a, b in itertools.pairwise(tl) if a[1] == "request" and b[1] == "response"]
    if reqs:
        out["request_overhead_s"] = float(np.median(reqs))
        src["request_overhead_s"] = "measured: scheduler round trip per layer (request to response)"
    lanes = st["lanes"]
    if lanes["decode_busy_s"] > 0 and lanes["decoded_bytes"] > 0:
        observed = lanes["decoded_bytes"] / lanes["decode_busy_s"] / 1e9
        scale = observed / base.decode_gbps_per_core
        out["decompress_gbps_per_core"] = base.decompress_gbps_per_core * scale
        out["recombine_gbps_per_core"] = base.recombine_gbps_per_core * scale
        src["decompress_gbps_per_core"] = src["recombine_gbps_per_core"] = (
            f"measured: decode lanes in the engine ({observed:.2f} GB/s per lane while the model runs beside them)"
        )
    out["delivery_overhead_s"] = 1.0e-3
    src["delivery_overhead_s"] = (
        "estimate: object-store hand-off and ray.wait per expert seen in Ray timelines here"
    )
    return out, src


def calibrate(
    store: str | os.PathLike | None = None, *, engine: bool = False, workers: int | None = None
) -> DeviceProfile:
    """Measure this machine (blocks for a few seconds; with ``engine`` about a minute)."""
    cores = os.cpu_count() or 1
    workers = workers or cores
    dec, rec = _codec_rates()
    gbps, lat, how = _ssd(str(store) if store else None)
    exe = _executor_gbps()
    sources = {
        "cpu_cores": "measured: os.cpu_count()",
        "decode_workers": "one decode lane per core (the runtime's default)",
        "decompress_gbps_per_core": "measured: zstd exponent decompression of a Qwen1.5-MoE expert, one thread",
        "recombine_gbps_per_core": "measured: recombination of its planes, one thread",
        "recombine_on_device": "measured: no accelerator"
        if not _has_accelerator()
        else "an accelerator is present",
        "ssd_read_gbps": f"measured: 8 MiB reads, page cache bypassed ({how})"
        + (" on the store's files" if store else ""),
        "ssd_latency_s": "measured: median 4 KiB read",
        "executor_gbps": "measured: GEMV over expert-sized BF16 matrices (torch, default threads)",
        "memory_bytes": "measured: physical pages x page size (sysconf)",
    }
    profile = DeviceProfile(
        name=f"calibrated-{os.uname().nodename}",
        cpu_cores=cores,
        decode_workers=workers,
        decompress_gbps_per_core=dec,
        recombine_gbps_per_core=rec,
        recombine_on_device=_has_accelerator(),
        ssd_read_gbps=gbps,
        ssd_latency_s=lat,
        executor_gbps=exe,
        memory_bytes=_memory(),
        sources=sources,
    )
    if engine:
        if store is None:
            raise ValueError("--engine needs --store")
        measured, src = _engine(str(store), workers, profile)
        profile = profile.with_(**measured, sources={**sources, **src})
    return profile


def _has_accelerator() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
