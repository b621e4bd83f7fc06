"""What does a disk miss cost, with and without compression, on each backend, in steady state?

Runs our engine with full BF16 experts only and LRU (classic expert offloading's cache; the split the
online re-planning keeps on a 2-core CPU machine, which ranks by its own popularity, LFU by default) over the uncompressed store ("raw": a miss is read and
used as is) and over the zipmoe store ("zstd": a miss is read compressed and decoded), on the local and the
Ray backends, with re-planning off so that nothing but the cache changes between steps. The Qwen1.5-MoE
preset with 4 MoE layers (routing skew 0), page cache bypassed, SSD emulated by the engine's own limiter
(no cgroup throttle: run bench_e2e for that); a warm-up generation on one prompt, then the measured one on
another. Reports per system: TPOT and its ratio to the strongest plain offloader measured (raw-local,
else the first system), bytes read per generated token (prefill included) and the read rate over the generation (GB/s), FULL hits and
disk misses, the per-token breakdown, the median and p90
time from a layer's request to each of its disk misses being ready, and the CPU-seconds and minor page
faults of each process during the measured generation (psutil and /proc, read twice: nothing samples while
it runs). Systems alternate over
``--repeats`` rounds; tokens must be equal everywhere.

    python benchmarks/bench_steady.py [--bandwidth 0.5] [--budget 25%] [--repeats 2] [--no-prefetch] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from common import emulated_engine, log, machine, prompt_ids, routed_model, stores_for
from timeline import breakdown_ms

SYSTEMS = {  # name -> (store codec, backend)
    "raw-local": ("none", "local"),
    "raw-ray": ("none", "ray"),
    "zstd-local": ("zstd", "local"),
    "zstd-ray": ("zstd", "ray"),
}


def process_usage() -> dict[int, tuple[str, float, int]]:
    """CPU seconds (user + system) and minor page faults (Linux; 0 elsewhere) of every process of this user,
    by pid, with a short name."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            c = p.cpu_times()
            name = (p.info["cmdline"] or [p.info["name"]])[0].rsplit("/", 1)[-1][:40]
            out[p.info["pid"]] = (name, c.user + c.system, minor_faults(p.info["pid"]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, or not ours to read
            continue
    return out


def minor_faults(pid: int) -> int:
    """Minor page faults of ``pid`` so far (/proc/PID/stat field 10): a Ray object written to the shared
    object store faults in each of its pages in the writer's address space (~4,200 for a 17 MB expert)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


def miss_latency_ms(events) -> tuple[float | None, float | None]:
    """Median and p90 of the time from a layer's request to each of its disk misses being ready."""
    asked, lat = {}, []
    for t, kind, layer, _expert, extra in events:
        if kind == "request":
            asked[layer] = t
        elif kind == "ready" and extra == "disk" and layer in asked:
            lat.append(t - asked[layer])
    if not lat:
        return None, None
    lat.sort()
    return 1e3 * lat[len(lat) // 2], 1e3 * lat[int(0.9 * (len(lat) - 1))]


def run(store, backend: str, args, warm, prompt) -> dict:
    with emulated_engine(
        store,
        args.bandwidth,
        memory_budget=args.budget,
        backend=backend,
        num_decompressors=2,
        policy="full-only",
        popularity="lru",
        replan_every=0,
        prefetch=not args.no_prefetch,
        timeline=True,
    ) as engine:
        engine.generate([warm], args.warm_tokens)
        engine.reset_stats()
        before = process_usage()
        t = time.perf_counter()
        out = engine.generate([prompt], args.new_tokens)
        wall = time.perf_counter() - t
        after = process_usage()
        s = engine.stats()
        events = engine.timeline()
    used: dict[str, float] = {}
    faults: dict[str, int] = {}
    for pid, (name, sec, flt) in after.items():
        _, sec0, flt0 = before.get(pid, (name, 0.0, 0))
        if sec - sec0 > 0.01:
            used[name] = used.get(name, 0.0) + sec - sec0
        if flt - flt0 > 1000:
            faults[name] = faults.get(name, 0) + flt - flt0
    p50, p90 = miss_latency_ms(events)
    return {
        "token_ids": out[0].token_ids,
        "tpot_ms": 1e3 * s["tpot_s"],
        "full_hits": s["hits"]["full"],
        "disk_misses": s["misses"]["disk"],
        "bytes_read": s["bytes_read"],
        "io_busy_share": s["lanes"]["io_utilisation"],
        "breakdown_ms": breakdown_ms(events),
        "miss_ready_ms": {"p50": p50, "p90": p90},
        "wall_s": wall,
        "cpu_s": dict(sorted(used.items(), key=lambda kv: -kv[1])),
        "minor_faults": dict(sorted(faults.items(), key=lambda kv: -kv[1])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bandwidth", type=float, default=0.5, help="emulated SSD GB/s")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"of {', '.join(SYSTEMS)}")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--warm-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-prefetch", action="store_true", help="the engine's --no-prefetch, for every system")
    ap.add_argument("--json")
    args = ap.parse_args()
    names = [n for n in args.systems.split(",") if n]
    bad = [n for n in names if n not in SYSTEMS]
    if bad:
        sys.exit(f"unknown system(s) {', '.join(bad)}; choose from {', '.join(SYSTEMS)}")
    stores = stores_for(routed_model("qwen1.5-moe", 4, 0.0, log=log), log=log)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stores["zstd"])
    prompt, warm = prompt_ids(tok, args.prompt_tokens, 0), prompt_ids(tok, args.prompt_tokens, 25)
    results: dict[str, list[dict]] = {n: [] for n in names}
    ref = None
    for r in range(args.repeats):
        for name in names:
            codec, backend = SYSTEMS[name]
            log(f"[round {r + 1}] {name} ...")
            res = run(stores[codec], backend, args, warm, prompt)
            ref = ref or res["token_ids"]
            if res["token_ids"] != ref:
                sys.exit(f"{name}: tokens differ from the first system's")
            results[name].append(res)
    print(
        f"\nbudget {args.budget}, SSD {args.bandwidth:g} GB/s (engine limiter), {args.new_tokens} tokens, "
        f"{args.repeats} rounds; tokens identical\n"
    )
    base = "raw-local" if "raw-local" in results else names[0]
    base_tpot = statistics.median(x["tpot_ms"] for x in results[base])
    print(
        f"| system | TPOT | x {base} | read per token, GB/s | FULL hits / disk misses | miss ready p50 / p90 | "
        "per token: waiting / compute / outside MoE | CPU-s (measured generation) | minor page faults (thousands) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        first = runs[0]
        b = first["breakdown_ms"] or {}
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in list(first["cpu_s"].items())[:6])
        flt = ", ".join(f"{k} {v / 1e3:.0f}" for k, v in list(first["minor_faults"].items())[:4]) or "-"
        tpots = ", ".join(f"{x['tpot_ms']:.0f}" for x in runs)
        ratio = statistics.median(x["tpot_ms"] for x in runs) / base_tpot
        per_token = first["bytes_read"] / args.new_tokens
        print(
            f"| {name} | {tpots} ms | {ratio:.2f}x | {per_token / 1e6:.0f} MB, "
            f"{first['bytes_read'] / first['wall_s'] / 1e9:.2f} GB/s | {first['full_hits']} / "
            f"{first['disk_misses']} | {first['miss_ready_ms']['p50']:.0f} / {first['miss_ready_ms']['p90']:.0f} ms"
            f" | {b.get('waiting_for_experts', 0):.0f} / {b.get('expert_compute', 0):.0f} / "
            f"{b.get('outside_moe', 0):.0f} | {sum(first['cpu_s'].values()):.1f} in {first['wall_s']:.1f} s: {cpu} | {flt} |"
        )
    if args.json:
        for runs in results.values():
            for x in runs:
                x.pop("token_ids")
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": vars(args), "systems": results}, f, indent=1)


if __name__ == "__main__":
    main()
