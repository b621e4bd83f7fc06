"""Shared by the benchmarks: cached checkpoints and stores, the prompt set, environment for Ray."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("ZIPMOE_BENCH_CACHE", Path.home() / ".cache" / "zipmoe" / "bench"))


def log(message: str) -> None:
    """Progress for the person running a benchmark: stderr, so that stdout stays the results."""
    print(message, file=sys.stderr, flush=True)


def prompts() -> list[dict]:
    """The benchmark prompt set: ~50 prompts of varied length and topic written for this project."""
    return [json.loads(line) for line in (HERE / "prompts.jsonl").read_text().splitlines() if line.strip()]


def prompt_ids(tokenizer, n_tokens: int, index: int = 0) -> list[int]:
    """Exactly ``n_tokens`` token ids: prompts of the set concatenated from ``index`` and cut."""
    ids: list[int] = []
    ps = prompts()
    i = index
    while len(ids) < n_tokens:
        ids += tokenizer(ps[i % len(ps)]["prompt"] + "\n")["input_ids"]
        i += 1
    return ids[:n_tokens]


def base_model(preset: str, layers: int, seed: int = 0, log=print) -> Path:
    """Build (once, cached in $ZIPMOE_BENCH_CACHE) the random-initialised preset checkpoint."""
    from zipmoe_ray.models.tiny import build_tiny_model

    model = CACHE / f"{preset}-L{layers}-s{seed}" / "model"
    if not (model / "config.json").is_file():
        t0 = time.perf_counter()
        log(f"building the {preset} preset with {layers} MoE layers in {model} ...")
        build_tiny_model(model, preset=preset, layers=layers, seed=seed)
        log(f"  built in {time.perf_counter() - t0:.0f}s")
    return model


def machine() -> dict:
    import torch

    from zipmoe_ray.codec import planes

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "planes": planes.IMPLEMENTATION,  # bit-plane merge: "c" (the extension) or "numpy" (the fallback)
    }


def routed_model(preset: str, layers: int, skew: float | None, seed: int = 0, log=print) -> Path:
    """The preset checkpoint, with routing re-biased to Zipf(~skew) when ``skew`` is not None (see
    routing.py); cached."""
    import torch
    from transformers import AutoTokenizer

    base = base_model(preset, layers, seed, log=log)
    if skew is None:
        return base
    out = base.parent / f"model-skew{skew:g}"
    if (out / "zipmoe-routing.json").is_file():
        return out
    from routing import rebias

    tok = AutoTokenizer.from_pretrained(base)
    batches = [torch.tensor([prompt_ids(tok, 64, i * 3)]) for i in range(8)]
    t0 = time.perf_counter()
    log(f"re-biasing routers of {base.name} to skew {skew:g} ...")
    stats = rebias(base, out, skew, batches, seed)
    log(
        f"  routing before: Zipf fit {stats['before']['mean_zipf_fit']:.2f}, top-5 share "
        f"{stats['before']['mean_top5_share']:.2f}; after: Zipf fit {stats['after']['mean_zipf_fit']:.2f}, "
        f"top-5 share {stats['after']['mean_top5_share']:.2f} ({time.perf_counter() - t0:.0f}s)"
    )
    return out


def stores_for(model: Path, codecs=("zstd", "none"), log=print) -> dict[str, Path]:
    from zipmoe_ray.store import CompressOptions, compress
    from zipmoe_ray.store.format import INDEX_NAME

    out = {"model": model}
    for codec in codecs:
        store = model.parent / f"{model.name}.store-{codec}"
        if not (store / INDEX_NAME).is_file():
            t0 = time.perf_counter()
            log(f"compressing {model.name} with codec {codec} ...")
            compress(model, store, CompressOptions(codec=codec, overwrite=True))
            log(f"  compressed in {time.perf_counter() - t0:.0f}s")
        out[codec] = store
    return out


def padded(batch: list[list[int]], pad: int):
    """Left-padded input ids and attention mask for a decoder-only batch (as the engine pads)."""
    import torch

    n = max(len(x) for x in batch)
    ids = [[pad] * (n - len(x)) + list(x) for x in batch]
    mask = [[0] * (n - len(x)) + [1] * len(x) for x in batch]
    return torch.tensor(ids), torch.tensor(mask)


def emulated_engine(store, bandwidth_gbps: float | None, **engine_kw):
    """A ZipMoEEngine reading ``store`` past the page cache, paced at ``bandwidth_gbps`` (the emulated SSD;
    None: the device's own speed; see storage.py for the kernel-side cap used by bench_e2e)."""
    from zipmoe_ray import ZipMoEEngine

    bandwidth = None if bandwidth_gbps is None else bandwidth_gbps * 1e9
    return ZipMoEEngine(store, read_mode="bypass", bandwidth=bandwidth, **engine_kw)


@dataclass
class Measured:
    outputs: Any  # what engine.generate returned for the measured prompts
    stats: dict  # engine.stats() after them
    generation_s: float  # wall time of the measured generate call
    probe: tuple = (None, None)  # probe() before and after it


def warm_then_measure(engine, warm, warm_tokens: int, prompts, new_tokens: int, probe=None) -> Measured:
    """The measurement every engine benchmark makes: warm the cache on ``warm``, zero the counters, then
    generate ``prompts`` (``probe``, if given, is read just before and after, e.g. a cgroup's bytes read)."""
    engine.generate(warm, warm_tokens)
    engine.reset_stats()
    before = probe() if probe else None
    t = time.perf_counter()
    outputs = engine.generate(prompts, new_tokens)
    generation_s = time.perf_counter() - t
    after = probe() if probe else None
    return Measured(outputs, engine.stats(), generation_s, (before, after))
