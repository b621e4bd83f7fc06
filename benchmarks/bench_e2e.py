"""End to end, side by side: zipmoe against what users would run instead, on an emulated edge SSD.

Systems, run one after another in one invocation on the same prompts, each in its own child process:
  * transformers: plain transformers with every weight in memory (the floor; budget and SSD do not apply);
  * accelerate-disk: transformers with an Accelerate ``device_map`` putting on "disk" the experts of the
    layers beyond floor(budget x layers), dropped from the page cache before every step (e2e/hf.py);
  * llama.cpp: the ``xllamacpp`` wheel's llama.cpp (prebuilt CPU build, its server API in process) on a BF16
    GGUF of the same checkpoint, memory-mapped, in a memory cgroup capped at its non-expert bytes + the
    budget + ``--llamacpp-allowance`` (e2e/llamacpp.py, e2e/convert.py); its tokens may differ (numerics);
  * full-lru / full-lru-local: our engine on an uncompressed store, full BF16 experts only, LRU (classic
    expert offloading), Ray and local backends;
  * zipmoe-local / zipmoe-ray: our engine, compressed store, planned cache forms, local and Ray backends.
Storage: every system reads from the same disk inside a fresh cgroup per system whose block-I/O throttle is
set to the emulated bandwidth, around its whole process tree (storage.py; needs root): memory-mapped faults,
O_DIRECT reads and Ray's worker processes are all capped, and the cgroup counts the bytes really read. That
throttle works in 100 ms slices and lets a read of up to a slice's worth (50 MB at 0.5 GB/s) through at
full disk speed after a pause, which a real SSD cannot do; the engines therefore also pace their own reads
with their built-in limiter (exactly the emulated rate, no bursts) and bypass the page cache with O_DIRECT,
while Accelerate and llama.cpp, which memory-map, have only the throttle: the emulation errs in their favour.
Without root there is no throttle, and the output says so.
Memory: peak memory is the kernel's own counter of the system's cgroup, read once at the end (nothing
samples a running system; e2e/runner.py says what it counts and the fallback without root).
Model: a preset with real layer shapes cut to --layers MoE layers (default 4: Qwen1.5-MoE 60 experts of
17.3 MB, top-4, about 5.5 GB; DeepSeek-V2-Lite 64 experts of 17.3 MB, top-6, first layer dense),
random-initialised, routers re-biased to Zipf skew --skew (default 0, close to uniform; see routing.py).
Prompts from prompts.jsonl. Each system: load, a short warm-up generation (fills caches), then the measured
generation. Metrics: TTFT, TPOT, tokens/s, peak memory, bytes read from the disk and per token, expert GB/s
delivered (bytes of the experts the model used / generation time), hit rates per cache form; for engine
systems the per-token breakdown (``breakdown_ms``), the I/O lane's busy share, prefetch counters where the
engine has them, and ``ray_overhead_ms_per_layer`` from all-hit runs (e2e/engines.py). Every system's
tokens are compared with the floor's.

    sudo python benchmarks/bench_e2e.py --quick --json OUT          # < 5 min: Qwen, 25%, 0.5 GB/s, batch 1
    sudo python benchmarks/bench_e2e.py --json OUT --png PLOT       # the full matrix (hours)
    sudo python benchmarks/bench_e2e.py --gpu --json OUT            # CUDA executor; skipped without a GPU
    python benchmarks/bench_e2e.py --combine A.json B.json --png P  # one table and plot from several runs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from e2e.engines import ALL_HIT_BUDGET, ENGINES, local_twin, paired_overhead, ray_overhead_ms_per_layer
from e2e.hf import _device_map, run_hf  # noqa: F401  (tests use both from here)
from e2e.report import SYSTEMS, figures, fmt_bytes, plot, summary_table, table

QUICK_SYSTEMS = ("transformers", "accelerate-disk", "full-lru", "zipmoe-local", "zipmoe-ray")
HF_SYSTEMS = ("transformers", "accelerate-disk")


def child(spec: dict) -> None:
    """One system, one configuration, in this (child) process; its JSON result on the last stdout line."""
    import common  # noqa: F401  (Ray and HF environment)
    from e2e.probe import Probe

    probe = Probe(spec.get("cgroup"))
    if spec["system"] in HF_SYSTEMS:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)  # as the engine's executor does (set here: run_hf is
        res = run_hf(spec, probe)  # also called inside the test process, whose torch it must not reconfigure)
    elif spec["system"] == "llama.cpp":
        from e2e.llamacpp import run_llamacpp

        res = run_llamacpp(spec, probe)
    else:
        from e2e.engines import run_engine

        res = run_engine(spec, probe)
    res["memory_at_end"] = probe.memory  # charged to the cgroup by kind when the measurement ended
    print(json.dumps(res, default=str), flush=True)


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="Qwen, 25%%, 0.5 GB/s, batch 1, 16 tokens (<5 min)")
    ap.add_argument(
        "--gpu", action="store_true", help="CUDA executor (skipped without a GPU); implies --quick"
    )
    ap.add_argument("--json")
    ap.add_argument("--png")
    ap.add_argument("--presets", default="qwen1.5-moe,deepseek-v2-lite")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--budgets", default="10%,25%,50%,100%")
    ap.add_argument("--bandwidths", default="0.5,2", help="emulated SSD GB/s, comma separated")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--systems", help=f"comma separated, of {', '.join(SYSTEMS)} (default: all; --quick: "
                    f"{', '.join(QUICK_SYSTEMS)})")  # fmt: skip
    ap.add_argument("--no-all-hit", action="store_true", help="skip the all-hit runs (Ray overhead per layer; "
                    "--quick skips them too)")  # fmt: skip
    ap.add_argument("--all-hit-rounds", type=int, default=3, help="pairs of all-hit runs (Ray, local twin) per Ray "
                    "system; the overhead is their median")  # fmt: skip
    ap.add_argument("--llamacpp-allowance", default="512MB",
                    help="llama.cpp's memory cap is its non-expert bytes + the budget + this (runtime, buffers)")  # fmt: skip
    ap.add_argument(
        "--skew", type=float, default=0.0, help="routing skew (Zipf exponent); -1: the model's own"
    )
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decompressor lanes")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--warm-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per system run")
    ap.add_argument(
        "--combine", nargs="+", metavar="JSON", help="merge earlier runs' JSON: one table, one plot"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.all_hit_rounds < 1:
        ap.error(f"--all-hit-rounds must be at least 1, got {args.all_hit_rounds}")
    return args


def _emulation(cache: Path) -> tuple[str, str, bool]:
    """(storage emulation, memory method, whether cgroups exist), from one trial cgroup removed at once."""
    from e2e.runner import memory_method
    from storage import open_system_cgroup

    cg, why = open_system_cgroup(cache, f"zipmoe-bench-{os.getpid()}-probe")
    try:
        if cg and cg.io:
            emulation = (
                f"cgroup v{cg.io.version} block-I/O read cap on disk {cg.io.device} around each system's process "
                "tree (lets a 100 ms slice's worth through in a burst after a pause); engines also pace reads "
                "with their built-in limiter and read with O_DIRECT; Accelerate's offload files dropped from the "
                "page cache before every forward step"
            )
        else:
            emulation = (
                f"NOT the same storage for every system ({why}): engines pace reads with their built-in "
                "limiter, Accelerate and llama.cpp read the disk at full speed (no llama.cpp memory cap)"
            )
        return emulation, memory_method(cg), bool(cg and cg.memory)
    finally:
        if cg:
            cg.remove()


class Bench:
    """One invocation's runs: the child runs of every system, the checks against the floor, the results."""

    def __init__(self, args, cache: Path, have_cgroups: bool):
        from zipmoe_ray.runtime.sizes import parse_size

        self.args, self.cache, self.cgroups = args, cache, have_cgroups
        self.allowance = parse_size(args.llamacpp_allowance, what="--llamacpp-allowance")

    def run(self, spec: dict, bw: float | None, drop: list[str], memory_limit: int | None = None) -> dict:
        from common import log
        from e2e.runner import run_child

        return run_child(spec, cache=self.cache, bandwidth_bps=bw and bw * 1e9, memory_limit=memory_limit,
                         drop=drop, log=log, timeout=self.args.timeout)  # fmt: skip

    def system(self, base: dict, name: str, budget: str, bw: float, gguf: dict | None) -> dict:
        """One system at one configuration (``gguf``: the llama.cpp file and its layout, or an error)."""
        frac = float(budget.rstrip("%")) / 100
        spec = {**base, "system": name, "budget": budget, "bandwidth_gbps": bw, "budget_frac": frac}
        if name in HF_SYSTEMS:
            return self.run(spec, bw, [base["model"]])
        if name in ENGINES:
            return self.run(spec, bw, [base["stores"][ENGINES[name][0]]])
        if not gguf or "error" in gguf:
            return {"error": (gguf or {}).get("error", "no GGUF")}
        lay = gguf["layout"]
        limit = lay["non_expert_bytes"] + int(frac * lay["expert_bytes"]) + self.allowance
        if not self.cgroups:
            limit = None  # no cap without a memory cgroup (the emulation line says so)
        r = self.run({**spec, "gguf": gguf["path"]}, bw, [gguf["path"]], limit)
        if limit is None:  # said in the result too, not only in the output's emulation line
            return {**r, "memory_allowance_bytes": None, "memory_cap": "none: no memory cgroup (needs root)"}
        return {**r, "memory_allowance_bytes": self.allowance}

    def all_hit(self, base: dict, systems: list[str], bw: float, rounds: int) -> dict:
        """Ray overhead per MoE layer for every Ray engine system, from ``rounds`` pairs of all-hit runs of it
        and its local twin, back to back, the order alternating (e2e/engines.py, paired_overhead)."""
        from common import log

        out = {}
        for name in [s for s in systems if s in ENGINES and local_twin(s)]:
            twin, pairs, err = local_twin(name), [], None
            hits, match, layers = [], True, 0
            for i in range(rounds):
                runs = {}
                for sys_name in (name, twin) if i % 2 == 0 else (twin, name):
                    log(
                        f"[{base['preset']}, all hits, budget {ALL_HIT_BUDGET}, round {i + 1}/{rounds}] {sys_name} ..."
                    )
                    spec = {
                        **base,
                        "system": sys_name,
                        "budget": ALL_HIT_BUDGET,
                        "bandwidth_gbps": bw,
                        "all_hit": True,
                    }
                    runs[sys_name] = self.run(spec, bw, [base["stores"][ENGINES[sys_name][0]]])
                ray, loc = runs[name], runs[twin]
                if "error" in ray or "error" in loc:
                    err = ray.get("error") or loc.get("error")
                    break
                pairs.append((ray["tpot_s"], loc["tpot_s"]))
                hits.append((ray["hit_rate"]["any"], loc["hit_rate"]["any"]))
                match = match and ray["token_ids"] == loc["token_ids"]
                layers = ray["moe_layers"]
                log(f"  {name}: TPOT {ray['tpot_s'] * 1e3:.1f} ms against {loc['tpot_s'] * 1e3:.1f} ms local, hit rates "
                    f"{hits[-1][0]:.0%} / {hits[-1][1]:.0%}: "
                    f"{ray_overhead_ms_per_layer(*pairs[-1], layers):.2f} ms per MoE layer")  # fmt: skip
            if err is not None:
                out[name] = {"error": err, "ms_per_layer": None}
                continue
            o = paired_overhead(pairs, layers)
            out[name] = {**o, "rounds": rounds, "local_system": twin, "moe_layers": layers, "budget": ALL_HIT_BUDGET,
                         "hit_rate_ray": min(h for h, _ in hits), "hit_rate_local": min(h for _, h in hits),
                         "tokens_match": match}  # fmt: skip
        return out


def _check(r: dict, floor: dict, name: str, overhead: dict) -> None:
    """Add what is known only against the floor and the all-hit runs, and log the system's line."""
    from common import log

    if "error" in r:
        log(f"  failed: {r['error']}")
        return
    r["tokens_match"] = r["token_ids"] == floor["token_ids"]
    ntok = sum(len(x) for x in r["token_ids"])
    r["bytes_read_per_token"] = r["bytes_read"] / ntok if r.get("bytes_read") is not None and ntok else None
    if name in ENGINES:
        r["ray_overhead_ms_per_layer"] = overhead.get(name, {}).get("ms_per_layer")
    extra = ""
    if r.get("breakdown_ms"):
        extra += ", per token (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in r["breakdown_ms"].items())
    if r.get("io_busy_share") is not None:
        extra += f", I/O lane busy {r['io_busy_share']:.0%}"
    if r.get("prefetch_recall") is not None:
        extra += f", prefetch recall {r['prefetch_recall']:.0%}"
    if r.get("replan"):
        rp = r["replan"]
        steps = ", ".join(f"{n} {v * 1e3:.0f} ms" for n, v in rp["step_s"].items()) or "no round completed"
        extra += f", split at the end: {rp['in_use']} (median decode step: {steps})"
    if r.get("memory_limit_bytes"):
        extra += f", memory cap {fmt_bytes(r['memory_limit_bytes'])} (reached {r['memory_limit_hits']} times)"
    per_tok = r["bytes_read_per_token"]
    log(f"  TPOT {r['tpot_s'] * 1e3:.0f} ms, TTFT {r['ttft_s']:.2f} s, {r['tokens_per_s']:.2f} tok/s, read "
        f"{fmt_bytes(r['bytes_read'])} ({fmt_bytes(per_tok)} per token), peak {fmt_bytes(r.get('peak_memory_bytes'))}, "
        f"tokens match: {r['tokens_match']}{extra}")  # fmt: skip


def _gguf(model: Path) -> dict:
    from common import log
    from e2e import convert

    try:
        path = convert.convert(model, log=log)
        return {"path": str(path), "layout": convert.layout(path)}
    except Exception as e:  # reported as llama.cpp's error; the other systems still run
        return {"error": f"{type(e).__name__}: {e}"}


def main() -> None:
    args = _parse()
    if args.child:
        child(json.loads(args.child))
        return
    if args.combine:
        runs = [r for f in args.combine for r in json.loads(Path(f).read_text())["runs"]]
        print(summary_table(runs) + "\n")
        for line in figures(runs):
            print(line)
        if args.png:
            plot(runs, args.png)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))  # run the clean-up below
    from common import CACHE, log, machine, prompt_ids, routed_model, stores_for

    device = "cpu"
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            log("skipped: --gpu needs a CUDA device and torch.cuda.is_available() is False here")
            if args.json:
                Path(args.json).write_text(json.dumps({"skipped": "no CUDA device", "systems": {}}))
            return
        device = "cuda"
    quick = args.quick or args.gpu
    if quick:
        args.presets, args.budgets, args.bandwidths = "qwen1.5-moe", "25%", "0.5"
        args.batches = "1,8" if args.gpu else "1"
        args.new_tokens, args.prompt_tokens, args.warm_tokens = 16, 16, 8
    systems = [s for s in (args.systems or ",".join(QUICK_SYSTEMS if quick else SYSTEMS)).split(",") if s]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        sys.exit(f"unknown system(s) {', '.join(bad)}; choose from {', '.join(SYSTEMS)}")
    # transformers always runs, once per preset and batch: the reference every system's tokens are checked against
    systems = [s for s in systems if s != "transformers"]
    budgets = [b.strip() for b in args.budgets.split(",")]
    if any(not b.endswith("%") for b in budgets):
        sys.exit(f"budgets are percentages of the routed-expert bytes, got {args.budgets!r}")
    bandwidths = [float(x) for x in args.bandwidths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]

    CACHE.mkdir(parents=True, exist_ok=True)
    emulation, memory, have_cgroups = _emulation(CACHE)
    log(f"storage emulation: {emulation}\npeak memory: {memory}")
    from transformers import AutoTokenizer

    bench = Bench(args, CACHE, have_cgroups)
    settings = {
        k: getattr(args, k) for k in ("layers", "prompt_tokens", "new_tokens", "warm_tokens", "workers")
    }
    settings.update(device=device, llamacpp_allowance_bytes=bench.allowance,
                    routing="the random model's own" if args.skew < 0 else f"re-biased to Zipf skew {args.skew:g}")  # fmt: skip
    results = {"machine": machine(), "emulation": emulation, "memory": memory, "settings": settings,
               "runs": [], "ray_overhead": {}}  # fmt: skip
    offload = CACHE / f"offload-{os.getpid()}"
    try:
        for preset in args.presets.split(","):
            model = routed_model(preset, args.layers, None if args.skew < 0 else args.skew, log=log)
            stores = stores_for(model, log=log)
            gguf = _gguf(model) if "llama.cpp" in systems else None
            tok = AutoTokenizer.from_pretrained(model)
            for batch in batches:
                prompts = [prompt_ids(tok, args.prompt_tokens, 3 * i) for i in range(batch)]
                warm = [prompt_ids(tok, args.prompt_tokens, 25 + 3 * i) for i in range(batch)]
                base = dict(
                    preset=preset, model=str(model), stores={k: str(v) for k, v in stores.items()}, prompts=prompts,
                    warm=warm, new_tokens=args.new_tokens, warm_tokens=args.warm_tokens, device=device,
                    workers=args.workers, offload_dir=str(offload),
                )  # fmt: skip
                if batch == batches[0] and not (quick or args.no_all_hit):
                    results["ray_overhead"][preset] = bench.all_hit(
                        base, systems, bandwidths[0], args.all_hit_rounds
                    )
                overhead = results["ray_overhead"].get(preset, {})
                log(f"[{preset}, batch {batch}] transformers (in memory) ...")
                floor = bench.run({**base, "system": "transformers"}, None, [str(model)])
                if "error" in floor:
                    sys.exit(f"the transformers floor failed ({floor['error']}); nothing to compare against")
                _check(floor, floor, "transformers", overhead)
                for bw in bandwidths:
                    for budget in budgets:
                        run = {"preset": preset, "layers": args.layers, "budget": budget,
                               "bandwidth_gbps": bw, "batch": batch, "systems": {"transformers": floor}}  # fmt: skip
                        for name in systems:
                            log(f"[{preset}, batch {batch}, {bw:g} GB/s, {budget}] {name} ...")
                            r = bench.system(base, name, budget, bw, gguf)
                            _check(r, floor, name, overhead)
                            run["systems"][name] = r
                        used = floor.get("expert_bytes_used")  # the same tokens route the same way ...
                        for r in run["systems"].values():
                            if (
                                used is not None and r.get("generation_s") and r.get("tokens_match")
                            ):  # ... only
                                r["expert_gbps"] = used / r["generation_s"] / 1e9
                        results["runs"].append(run)
                        print(table(run) + "\n", flush=True)
    finally:
        import shutil

        shutil.rmtree(offload, ignore_errors=True)
    results["figures"] = figures(results["runs"], results["ray_overhead"])
    for line in results["figures"]:
        print(line)
    # "systems": the one configuration of a single-configuration run (--quick), else the headline one
    runs = results["runs"]
    key = ("25%", 0.5, 1)
    headline = (
        runs[0]
        if len(runs) == 1
        else next((r for r in runs if (r["budget"], r["bandwidth_gbps"], r["batch"]) == key), None)
    )
    results["systems"] = headline["systems"] if headline else {}
    results["systems_config"] = (
        {k: headline[k] for k in ("preset", "budget", "bandwidth_gbps", "batch")} if headline else None
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.png and results["runs"]:
        plot(results["runs"], args.png)


if __name__ == "__main__":
    main()
