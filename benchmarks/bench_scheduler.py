"""What the central Scheduler costs per MoE-layer request, and whether that grows with the model.

The runtime's own Scheduler (cache admission, demotion, waves, the layer plan) on the full Qwen1.5-MoE
shape (60 experts of 17.3 MB per layer, top-4) with 4 and 24 MoE layers, replaying a synthetic routing
trace (Zipf skew 1.0, seeded) as the executor would: per layer, one request for the experts not held in
FULL form, their results released with the next request, one step per token. Tasks go to the simulator's
runner (a virtual clock: no I/O, no decoding), so what is timed is the scheduler's own Python, which the
runtime pays on the critical path of every layer that misses. Side by side, in the same run: the cache's
victim search as it was before its heaps (a scan scoring every member: tests/reference_cache.py).

    python benchmarks/bench_scheduler.py [--budget 60%] [--steps 300] [--json OUT]

Prints one summary line; JSON has per shape and implementation the median and p90 per request (ms), the
requests timed, the experts held per form, and the ratio between the shapes (1.0 = does not grow).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.reference_cache

from common import log, machine  # noqa: E402

from zipmoe_ray.cache import Form, ModelLayout  # noqa: E402
from zipmoe_ray.plan.workload import Workload, estimated_sizes  # noqa: E402
from zipmoe_ray.runtime.budget import minimum_budget  # noqa: E402
from zipmoe_ray.runtime.sizes import parse_size  # noqa: E402
from zipmoe_ray.schedule import CostModel  # noqa: E402
from zipmoe_ray.sim.runner import SimRunner  # noqa: E402
from zipmoe_ray.stages.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from zipmoe_ray.trace import synth  # noqa: E402

EXPERT_BYTES = 17_301_504  # Qwen1.5-MoE-A2.7B: 3 x 2048 x 1408 BF16
EXPERTS, TOP_K, WORKERS = 60, 4, 10


def run(layers: int, budget_spec: str, steps: int, scanning: bool) -> dict:
    trace = synth(
        num_layers=layers,
        num_experts=EXPERTS,
        top_k=TOP_K,
        expert_bytes=EXPERT_BYTES,
        prompts=1,
        tokens=steps,
        skew=1.0,
        seed=7,
    )
    w = Workload.from_count_trace(trace)
    sizes = {k: estimated_sizes(EXPERT_BYTES) for k in w.sizes}
    layout = ModelLayout(sizes, TOP_K)
    budget = parse_size(budget_spec, total=layout.expert_bytes)
    runner = SimRunner(sizes, CostModel.nominal(), WORKERS, on_device=True)
    sched = Scheduler(layout, SchedulerConfig(budget=budget, recombine_on_device=True), runner)
    if scanning:
        from tests.reference_cache import ScanningCache

        sched.cache.__class__ = ScanningCache  # same state, the old victim search
    times: list[float] = []
    released: list = []
    for i, step in enumerate([*w.steps, *w.steps]):  # the first pass fills the cache: not timed
        notes = []
        for pos, picks in enumerate(step):
            layer = w.layers[pos]
            form = sched.cache.form
            hits = [(e, t) for e, t in picks if form((layer, e)) == Form.FULL]
            misses = [(e, t) for e, t in picks if form((layer, e)) != Form.FULL]
            if not misses:
                notes += [(layer, e, t) for e, t in hits]
                continue
            while misses:
                t0 = time.perf_counter()
                resp = sched.request(layer, misses, hits, released)
                dt = time.perf_counter() - t0
                if i >= len(w.steps):
                    times.append(dt)
                released = [(layer, d.expert) for d in resp.deliveries]
                misses, hits = resp.deferred, []
        sched.step(notes, released)
        released = []
    held = sched.cache.report()["experts"]
    return {
        "layers": layers,
        "implementation": "scan (before)" if scanning else "heaps (now)",
        "budget": budget,
        "reserve": minimum_budget(sizes, TOP_K),
        "experts_held": held,
        "experts_held_total": sum(held.values()),
        "requests_timed": len(times),
        "median_ms": statistics.median(times) * 1e3,
        "p90_ms": statistics.quantiles(times, n=10)[-1] * 1e3,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="60%", help="share of the routed-expert bytes (default 60%%)")
    ap.add_argument("--steps", type=int, default=300, help="decode steps replayed and timed (default 300)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    rows = []
    for layers in (4, 24):
        for scanning in (False, True):
            r = run(layers, args.budget, args.steps, scanning)
            log(
                f"{layers:2d} layers, {r['implementation']:13s}: median {r['median_ms']:.3f} ms, p90 "
                f"{r['p90_ms']:.3f} ms per request ({r['requests_timed']} requests, "
                f"{r['experts_held_total']} experts held: {r['experts_held']})"
            )
            rows.append(r)
    by = {(r["layers"], r["implementation"]): r for r in rows}
    now, before = "heaps (now)", "scan (before)"
    growth = by[(24, now)]["median_ms"] / by[(4, now)]["median_ms"]
    summary = {
        "median_ms_24_layers": by[(24, now)]["median_ms"],
        "median_ms_24_layers_scan": by[(24, before)]["median_ms"],
        "speedup_24_layers": by[(24, before)]["median_ms"] / by[(24, now)]["median_ms"],
        "growth_4_to_24_layers": growth,
        "growth_4_to_24_layers_scan": by[(24, before)]["median_ms"] / by[(4, before)]["median_ms"],
    }
    print(
        f"scheduler per layer request, Qwen1.5-MoE shape, 24 layers ({by[(24, now)]['experts_held_total']} experts "
        f"held): median {summary['median_ms_24_layers']:.3f} ms (scan before: {summary['median_ms_24_layers_scan']:.3f} "
        f"ms, {summary['speedup_24_layers']:.1f}x); 24 vs 4 layers: {growth:.2f}x "
        f"(scan: {summary['growth_4_to_24_layers_scan']:.2f}x)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(), "summary": summary, "runs": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
