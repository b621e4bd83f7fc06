"""Our engine as benchmarked systems, and the all-hit runs that measure what Ray costs per MoE layer.

    full-lru        uncompressed store, full BF16 experts only, LRU, Ray backend (classic expert offloading,
                    as MoE-Infinity and mixtral-offloading do)
    full-lru-local  the same on the local backend (threads in one process): the strongest plain offloader
    zipmoe-local    compressed store, planned cache forms, LFU-like popularity, local backend
    zipmoe-ray      the same on the Ray backend (its default lanes: threads of the executor on one node)
    zipmoe-ray-actors  the same with every lane an actor, planes through the object store (--lanes actors)

Every engine system reads its store past the page cache (O_DIRECT), paced by its own limiter at the
emulated bandwidth, inside the same cgroup throttle as the other systems (storage.py).
"""

from __future__ import annotations

import statistics
import time

ENGINES = {  # system -> (store codec, policy, popularity, backend)
    "full-lru": ("none", "full-only", "lru", "ray"),
    "full-lru-local": ("none", "full-only", "lru", "local"),
    "zipmoe-local": ("zstd", "zipmoe", "lfu", "local"),
    "zipmoe-ray": ("zstd", "zipmoe", "lfu", "ray"),
    "zipmoe-ray-actors": ("zstd", "zipmoe", "lfu", "ray"),
}
LANES = {"zipmoe-ray-actors": "actors"}  # system -> EngineConfig.lanes where not the default ("auto")
ALL_HIT_BUDGET = "150%"  # every expert FULL, with room to spare for the staging reserve


def local_twin(system: str) -> str | None:
    """The engine system that differs from ``system`` only by the local backend (None if it is local)."""
    codec, policy, popularity, backend = ENGINES[system]
    if backend == "local":
        return None
    return next(n for n, e in ENGINES.items() if e == (codec, policy, popularity, "local"))


def ray_overhead_ms_per_layer(tpot_ray_s: float, tpot_local_s: float, moe_layers: int) -> float:
    """What the Ray backend costs per MoE layer and generated token, from two all-hit runs.

    Both runs are the same system (store, policy, popularity) at a budget that holds every expert
    (``ALL_HIT_BUDGET``), warmed on the very prompts and token count they are then measured on, so that the
    measured generation reads nothing and every expert use is a FULL hit (each run reports its hit rate):
    what remains between the two backends is the control path (actor calls, task submissions, object
    store), which the local backend does with direct calls on threads of one process. Defined as
    (TPOT of the Ray run - TPOT of the local run) / MoE layers, in milliseconds; negative when the Ray run
    was the faster (noise: one run each)."""
    if moe_layers < 1:
        raise ValueError(f"moe_layers must be at least 1, got {moe_layers}")
    return 1e3 * (tpot_ray_s - tpot_local_s) / moe_layers


def paired_overhead(pairs: list[tuple[float, float]], moe_layers: int) -> dict:
    """The Ray overhead per MoE layer from ``pairs`` of (Ray TPOT, local TPOT), each pair run back to back:
    the median of the pairs' overheads (this machine's load moves a run's TPOT by more than the overhead
    itself between runs minutes apart; a pair shares its minutes), with every pair's value and the median
    TPOTs."""
    if not pairs:
        raise ValueError("no pairs of all-hit runs")
    per_pair = [ray_overhead_ms_per_layer(r, loc, moe_layers) for r, loc in pairs]
    return {
        "ms_per_layer": statistics.median(per_pair),
        "ms_per_layer_rounds": per_pair,
        "tpot_ray_s": statistics.median(r for r, _ in pairs),
        "tpot_local_s": statistics.median(loc for _, loc in pairs),
    }


def run_engine(spec: dict, bytes_read=lambda: None) -> dict:
    """Start ``spec["system"]``'s engine, warm it, measure ``spec["prompts"]``. With ``spec["all_hit"]`` the
    warm-up is the measured prompts themselves (see :func:`ray_overhead_ms_per_layer`). Blocks."""
    from common import emulated_engine, warm_then_measure
    from timeline import breakdown, breakdown_ms

    codec, policy, popularity, backend = ENGINES[spec["system"]]
    warm, warm_tokens = spec["warm"], spec["warm_tokens"]
    if spec.get("all_hit"):
        warm, warm_tokens = spec["prompts"], spec["new_tokens"]
    t0 = time.perf_counter()
    with emulated_engine(
        spec["stores"][codec],
        spec["bandwidth_gbps"],  # strict pacing; the cgroup cap alone lets bursts through
        memory_budget=spec["budget"],
        device=spec["device"],
        backend=backend,
        lanes=LANES.get(spec["system"], "auto"),
        num_decompressors=spec["workers"],
        policy=policy,
        popularity=popularity,
        timeline=True,
    ) as engine:
        load_s = time.perf_counter() - t0
        m = warm_then_measure(engine, warm, warm_tokens, spec["prompts"], spec["new_tokens"], bytes_read)
        outs, s, gen_s, (io0, io1) = m.outputs, m.stats, m.generation_s, m.probe
        events = engine.timeline()
        per_expert = engine.expert_bytes / len(engine.sizes)
        moe_layers = len({layer for layer, _ in engine.sizes})
    uses = sum(s["hits"].values()) + s["misses"]["disk"]
    rows = [o.token_ids for o in outs]
    res = {
        "token_ids": rows,
        "load_s": load_s,
        "generation_s": gen_s,
        "ttft_s": s["ttft_s"],
        "tpot_s": s["tpot_s"],
        "tokens_per_s": sum(len(r) for r in rows) / gen_s,
        "bytes_read": None if io0 is None else io1 - io0,  # from the disk, as for the other systems
        "expert_bytes_read": s["bytes_read"],
        "expert_bytes_requested": uses * per_expert,  # hits + misses: counts a re-requested expert again
        "hits": s["hits"],
        "misses": s["misses"],
        "hit_rate": {**s["hit_rate"], "any": sum(s["hits"].values()) / uses if uses else 0.0},
        "io_busy_share": s["lanes"]["io_utilisation"],
        "cpu_utilisation": s["lanes"]["cpu_utilisation"],
        "peak_cache_bytes": s["peak_cache_bytes"],
        "budget_bytes": s["budget"],
        "non_expert_bytes": s.get("non_expert_bytes"),
        "moe_layers": moe_layers,
        "split": {k: v for k, v in s["split"].items() if k in ("full", "compressed", "sm", "source")},
        "calibration": s["calibration"],
        "breakdown_ms": breakdown_ms(events),  # per token: round trips, waits, expert compute, the rest
        "timeline_token_ms": breakdown(events).get("token_ms"),
    }
    # the pipelined runtime's prediction counters ({"predicted", "used", "recall", "precision",
    # "wasted_bytes", ...}) where the engine reports them; null where it does not (nothing is made up)
    prefetch = s.get("prefetch")
    res["prefetch"] = prefetch
    res["prefetch_recall"] = prefetch.get("recall") if isinstance(prefetch, dict) else None
    # online re-planning (schedule/split_tuner.py): the split in use at the end and the last round's median
    # decode step per candidate; null where the engine does not re-plan
    res["replan"] = s.get("replan")
    return res
