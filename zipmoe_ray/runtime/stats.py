"""``ZipMoEEngine.stats()``: one report from what each stage counts (scheduler, executor, lanes per node).

Pure dictionaries in, one dictionary out; the keys are what ``zipmoe generate --json`` prints under
``stats`` (README, Generating) and what the benchmarks read.
"""

from __future__ import annotations

from typing import Any

__all__ = ["engine_stats"]

_SCHEDULER_KEYS = ("requests", "waves", "steps", "background_tasks", "planned_makespan_s")


def engine_stats(
    *,
    sched: dict,
    executor: dict,
    lanes,
    last,
    budget: int,
    expert_bytes: int,
    generation_s: float,
    costs: dict,
    split_source: str,
    plan_counts: dict | None,
    backend: str,
) -> dict[str, Any]:
    """``lanes``: backends.LaneStats; ``last``: the last GenerateResult (None before any)."""
    loaders, decs = lanes.loaders, lanes.decompressors
    wall = generation_s or 1e-9
    busy_io = max(x["busy_s"] for x in loaders)
    return {
        "ttft_s": last.ttft_s if last else None,
        "tpot_s": last.tpot_s if last else None,
        "tokens_per_s": last.tokens_per_s if last else None,
        "budget": budget,
        "expert_bytes": expert_bytes,
        "peak_cache_bytes": sched["cache"]["peak"],
        "hits": sched["hits"],
        "misses": {"disk": sched["misses"]},
        "hit_rate": sched["hit_rate"],
        "miss_rate": sched["miss_rate"],
        "bytes_read": sum(x["bytes_read"] for x in loaders),
        "read_mode": loaders[0]["read_mode"],
        "read_options": loaders[0]["read_options"],
        "lanes": {
            "io_utilisation": min(1.0, busy_io / wall),
            "cpu_utilisation": [min(1.0, d["busy_s"] / wall) for d in decs],
            "workers": len(decs),
            "decoded_bytes": sum(d["decoded_bytes"] for d in decs),
            "decode_busy_s": sum(d["busy_s"] for d in decs),
        },
        "split": {**sched["plan"], "source": split_source, "plan": plan_counts},
        # online re-planning (schedule/split_tuner.py): the split in use, the last round's median decode
        # step per candidate; None when off (a fixed split, a baseline policy, replan_every=0, a cluster)
        "replan": sched.get("replan"),
        "cache": sched["cache"],
        "scheduler": {k: sched[k] for k in _SCHEDULER_KEYS},
        "executor": executor,
        "non_expert_bytes": executor["non_expert_bytes"],
        "calibration": costs,
        "backend": backend,
        "generation_s": generation_s,
        "nodes": lanes.nodes,
        "prefetch": prefetch_stats(executor.get("prefetch"), sched),
    }


def prefetch_stats(client: dict | None, sched: dict) -> dict[str, Any] | None:
    """Cross-layer prefetch, per run: experts predicted (and asked for ahead of their layer's routing),
    issued (fetched ahead: what the prefetch aside allowed), used (the layer routed to them), ``recall``
    (of the experts layers needed from outside the executor's full copies, the share that was on its way
    before the layer routed), ``precision`` (of those issued, the share used), bytes read ahead and bytes
    read that were never used. None without prefetch."""
    if not client:
        return None
    issued = sched.get("prefetch_issued", 0)  # what the scheduler started (what the prefetch aside allowed)
    return {
        **client,
        "issued": issued,
        "precision": client["used"] / issued if issued else None,
        "bytes_read": sched.get("prefetch_bytes_read", 0),
        "wasted_bytes": sched.get("prefetch_wasted_bytes", 0),
    }
