"""Where a wide batch's time goes: the serving benchmark's 8-client level in one process, profiled.

Question: when the requests of bench_serve.py run as one batch, what keeps the step from being bound by the
SSD alone? Same model, store and engine settings as bench_serve.py (the Qwen1.5-MoE preset cut to --layers
MoE layers, the model's own routing, Ray backend, 2 decode lanes, budget 25% of the routed-expert bytes,
page cache bypassed, SSD emulated at 0.5 GB/s, nominal costs), without the HTTP server: the warm-up prompt,
then the --requests prompts one at a time (so that the online re-planning and the cache are where the
server's one-at-a-time level leaves them), then all of them as one batch, recorded with ``timeline=True``.

Reported for the batch, beside its tokens/s against the one-at-a-time run of the same engine:
  * the bytes read and the SSD's busy share (the emulated device's booked intervals:
    ``ZipMoEEngine.read_timeline()``), and where the SSD idles (benchmarks/timeline.py, ``device_idle``):
    in the prefill, and in the decode steps at a MoE layer's start (before its first read), between its
    reads, at its end (after its last read), in layers that read nothing, between layers and at step
    boundaries;
  * the executor's time per decode step (``breakdown_ms``: scheduler round trips, waiting for experts,
    expert compute, outside the MoE layers);
  * CPU seconds per process over the batch (psutil, when installed), against the machine's cores;
  * the engine's counters (hits per form, misses, prefetch).

    flock /work/bench.lock python benchmarks/profile_wide_batch.py [--json OUT] [--budget 25%] [--bandwidth 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from common import emulated_engine, log, machine, prompt_ids, routed_model, stores_for
from timeline import breakdown_ms, device_idle


def cpu_seconds() -> dict[int, tuple[str, float]] | None:
    """pid -> (process name, user + system CPU seconds) of every process on the machine (None without
    psutil): the batch's share is the difference of two readings."""
    try:
        import psutil
    except ImportError:
        return None
    out = {}
    for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        info = p.info
        try:
            t = info["cpu_times"]
            name = (info["cmdline"] or [info["name"]])[0]
            out[p.pid] = (os.path.basename(name) if "/" in name else name, t.user + t.system)
        except (TypeError, IndexError, AttributeError):
            continue  # gone, or not ours to read
    return out


def cpu_by_process(before, after) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    by: dict[str, float] = {}
    for pid, (name, t) in after.items():
        by[name] = by.get(name, 0.0) + t - before.get(pid, (name, 0.0))[1]
    return dict(sorted(((k, v) for k, v in by.items() if v >= 0.05), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--preset", default="qwen1.5-moe")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--bandwidth", type=float, default=0.5, help="emulated SSD, GB/s")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--backend", default="ray", choices=("ray", "local"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    model = routed_model(args.preset, args.layers, None, log=log)
    store = stores_for(model, codecs=("zstd",), log=log)["zstd"]
    tok = AutoTokenizer.from_pretrained(store)
    warm = prompt_ids(tok, args.prompt_tokens, 40)
    prompts = [prompt_ids(tok, args.prompt_tokens, 3 * i) for i in range(args.requests)]
    tokens = args.requests * args.new_tokens
    engine = emulated_engine(
        store,
        args.bandwidth,
        memory_budget=args.budget,
        backend=args.backend,
        num_decompressors=args.workers,
        calibrate=False,
        timeline=True,
    )
    try:
        engine.generate(warm, args.new_tokens)
        log(f"{args.requests} requests one at a time ...")
        t = time.perf_counter()
        for p in prompts:
            engine.generate(p, args.new_tokens)
        solo_s = time.perf_counter() - t
        log(f"  {tokens / solo_s:.2f} tok/s; then all {args.requests} as one batch ...")
        engine.reset_stats()
        cpu0 = cpu_seconds()
        start, t = time.time(), time.perf_counter()
        engine.generate(prompts, args.new_tokens)
        batch_s, end = time.perf_counter() - t, time.time()
        cpu1 = cpu_seconds()
        stats, events, reads = engine.stats(), engine.timeline(), engine.read_timeline()
    finally:
        engine.close()
    idle = device_idle(events, reads, start, end)
    cpu = cpu_by_process(cpu0, cpu1)
    out = {
        "machine": machine(),
        "settings": {**vars(args), "store": str(store)},
        "one_at_a_time_tokens_per_s": tokens / solo_s,
        "batch_tokens_per_s": tokens / batch_s,
        "batch_over_one_at_a_time": solo_s / batch_s,
        "batch_s": batch_s,
        "bytes_read": stats["bytes_read"],
        "read_gbps": stats["bytes_read"] / batch_s / 1e9,
        "ssd": idle,
        "decode_step_ms": breakdown_ms(events),
        "cpu_s": cpu,
        "cpu_available_s": (os.cpu_count() or 1) * batch_s,
        "hits": stats["hits"],
        "misses": stats["misses"],
        "prefetch": stats["prefetch"],
        "split": (stats.get("replan") or {}).get("in_use"),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(
        f"one at a time {out['one_at_a_time_tokens_per_s']:.2f} tok/s; batch of {args.requests} "
        f"{out['batch_tokens_per_s']:.2f} tok/s ({out['batch_over_one_at_a_time']:.2f}x) in {batch_s:.1f} s, "
        f"{stats['bytes_read'] / 1e9:.2f} GB read ({out['read_gbps']:.2f} GB/s against {args.bandwidth} emulated)"
    )
    print(
        f"SSD busy {idle['busy_s']:.1f} s of {idle['window_s']:.1f} ({idle['busy_s'] / idle['window_s']:.0%}); "
        f"prefill {idle['prefill_s']:.1f} s, SSD idle {idle['prefill_idle_s']:.2f} s; decode {idle['decode_s']:.1f} s, "
        f"SSD idle {idle['decode_idle_s']:.2f} s:"
    )
    for k, v in idle["decode_idle"].items():
        print(f"  {k:22s} {v:6.2f} s")
    if out["decode_step_ms"]:
        print("decode step, ms: " + ", ".join(f"{k} {v:.0f}" for k, v in out["decode_step_ms"].items()))
    if cpu is None:
        print("CPU per process: not measured (psutil is not installed: scripts/install.sh --bench)")
    else:
        used = sum(cpu.values())
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(cpu.items())[:4])
        print(
            f"CPU {used:.1f} core-s of {out['cpu_available_s']:.1f} ({used / out['cpu_available_s']:.0%}): {top}"
        )


if __name__ == "__main__":
    main()
