"""Simulated scaling over 1, 2 and 4 Jetson AGX Orin devices for a model that does not fit one device.

Model: the Mixtral-8x7B shape (32 MoE layers x 8 experts of 352 MB, top-2, hidden 4096): 90.2 GB of routed
experts, more than an Orin 64 GB holds. Workload: synthetic count traces (8 prompts x 64 tokens) with
per-layer expert popularity Zipf(0.5) and Zipf(1.0), batch 1. Each device gets the same budget, half the
routed-expert bytes (45 GB: with ~3.2 GB of non-expert weights, KV cache and the OS this fills a 64 GB
Orin), so two devices together hold the experts once. Devices are the built-in orin-agx-64gb profile (its
figures and which are estimates: docs/planning.md) joined by 1 GbE (sim/cluster.py: 0.117 GB/s, 0.15 ms,
1 ms per remote call). Placement as the runtime's cluster mode: experts homed round robin, hidden states
sent to the expert's device. One device is shown under zipmoe and under classic offloading (full-lfu,
full-lru); speed-ups are against the best one-device policy.

    python benchmarks/bench_cluster_sim.py [--json OUT] [--png OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from common import log

from zipmoe_ray.plan import Workload, load_profile
from zipmoe_ray.sim import NETWORKS, simulate_cluster
from zipmoe_ray.trace import synth

MIXTRAL = dict(num_layers=32, num_experts=8, top_k=2, expert_bytes=352_321_536)
HIDDEN = 4096
NON_EXPERT_PER_LAYER = (4096 * 4096 * 2 + 4096 * 1024 * 2) * 2  # attention (GQA 8 kv heads) in BF16


def workload(skew: float, prompts: int, tokens: int) -> Workload:
    w = Workload.from_count_trace(synth(**MIXTRAL, prompts=prompts, tokens=tokens, skew=skew, seed=1))
    w.non_expert_bytes_per_layer = NON_EXPERT_PER_LAYER
    for k in w.sizes:  # Mixtral's expert tensors are large: 8 exponent shards each
        w.sizes[k] = dataclasses.replace(w.sizes[k], shards=8)
    return w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="orin-agx-64gb")
    ap.add_argument("--network", default="1gbe", choices=sorted(NETWORKS))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json")
    ap.add_argument("--png")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    out = {"profile": profile.to_json(), "network": dataclasses.asdict(NETWORKS[args.network]), "runs": []}
    print(
        f"Mixtral-8x7B shape, {args.profile}, {args.network}, per-device budget = 50% of the routed-expert bytes\n"
    )
    print("| skew | devices | policy | TPOT | tokens/s | x best 1 device | read / token | network / token | computed remotely | hits full / compressed / SM / disk |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for skew in (0.5, 1.0):
        w = workload(skew, args.prompts, args.tokens)
        per = w.expert_bytes // 2
        runs = [(1, "zipmoe"), (1, "full-lfu"), (1, "full-lru"), (2, "zipmoe"), (4, "zipmoe")]
        res = {}
        for n, policy in runs:
            t0 = time.perf_counter()
            r = simulate_cluster(w, n, per, profile, args.network, policy, hidden_size=HIDDEN)
            res[(n, policy)] = r
            log(f"  skew {skew} {n} x {policy}: {r.tpot_s * 1e3:.0f} ms ({time.perf_counter() - t0:.0f}s)")
            out["runs"].append({"skew": skew, **r.to_json()})
        best1 = max(r.tokens_per_s for (n, _), r in res.items() if n == 1)
        for (n, policy), r in res.items():
            h = r.hit_rates
            print(
                f"| {skew:g} | {n} | {policy} | {r.tpot_s * 1e3:.0f} ms | {r.tokens_per_s:.2f} | "
                f"{r.tokens_per_s / best1:.2f} | {r.bytes_read_per_step / 1e9:.2f} GB | "
                f"{r.network_bytes_per_step / 1e3:.0f} KB | {r.remote_share:.0%} | "
                f"{h['full']:.0%} / {h['compressed']:.0%} / {h['sm']:.0%} / {h['disk']:.0%} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.png:
        plot(out["runs"], args.png, args.profile, args.network)


def plot(runs: list[dict], path: str, profile: str, network: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for skew in sorted({r["skew"] for r in runs}):
        z = [r for r in runs if r["skew"] == skew and r["policy"] == "zipmoe"]
        full = max(r["tokens_per_s"] for r in runs if r["skew"] == skew and r["devices"] == 1)
        ax.plot(
            [r["devices"] for r in z], [r["tokens_per_s"] for r in z], "o-", label=f"zipmoe, Zipf {skew:g}"
        )
        ax.axhline(full, linestyle=":", linewidth=1, color=ax.lines[-1].get_color())
    ax.set_xticks([1, 2, 4])
    ax.set_xlabel("devices (each with 50% of the expert bytes)")
    ax.set_ylabel("simulated tokens/s")
    ax.set_title(f"Mixtral-8x7B shape on {profile} over {network}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
