"""Simulated TPOT against memory budget, per policy, on a device we do not have (default: Jetson AGX Orin 64GB).

The trace-driven simulator (zipmoe simulate) replays synthetic count traces of the full Qwen1.5-MoE shape
(24 MoE layers x 60 experts of 17.3 MB, top-4) with expert popularity Zipf(0.5), Zipf(1.0) and Zipf(1.5)
per layer, and any traces recorded from the engine (--recorded), through the runtime's own cache and
scheduler classes, for budgets from 10% to 100% of the routed-expert bytes, under the policies zipmoe
(planned forms + cache-affinity scheduling), full-lru and full-lfu (classic offloading: full BF16 experts,
uncompressed reads) and compressed-only, with the lower bound (sim/bound.py). The LFU baselines (full-lfu,
compressed-only) run with each popularity decay zipmoe's plan chooses between and keep the better. Writes a PNG (one panel per
trace) and JSON, and prints the README table.

    python benchmarks/bench_sim.py [--profile orin-agx-64gb] [--png out.png] [--json out.json] [--recorded t.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from common import log

from zipmoe_ray.plan import Workload, load_profile
from zipmoe_ray.sim import simulate
from zipmoe_ray.sim.simulator import DECAYS
from zipmoe_ray.trace import load_recorded, synth

POLICIES = ("zipmoe", "full-lru", "full-lfu", "compressed-only")
TUNED = ("full-lfu", "compressed-only")
BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
QWEN = dict(num_layers=24, num_experts=60, top_k=4, expert_bytes=17_301_504)


def synthetic(skew: float, prompts: int, tokens: int) -> Workload:
    w = Workload.from_count_trace(synth(**QWEN, prompts=prompts, tokens=tokens, skew=skew, seed=1))
    for k in w.sizes:  # the Qwen shape's tensors have 8 exponent shards each
        w.sizes[k] = dataclasses.replace(w.sizes[k], shards=8)
    return w


def sweep(name: str, w: Workload, profile, budgets, log) -> dict:
    out = {
        "budgets": list(budgets),
        "policies": {p: [] for p in POLICIES},
        "lower_bound": [],
        "offline_bound": [],
    }
    for share in budgets:
        b = int(share * w.expert_bytes)
        t0 = time.perf_counter()
        for p in POLICIES:
            r = simulate(w, b, profile, p)
            if (
                p in TUNED
            ):  # the LFU baselines get the popularity memory that suits them best, as zipmoe's plan does
                r = min(
                    [r, *(simulate(w, b, profile, p, decay=d, bound=False) for d in DECAYS[1:])],
                    key=lambda x: x.tpot_s,
                )
            out["policies"][p].append(r.tpot_s)
            if p == "zipmoe":
                out.setdefault("plans", []).append(r.plan["chosen"] if r.plan else None)
                out["lower_bound"].append(r.lower_bound_tpot_s)
                out["offline_bound"].append(r.offline_lower_bound_tpot_s)
        log(f"  {name} {share:.0%}: " + ", ".join(f"{p} {out['policies'][p][-1] * 1e3:.0f}" for p in POLICIES)
            + f", bound {out['lower_bound'][-1] * 1e3:.0f} ms ({time.perf_counter() - t0:.0f}s)")  # fmt: skip
    return out


def plot(results: dict, path: str, profile_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    styles = {"zipmoe": "o-", "full-lru": "s--", "full-lfu": "^--", "compressed-only": "d:"}
    for ax, (name, r) in zip(axes[0], results.items()):
        x = [b * 100 for b in r["budgets"]]
        for p in POLICIES:
            ax.plot(x, [t * 1e3 for t in r["policies"][p]], styles[p], label=p, markersize=4)
        ax.plot(x, [t * 1e3 for t in r["lower_bound"]], "k-", linewidth=1, label="lower bound")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("budget (% of routed-expert bytes)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("simulated TPOT (ms)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"zipmoe simulate on {profile_name}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="orin-agx-64gb")
    ap.add_argument("--png", default="bench-results/sim-tpot.png")
    ap.add_argument("--json")
    ap.add_argument("--recorded", action="append", default=[], help="a zipmoe-trace/1 file (repeatable)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="three budgets only")
    ap.add_argument("--reuse", help="a previous run's --json: keep its panels, compute only the missing ones")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    budgets = (0.1, 0.25, 0.5) if args.quick else BUDGETS
    results = {}
    if args.reuse:
        with open(args.reuse) as f:
            results.update(json.load(f)["results"])
    for skew in (0.5, 1.0, 1.5):
        if f"Qwen1.5-MoE, Zipf {skew:g}" in results:
            continue
        results[f"Qwen1.5-MoE, Zipf {skew:g}"] = sweep(
            f"skew {skew:g}", synthetic(skew, args.prompts, args.tokens), profile, budgets, log
        )
    for path in args.recorded:
        w = Workload.from_recorded(load_recorded(path))
        for k in w.sizes:
            w.sizes[k] = dataclasses.replace(w.sizes[k], shards=8)
        results[f"recorded: {path.rsplit('/', 1)[-1]}"] = sweep(path, w, profile, budgets, log)
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)  # bench-results/ is not in a fresh clone
        plot(results, args.png, profile.name)
    print(
        "| trace | budget | zipmoe | full-lru | full-lfu | compressed-only | lower bound | zipmoe / best full | zipmoe / bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for i, b in enumerate(r["budgets"]):
            if b not in (0.1, 0.25, 0.3, 0.5, 1.0):
                continue
            t = {p: r["policies"][p][i] for p in POLICIES}
            best = min(t["full-lru"], t["full-lfu"])
            print(
                f"| {name} | {b:.0%} | " + " | ".join(f"{t[p] * 1e3:.0f} ms" for p in POLICIES)
                + f" | {r['lower_bound'][i] * 1e3:.0f} ms | {t['zipmoe'] / best:.2f} | {t['zipmoe'] / r['lower_bound'][i]:.2f} |"
            )  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"profile": profile.to_json(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
