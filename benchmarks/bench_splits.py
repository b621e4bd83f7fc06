"""Which split of the cache between forms is fastest on this machine? Explicit splits against the plan.

Question behind it: on a CPU-only machine the cores that decompress are the cores that run the model, so is
zipmoe slower than classic offloading because its planner chose the wrong split, or whatever the split?
Runs the engine (Ray backend, 2 decompressors, page cache bypassed, SSD emulated by the built-in limiter) on
the Qwen1.5-MoE preset with 4 MoE layers (routing skew 0), budget --budget, with: full-lru (uncompressed
store, full BF16 only, LRU), the compressed store with full-only + LRU (misses read compressed and decoded,
hits free), explicit full/compressed shares with LRU, and the planner's own split. A warm-up generation,
then the measured one; tokens must be equal across all.

    python benchmarks/bench_splits.py [--budget 25%] [--bandwidth 0.5] [--new-tokens 16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys

from common import emulated_engine, log, prompt_ids, routed_model, stores_for, warm_then_measure

from zipmoe_ray.cache.split import SplitRule

CONFIGS = {  # name -> (store codec, engine options)
    "full-lru (uncompressed store)": ("none", dict(policy="full-only", popularity="lru")),
    "compressed store, full-only + LRU": ("zstd", dict(policy="full-only", popularity="lru")),
    "full 50% / compressed 50%, LRU": ("zstd", dict(split=SplitRule(0.5, 0.5, 0.0), popularity="lru")),
    "full 30% / compressed 70%, LRU": ("zstd", dict(split=SplitRule(0.3, 0.7, 0.0), popularity="lru")),
    "the planner's split (zipmoe)": ("zstd", dict()),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--bandwidth", type=float, default=0.5, help="emulated SSD GB/s")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args()
    stores = stores_for(routed_model("qwen1.5-moe", 4, 0.0, log=log), log=log)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stores["zstd"])
    prompt, warm = [prompt_ids(tok, args.prompt_tokens, 0)], [prompt_ids(tok, args.prompt_tokens, 25)]
    rows, ref = {}, None
    print(f"budget {args.budget}, SSD {args.bandwidth:g} GB/s, {args.new_tokens} new tokens\n")
    print("| configuration | TPOT | hits full / compressed / SM | disk misses | read | I/O busy |")
    print("|---|---|---|---|---|---|")
    for name, (codec, kw) in CONFIGS.items():
        with emulated_engine(
            stores[codec], args.bandwidth, memory_budget=args.budget, num_decompressors=2, **kw
        ) as e:
            m = warm_then_measure(e, warm, args.new_tokens // 2, prompt, args.new_tokens)
        out, s = m.outputs[0], m.stats
        if ref is None:
            ref = out.token_ids
        if out.token_ids != ref:
            sys.exit(f"{name}: tokens differ from the first configuration's")
        h = s["hits"]
        rows[name] = {k: s[k] for k in ("tpot_s", "ttft_s", "hits", "misses", "bytes_read")}
        print(
            f"| {name} | {s['tpot_s'] * 1e3:.0f} ms | {h['full']} / {h['compressed']} / {h['sm']} | "
            f"{s['misses']['disk']} | {s['bytes_read'] / 1e9:.2f} GB | {s['lanes']['io_utilisation']:.0%} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"budget": args.budget, "bandwidth_gbps": args.bandwidth, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
