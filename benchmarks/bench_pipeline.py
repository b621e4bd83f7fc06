"""Pipeline benchmark: zipmoe against classic expert offloading, side by side, on an emulated edge SSD.

Question: under a memory budget of 25% of the expert bytes, with the page cache bypassed and the SSD
emulated at 0.5 GB/s (a 2-core machine's balance of decode throughput to disk bandwidth is then about a
Jetson AGX Orin's at 2 GB/s) and at 2 GB/s, how much faster is a token with zipmoe than with full-BF16
expert offloading, and where does the time go?

Systems (same engine, same Ray pipeline, same budget, same emulated SSD, same prompts):
  * zipmoe: the compressed store, cache forms full / compressed / SM-only, cache-affinity scheduling;
  * full-bf16: an uncompressed store (``zipmoe compress --codec none``) served with the full-only policy:
    full BF16 experts in an LRU-like cache, each miss read uncompressed (classic offloading).
Model: the Qwen1.5-MoE preset (real layer shapes: 60 experts of 17.3 MB, top-4, shared expert, full
vocabulary) cut to --layers MoE layers, random-initialised, with its routers re-biased to a Zipf skew of
--skew (default 0: close to uniform; see routing.py: a random model otherwise routes almost every token to
the same few experts).
Each run: a warm-up generation fills the cache, counters are reset, then --new-tokens tokens are generated
from a --prompt-tokens prompt. Ray overhead per MoE layer: the ray backend minus the local backend on an
all-hit run (budget large enough that every expert stays in full form).

    python benchmarks/bench_pipeline.py [--json OUT] [--layers 4] [--budget 25%] [--bandwidths 0.5,2]
"""

from __future__ import annotations

import argparse
import json
import time

from common import emulated_engine, log, machine, prompt_ids, routed_model, stores_for, warm_then_measure
from timeline import breakdown


def run_system(store, *, budget, policy, bandwidth_gbps, workers, backend, prompt, warm, new_tokens):
    t0 = time.perf_counter()
    with emulated_engine(
        store,
        bandwidth_gbps,
        memory_budget=budget,
        backend=backend,
        num_decompressors=workers,
        policy=policy,
        timeline=True,
    ) as engine:
        start_s = time.perf_counter() - t0
        m = warm_then_measure(engine, warm, new_tokens, prompt, new_tokens)
        out, s = m.outputs, m.stats
        where = breakdown(engine.timeline())
    return {
        "token_ids": out.token_ids,
        "ttft_s": s["ttft_s"],
        "tpot_s": s["tpot_s"],
        "tokens_per_s": s["tokens_per_s"],
        "bytes_read": s["bytes_read"],
        "read_mode": s["read_mode"],
        "hits": s["hits"],
        "misses": s["misses"],
        "hit_rate": s["hit_rate"],
        "io_utilisation": s["lanes"]["io_utilisation"],
        "cpu_utilisation": s["lanes"]["cpu_utilisation"],
        "executor_wait_s": s["executor"]["executor_wait_s"],
        "peak_cache_bytes": s["peak_cache_bytes"],
        "budget": s["budget"],
        "calibration": s["calibration"],
        "start_s": start_s,
        "generation_s": s["generation_s"],
        "effective_gbps": (s["bytes_read"] / s["generation_s"] / 1e9) if s["generation_s"] else 0.0,
        "where_the_time_goes": where,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--bandwidths", default="0.5,2", help="emulated SSD GB/s, comma separated")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--skew", type=float, default=0.0, help="routing skew (Zipf exponent); -1: the random model's own"
    )
    ap.add_argument("--skip-overhead", action="store_true")
    args = ap.parse_args()
    stores = stores_for(
        routed_model("qwen1.5-moe", args.layers, None if args.skew < 0 else args.skew, log=log), log=log
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stores["zstd"])
    prompt = prompt_ids(tok, args.prompt_tokens, 0)
    warm = prompt_ids(tok, args.prompt_tokens, 20)
    results = {
        "machine": machine(),
        "model": f"qwen1.5-moe preset, {args.layers} MoE layers",
        "routing": "the random model's own" if args.skew < 0 else f"re-biased to Zipf skew {args.skew:g}",
        "budget": args.budget,
        "workers": args.workers,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "runs": {},
    }
    for bw in [float(x) for x in args.bandwidths.split(",")]:
        runs = {}
        for name, store, policy in (
            ("zipmoe", stores["zstd"], "zipmoe"),
            ("full-bf16", stores["none"], "full-only"),
        ):
            log(f"{name} at {bw} GB/s ...")
            runs[name] = run_system(
                store, budget=args.budget, policy=policy, bandwidth_gbps=bw, workers=args.workers, backend="ray",
                prompt=prompt, warm=warm, new_tokens=args.new_tokens,
            )  # fmt: skip
            r = runs[name]
            log(f"  where a token's time goes (ms): {r['where_the_time_goes']}")
            log(
                f"  tpot {r['tpot_s'] * 1e3:.0f} ms, ttft {r['ttft_s']:.2f} s, {r['tokens_per_s']:.2f} tok/s, "
                f"read {r['bytes_read'] / 1e6:.0f} MB ({r['read_mode']}), hits {r['hits']}, io busy "
                f"{r['io_utilisation']:.0%}, cpu busy {[f'{c:.0%}' for c in r['cpu_utilisation']]}"
            )
        same = runs["zipmoe"]["token_ids"] == runs["full-bf16"]["token_ids"]
        for r in runs.values():
            r["tokens_match"] = same
        ratio = runs["zipmoe"]["tpot_s"] / runs["full-bf16"]["tpot_s"]
        results["runs"][f"{bw}GB/s"] = {"systems": runs, "tpot_ratio": ratio}
        print(
            f"SSD {bw} GB/s, budget {args.budget}: zipmoe TPOT {runs['zipmoe']['tpot_s'] * 1e3:.0f} ms vs full-bf16 "
            f"{runs['full-bf16']['tpot_s'] * 1e3:.0f} ms ({ratio:.2f}x); tokens identical: {same}"
        )
    if not args.skip_overhead:
        over = {}
        for backend in ("local", "ray"):
            log(f"all-hit run, {backend} backend ...")
            r = run_system(
                stores["zstd"], budget="200%", policy="zipmoe", bandwidth_gbps=None, workers=args.workers,
                backend=backend, prompt=prompt, warm=prompt, new_tokens=16,
            )  # fmt: skip
            over[backend] = r
        per_layer = (over["ray"]["tpot_s"] - over["local"]["tpot_s"]) / args.layers
        results["ray_overhead"] = {
            "tpot_local_s": over["local"]["tpot_s"],
            "tpot_ray_s": over["ray"]["tpot_s"],
            "per_moe_layer_s": per_layer,
            "hits": over["ray"]["hits"],
            "misses": over["ray"]["misses"],
        }
        print(
            f"Ray overhead on an all-hit run: TPOT ray {over['ray']['tpot_s'] * 1e3:.1f} ms vs local "
            f"{over['local']['tpot_s'] * 1e3:.1f} ms = {per_layer * 1e3:.2f} ms per MoE layer"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
