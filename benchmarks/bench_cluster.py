"""Two nodes with half the budget each against one node with the whole budget, on a real Ray cluster.

Both configurations run on the same 2-node Ray cluster built on this machine (each node a network
namespace, see tests/cluster/netns_cluster.py; needs root): once restricted to the head (`--nodes edge0`, the whole
budget on one node) and once across both nodes (the same budget split equally). Model: the Qwen1.5-MoE
preset with 4 MoE layers (60 experts of 17.3 MB per layer, top-4), routing re-biased to skew 0
(benchmarks/routing.py); each node reads the store through its own emulated SSD (a bandwidth cap per
loader: two devices, two SSDs), page cache bypassed. A warm-up generation, then a measured one of 32
tokens after a 32-token prompt; tokens must match between the two. Reports hit rates per form, disk
misses, bytes read and TPOT (both nodes share this machine's 2 cores, so TPOT is not what two devices
would give; the simulated scaling is benchmarks/bench_cluster_sim.py).

    sudo python benchmarks/bench_cluster.py [--budget 25%] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # for tests.cluster.netns_cluster


def driver(args) -> None:
    """Runs inside the head's namespace: one configuration, JSON on stdout."""
    from common import (  # sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for one-node benchmarks ...
        emulated_engine,
        prompt_ids,
        warm_then_measure,
    )

    os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # ... which would refuse this cluster
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.store)
    warm, prompt = prompt_ids(tok, 32, 20), prompt_ids(tok, 32, 0)
    with emulated_engine(
        args.store,
        args.bandwidth,
        memory_budget=args.budget,
        address=args.address,
        nodes=tuple(args.nodes.split(",")) if args.nodes else None,
        num_decompressors=1,
    ) as engine:
        m = warm_then_measure(engine, warm, 24, prompt, args.new_tokens)
    out, st = m.outputs, m.stats
    keep = ("tpot_s", "ttft_s", "hits", "misses", "hit_rate", "miss_rate", "bytes_read", "budget", "nodes")
    print(json.dumps({"token_ids": out.token_ids, **{k: st[k] for k in keep}}, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--bandwidth", type=float, default=0.5, help="emulated SSD GB/s per node")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json")
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--nodes", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        driver(args)
        return
    from common import log, machine, routed_model, stores_for

    from tests.cluster.netns_cluster import NetnsCluster, unavailable

    why = unavailable()
    if why:
        sys.exit(f"bench_cluster needs network namespaces: {why}")
    store = stores_for(routed_model("qwen1.5-moe", 4, 0.0, log=log), codecs=("zstd",), log=log)["zstd"]
    rows = {}
    with NetnsCluster(nodes=2, cpus=1) as cluster:
        for name, nodes in (("1 node, whole budget", "edge0"), ("2 nodes, half each", "")):
            log(f"running: {name} ...")
            argv = [sys.executable, __file__, "--driver", "--store", str(store), "--address", cluster.address]
            argv += ["--budget", args.budget, "--bandwidth", str(args.bandwidth)]
            argv += ["--new-tokens", str(args.new_tokens)] + (["--nodes", nodes] if nodes else [])
            r = subprocess.run(
                cluster.exec_cmd(0, argv), capture_output=True, text=True, env=cluster.env(), cwd=str(HERE)
            )
            if r.returncode != 0:
                sys.exit(f"{name} failed:\n{r.stderr[-4000:]}")
            rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
    a, b = rows.values()
    same = a["token_ids"] == b["token_ids"]
    if not same:
        sys.exit(f"tokens differ between the configurations: {a['token_ids']} vs {b['token_ids']}")
    print(
        f"budget {args.budget} of the routed-expert bytes, SSD {args.bandwidth} GB/s per node; tokens identical: {same}"
    )
    print("| configuration | hits full / compressed / SM | disk misses | hit rate | bytes read | TPOT |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        h = r["hits"]
        print(
            f"| {name} | {h['full']} / {h['compressed']} / {h['sm']} | {r['misses']['disk']} | "
            f"{1 - r['miss_rate']:.1%} | {r['bytes_read'] / 1e9:.2f} GB | {r['tpot_s'] * 1e3:.0f} ms |"
        )
    for name, r in rows.items():
        for node, n in r["nodes"].items():
            log(
                f"  {name}: {node}: tasks {n['tasks']}, computes {n['computes']}, read {n['bytes_read'] / 1e9:.2f} GB"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(), "rows": rows, "tokens_identical": same}, indent=2)
        )


if __name__ == "__main__":
    main()
