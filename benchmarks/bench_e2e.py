"""End to end, side by side: zipmoe against what users would run instead, on an emulated edge SSD.

Systems, run one after another in one invocation on the same prompts, each in its own child process:
  * transformers: plain transformers with every weight in memory (the floor; budget and SSD do not apply);
  * accelerate-disk: transformers with an explicit Accelerate ``device_map`` that puts the routed experts of
    the layers that do not fit the budget on "disk" (``offload_folder``). transformers 5 keeps a layer's
    experts as one fused tensor pair, so Accelerate can only offload whole layers' experts: it keeps
    floor(budget x layers) layers' experts resident (0 of 4 at 10%, 1 at 25%, 2 at 50%). Offloaded tensors
    are memory-mapped from the offload folder; their pages are dropped from the page cache (fsync +
    ``posix_fadvise(DONTNEED)``) before every forward step, so each step really reads the storage;
  * full-lru: our engine on an uncompressed store (``--codec none``), full BF16 experts only, LRU
    (classic expert offloading, as MoE-Infinity and mixtral-offloading do);
  * zipmoe-local / zipmoe-ray: our engine, compressed store, planned cache forms, local and Ray backends.
Storage: every system reads from the same disk inside a cgroup block-I/O throttle set to the emulated SSD
bandwidth, around its whole process tree (storage.py; needs root): memory-mapped faults, O_DIRECT reads and
Ray's worker processes are all capped, and the cgroup counts the bytes really read. That throttle works in
100 ms slices and lets a read of up to a slice's worth (50 MB at 0.5 GB/s) through at full disk speed
after a pause, which a real SSD cannot do; the engines therefore also pace their own reads with their
built-in limiter (exactly the emulated rate, no bursts) and bypass the page cache with O_DIRECT, while
Accelerate, which memory-maps, has only the throttle: the emulation errs in Accelerate's favour. Without
root there is no throttle: Accelerate then reads the disk at full speed, and the output says so.
Model: a preset with real layer shapes cut to --layers MoE layers (default 4: Qwen1.5-MoE 60 experts of
17.3 MB, top-4, about 5.5 GB; DeepSeek-V2-Lite 64 experts of 17.3 MB, top-6, first layer dense),
random-initialised, routers re-biased to Zipf skew --skew (default 0, close to uniform; a random router
otherwise sends almost every token to the same few experts; see routing.py). Prompts from prompts.jsonl.
Each system: load, a short warm-up generation (fills caches), then the measured generation. Metrics: TTFT,
TPOT, tokens/s (all sequences), peak memory of every process involved (sum of PSS over the process tree,
sampled every 0.25 s: shared pages such as Ray's object store count once), bytes read from the disk
(cgroup counter), expert GB/s delivered (bytes of the experts the model used / generation time), hit rates
per cache form. Every system's tokens are compared with the floor's.

    sudo python benchmarks/bench_e2e.py --quick --json OUT          # < 5 min: Qwen, 25%, 0.5 GB/s, batch 1
    sudo python benchmarks/bench_e2e.py --json OUT --png PLOT       # the full matrix (hours)
    sudo python benchmarks/bench_e2e.py --gpu --json OUT            # CUDA executor; skipped without a GPU
    python benchmarks/bench_e2e.py --combine A.json B.json --png P  # one table and plot from several runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEMS = ("transformers", "accelerate-disk", "full-lru", "zipmoe-local", "zipmoe-ray")
ENGINES = {  # system -> (store codec, policy, popularity, backend)
    "full-lru": ("none", "full-only", "lru", "ray"),
    "zipmoe-local": ("zstd", "zipmoe", "lfu", "local"),
    "zipmoe-ray": ("zstd", "zipmoe", "lfu", "ray"),
}
PRESET_LABEL = {"qwen1.5-moe": "Qwen1.5-MoE", "deepseek-v2-lite": "DeepSeek-V2-Lite"}


# ------------------------------------------------------------------------------------------------------------
# child side: one system, one configuration; JSON on the last stdout line
# ------------------------------------------------------------------------------------------------------------
class _Steps:
    """A StoppingCriteria that only records when each step's tokens exist (as the engine's executor does)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kw):
        import torch

        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _cgroup_bytes(spec) -> int | None:
    if not spec.get("cgroup"):
        return None
    from storage import Throttle

    c = spec["cgroup"]
    return Throttle(Path(c["path"]), c["version"], c["device"]).bytes_read()


def _trim(row: list[int], eos) -> list[int]:
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def _drop_pages(files: list[str]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _expert_modules(model) -> list[str]:
    """Names of the modules holding a layer's routed experts (fused or a ModuleList), in layer order."""
    return [
        n
        for n, m in model.named_modules()
        if n.endswith(".mlp.experts") and any(True for _ in m.parameters())
    ]


def _device_map(model_dir: str, resident: float, exec_device) -> tuple[dict, int, int]:
    """An explicit device_map: every module with weights on ``exec_device``, except the experts of the layers
    beyond floor(resident x MoE layers), which go to "disk"."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    experts = _expert_modules(meta)
    keep = math.floor(resident * len(experts) + 1e-9)
    offload = set(experts[keep:])
    dm = {}
    for name, mod in meta.named_modules():
        if any(name == o or name.startswith(o + ".") for o in offload):
            if name in offload:
                dm[name] = "disk"
            continue
        if any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
            dm[name] = exec_device
    return dm, keep, len(experts)


class _ExpertUse:
    """Counts the bytes of the routed experts a model uses: per forward step and MoE layer, the distinct
    experts that received tokens (what any offloading system must have in memory for that step)."""

    def __init__(self, model):
        self.active, self.bytes_used = False, 0
        for name in _expert_modules(model):
            mod = model.get_submodule(name)
            n = getattr(mod, "num_experts", None) or len(mod)
            per = sum(p.numel() * p.element_size() for p in mod.parameters()) / n
            mod.register_forward_pre_hook(self._hook(per), with_kwargs=True)

    def _hook(self, per_expert: float):
        def hook(mod, args, kwargs):
            if self.active:
                idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
                self.bytes_used += int(idx.unique().numel() * per_expert)

        return hook


def run_hf(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteriaList

    from zipmoe_ray.models.hf import quiet_transformers

    device = spec["device"]
    t0 = time.perf_counter()
    offload_dir = None
    extra: dict = {}
    with quiet_transformers():
        if spec["system"] == "transformers":
            model = (
                AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16).eval().to(device)
            )
        else:
            exec_device = 0 if device.startswith("cuda") else "cpu"
            dm, keep, n = _device_map(spec["model"], spec["budget_frac"], exec_device)
            offload_dir = spec["offload_dir"]
            shutil.rmtree(offload_dir, ignore_errors=True)
            model = AutoModelForCausalLM.from_pretrained(
                spec["model"], dtype=torch.bfloat16, device_map=dm, offload_folder=offload_dir
            ).eval()
            extra = {"resident_layers": keep, "moe_layers": n, "offloaded_layers": n - keep}
    files = [str(p) for p in Path(offload_dir).rglob("*") if p.is_file()] if offload_dir else []
    if files:
        os.sync()  # written pages must be clean before the kernel will drop them
        _drop_pages(files)
        model.register_forward_pre_hook(lambda mod, args: _drop_pages(files))
        extra["offloaded_bytes"] = sum(os.path.getsize(f) for f in files)
    load_s = time.perf_counter() - t0
    counter = _ExpertUse(model) if spec["system"] == "transformers" else None
    from common import padded

    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else (eos or 0)

    def gen(batch, n):
        ids, mask = padded(batch, pad)
        steps = _Steps()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, do_sample=False,
                stopping_criteria=StoppingCriteriaList([steps]),
            )  # fmt: skip
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t_end = time.perf_counter()
        rows = [_trim(r, model.generation_config.eos_token_id) for r in out[:, ids.shape[1] :].tolist()]
        return rows, t, t_end, steps.times

    gen(spec["warm"], spec["warm_tokens"])
    io0 = _cgroup_bytes(spec)
    if counter:
        counter.active = True
    rows, t, t_end, times = gen(spec["prompts"], spec["new_tokens"])
    io1 = _cgroup_bytes(spec)
    if counter:
        extra["expert_bytes_used"] = counter.bytes_used
    ntok = sum(len(r) for r in rows)
    res = {
        "token_ids": rows,
        "load_s": load_s,
        "generation_s": t_end - t,
        "ttft_s": times[0] - t,
        "tpot_s": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0,
        "tokens_per_s": ntok / (t_end - t),
        "bytes_read": None if io0 is None else io1 - io0,
        "hit_rate": None,
        **extra,
    }
    if offload_dir:
        shutil.rmtree(offload_dir, ignore_errors=True)
    return res


def run_engine(spec: dict) -> dict:
    from common import emulated_engine, warm_then_measure
    from timeline import breakdown

    codec, policy, popularity, backend = ENGINES[spec["system"]]
    t0 = time.perf_counter()
    with emulated_engine(
        spec["stores"][codec],
        spec["bandwidth_gbps"],  # strict pacing; the cgroup cap alone lets bursts through
        memory_budget=spec["budget"],
        device=spec["device"],
        backend=backend,
        num_decompressors=spec["workers"],
        policy=policy,
        popularity=popularity,
        timeline=True,
    ) as engine:
        load_s = time.perf_counter() - t0
        m = warm_then_measure(
            engine,
            spec["warm"],
            spec["warm_tokens"],
            spec["prompts"],
            spec["new_tokens"],
            lambda: _cgroup_bytes(spec),
        )
        outs, s, gen_s, (io0, io1) = m.outputs, m.stats, m.generation_s, m.probe
        where = breakdown(engine.timeline())
        per_expert = engine.expert_bytes / len(engine.sizes)
    uses = sum(s["hits"].values()) + s["misses"]["disk"]
    rows = [o.token_ids for o in outs]
    return {
        "token_ids": rows,
        "load_s": load_s,
        "generation_s": gen_s,
        "ttft_s": s["ttft_s"],
        "tpot_s": s["tpot_s"],
        "tokens_per_s": sum(len(r) for r in rows) / gen_s,
        "bytes_read": None if io0 is None else io1 - io0,  # from the disk, as for the other systems
        "expert_bytes_read": s["bytes_read"],
        "expert_bytes_requested": uses * per_expert,  # hits + misses: counts a re-requested expert again
        "hits": s["hits"],
        "misses": s["misses"],
        "hit_rate": {**s["hit_rate"], "any": sum(s["hits"].values()) / uses if uses else 0.0},
        "io_utilisation": s["lanes"]["io_utilisation"],
        "cpu_utilisation": s["lanes"]["cpu_utilisation"],
        "peak_cache_bytes": s["peak_cache_bytes"],
        "budget_bytes": s["budget"],
        "split": {k: v for k, v in s["split"].items() if k in ("full", "compressed", "sm", "source")},
        "calibration": s["calibration"],
        "where_the_time_goes_ms": where,
    }


def child(spec: dict) -> None:
    import common  # noqa: F401  (Ray and HF environment)

    if spec["system"] in ("transformers", "accelerate-disk"):
        import torch

        torch.set_num_threads(os.cpu_count() or 1)  # as the engine's executor does (set here: run_hf is
        res = run_hf(spec)  # also called inside the test process, whose torch it must not reconfigure)
    else:
        res = run_engine(spec)
    print(json.dumps(res, default=str), flush=True)


# ------------------------------------------------------------------------------------------------------------
# parent side
# ------------------------------------------------------------------------------------------------------------
class PeakMemory(threading.Thread):
    """Peak of the summed PSS over a process tree (and the cgroup's processes), sampled."""

    def __init__(self, pid: int, throttle, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.throttle, self.interval = pid, throttle, interval
        self.peak = 0
        self._halt = threading.Event()

    def _sample(self) -> int:
        import psutil

        pids = set(self.throttle.pids()) if self.throttle else set()
        try:
            root = psutil.Process(self.pid)
            pids |= {root.pid, *(c.pid for c in root.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
        total = 0
        for pid in pids:
            with contextlib.suppress(psutil.Error, OSError):
                total += psutil.Process(pid).memory_full_info().pss
        return total

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, self._sample())
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def run_child(spec: dict, throttle, log, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True,
        preexec_fn=throttle.join if throttle else None,
    )  # fmt: skip
    mem = PeakMemory(proc.pid, throttle)
    mem.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        log(f"  {spec['system']} timed out after {timeout:.0f}s")
    finally:
        peak = mem.stop()
        if throttle:
            throttle.kill_all()  # anything the child left behind (Ray processes are in its cgroup)
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}", "peak_rss_bytes": peak}
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_bytes"] = peak
    return res


def fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def hit_cell(name: str, r: dict, floor: str) -> str:
    """Share of expert uses served from a cache (engines), resident layers (Accelerate), or ``floor``."""
    if r.get("hit_rate"):
        return f"{r['hit_rate']['any']:.0%}"
    if name == "accelerate-disk":
        return f"{r['resident_layers']}/{r['moe_layers']} layers resident"
    return floor


def table(run: dict) -> str:
    lines = [
        f"**{PRESET_LABEL.get(run['preset'], run['preset'])} preset, {run['layers']} MoE layers, budget "
        f"{run['budget']}, SSD {run['bandwidth_gbps']:g} GB/s, batch {run['batch']}**",
        "",
        "| system | TTFT | TPOT | tokens/s | x zipmoe-ray TPOT | peak memory | read from disk | expert GB/s "
        "| hit rate | tokens match |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    z = run["systems"].get("zipmoe-ray", {}).get("tpot_s")
    for name, r in run["systems"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | | | | |")
            continue
        hr = hit_cell(name, r, "all resident")
        rel = f"{z / r['tpot_s']:.2f}" if z and r["tpot_s"] else "-"
        gbps = f"{r['expert_gbps']:.2f}" if r.get("expert_gbps") is not None else "-"
        lines.append(
            f"| {name} | {r['ttft_s']:.2f} s | {r['tpot_s'] * 1e3:.0f} ms | {r['tokens_per_s']:.2f} | {rel} | "
            f"{fmt_bytes(r['peak_rss_bytes'])} | {fmt_bytes(r['bytes_read'])} | {gbps} | {hr} | "
            f"{r['tokens_match']} |"
        )
    return "\n".join(lines)


def summary_table(runs: list[dict]) -> str:
    """One compact table over many configurations (the README's), the floor once per preset and batch."""
    lines = [
        "| preset | SSD | batch | budget | system | TTFT | TPOT | tokens/s | zipmoe-ray speed-up | peak memory "
        "| read | expert GB/s | hit rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    floors = set()
    for run in runs:
        z = run["systems"].get("zipmoe-ray", {}).get("tpot_s")
        for name, r in run["systems"].items():
            key = (run["preset"], run["batch"])
            if name == "transformers":
                if key in floors:
                    continue
                floors.add(key)
            if "error" in r:
                continue
            hr = hit_cell(name, r, "-")
            ssd, budget = (
                ("-", "all in memory")
                if name == "transformers"
                else (f"{run['bandwidth_gbps']:g} GB/s", run["budget"])
            )
            rel = f"{r['tpot_s'] / z:.2f}x" if z and name not in ("zipmoe-ray", "transformers") else "-"
            gbps = f"{r['expert_gbps']:.2f}" if r.get("expert_gbps") is not None else "-"
            bold = "**" if name == "zipmoe-ray" else ""
            lines.append(
                f"| {PRESET_LABEL.get(run['preset'], run['preset'])} | {ssd} | {run['batch']} | {budget} | "
                f"{bold}{name}{bold} | {r['ttft_s']:.2f} s | {bold}{r['tpot_s'] * 1e3:.0f} ms{bold} | "
                f"{r['tokens_per_s']:.2f} | {rel} | {fmt_bytes(r['peak_rss_bytes'])} | {fmt_bytes(r['bytes_read'])} "
                f"| {gbps} | {hr} |"
            )
    return "\n".join(lines)


def figures(runs: list[dict]) -> list[str]:
    """The issue's figures, where the runs contain them."""
    out = []

    def find(budget, bw, batch):
        for r in runs:
            if r["budget"] == budget and r["bandwidth_gbps"] == bw and r["batch"] == batch:
                return r["systems"]
        return None

    s = find("25%", 0.5, 1)
    if s and all(k in s and "tpot_s" in s[k] for k in ("zipmoe-ray", "accelerate-disk", "full-lru")):
        z = s["zipmoe-ray"]["tpot_s"]
        out.append(
            f"25%, 0.5 GB/s, batch 1: zipmoe-ray TPOT = {z / s['accelerate-disk']['tpot_s']:.2f}x accelerate-disk "
            f"(goal <= 0.5) and {z / s['full-lru']['tpot_s']:.2f}x full-lru (goal <= 0.6)"
        )
    s = find("50%", 0.5, 1)
    if s and "zipmoe-ray" in s and "transformers" in s:
        out.append(
            f"50%, 0.5 GB/s, batch 1: zipmoe-ray TPOT = {s['zipmoe-ray']['tpot_s'] / s['transformers']['tpot_s']:.2f}x "
            "transformers in memory (goal <= 3)"
        )
    s = find("25%", 0.5, 8)
    if s and "zipmoe-ray" in s and "full-lru" in s:
        out.append(
            f"25%, 0.5 GB/s, batch 8: zipmoe-ray throughput = "
            f"{s['zipmoe-ray']['tokens_per_s'] / s['full-lru']['tokens_per_s']:.2f}x full-lru (goal >= 2)"
        )
    return out


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["preset"], r["bandwidth_gbps"], r["batch"]) for r in runs})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (preset, bw, batch) in zip(axes[0], panels):
        rs = sorted(
            (r for r in runs if (r["preset"], r["bandwidth_gbps"], r["batch"]) == (preset, bw, batch)),
            key=lambda r: float(r["budget"].rstrip("%")),
        )
        for name in SYSTEMS:
            pts = [
                (float(r["budget"].rstrip("%")), r["systems"][name]["tpot_s"])
                for r in rs
                if name in r["systems"] and "tpot_s" in r["systems"][name]
            ]
            if not pts:
                continue
            if name == "transformers":
                ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="transformers (in memory)")
            else:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xlim(0, 105)
        ax.set_xlabel("memory budget (% of routed-expert bytes)")
        ax.set_ylabel("TPOT (s)")
        ax.set_title(f"{PRESET_LABEL.get(preset, preset)}, SSD {bw:g} GB/s, batch {batch}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="Qwen preset, 25%%, 0.5 GB/s, batch 1, 16 tokens (<5 min)"
    )
    ap.add_argument(
        "--gpu", action="store_true", help="CUDA executor (skipped without a GPU); implies the quick set"
    )
    ap.add_argument("--json")
    ap.add_argument("--png")
    ap.add_argument("--presets", default="qwen1.5-moe,deepseek-v2-lite")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--budgets", default="10%,25%,50%,100%")
    ap.add_argument("--bandwidths", default="0.5,2", help="emulated SSD GB/s, comma separated")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument(
        "--skew", type=float, default=0.0, help="routing skew (Zipf exponent); -1: the random model's"
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
    if args.quick or args.gpu:
        args.presets, args.budgets, args.bandwidths = "qwen1.5-moe", "25%", "0.5"
        args.batches = "1,8" if args.gpu else "1"
        args.new_tokens, args.prompt_tokens, args.warm_tokens = 16, 16, 8
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        sys.exit(f"unknown system(s) {', '.join(bad)}; choose from {', '.join(SYSTEMS)}")
    # transformers always runs, once per preset and batch: the reference every system's tokens are checked against
    systems = [s for s in systems if s != "transformers"]
    budgets = [b.strip() for b in args.budgets.split(",")]
    for b in budgets:
        if not b.endswith("%"):
            sys.exit(f"budgets are percentages of the routed-expert bytes, got {b!r}")
    bandwidths = [float(x) for x in args.bandwidths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]

    from storage import open_throttle

    CACHE.mkdir(parents=True, exist_ok=True)
    throttle, why = open_throttle(CACHE, f"zipmoe-bench-{os.getpid()}")
    if throttle:
        emulation = (
            f"cgroup v{throttle.version} block-I/O read cap on disk {throttle.device} around each system's "
            "process tree (lets a 100 ms slice's worth through in a burst after a pause); engines also pace "
            "reads with their built-in limiter and read with O_DIRECT; Accelerate's offload files dropped "
            "from the page cache before every forward step"
        )
    else:
        emulation = (
            f"NOT the same storage for every system ({why}): engines pace reads with their built-in limiter, "
            "Accelerate reads the disk at full speed (page cache still dropped every step)"
        )
    log(f"storage emulation: {emulation}")
    from transformers import AutoTokenizer

    results = {
        "machine": machine(),
        "emulation": emulation,
        "settings": {
            "layers": args.layers,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "warm_tokens": args.warm_tokens,
            "workers": args.workers,
            "device": device,
            "routing": "the random model's own" if args.skew < 0 else f"re-biased to Zipf skew {args.skew:g}",
        },
        "runs": [],
    }
    try:
        for preset in args.presets.split(","):
            model = routed_model(preset, args.layers, None if args.skew < 0 else args.skew, log=log)
            stores = stores_for(model, log=log)
            tok = AutoTokenizer.from_pretrained(model)
            for batch in batches:
                prompts = [prompt_ids(tok, args.prompt_tokens, 3 * i) for i in range(batch)]
                warm = [prompt_ids(tok, args.prompt_tokens, 25 + 3 * i) for i in range(batch)]
                base = dict(
                    model=str(model), stores={k: str(v) for k, v in stores.items()}, prompts=prompts, warm=warm,
                    new_tokens=args.new_tokens, warm_tokens=args.warm_tokens, device=device,
                    workers=args.workers, offload_dir=str(CACHE / f"offload-{os.getpid()}"),
                    cgroup=throttle and {"path": str(throttle.path), "version": throttle.version,
                                         "device": throttle.device},
                )  # fmt: skip
                log(f"[{preset}, batch {batch}] transformers (in memory) ...")
                if throttle:
                    throttle.set_bandwidth(1 << 40)
                floor = run_child({**base, "system": "transformers"}, throttle, log, args.timeout)
                if "error" in floor:
                    sys.exit(f"the transformers floor failed ({floor['error']}); nothing to compare against")
                floor["tokens_match"] = True
                log(f"  TPOT {floor['tpot_s'] * 1e3:.0f} ms, peak {fmt_bytes(floor['peak_rss_bytes'])}")
                for bw in bandwidths:
                    if throttle:
                        throttle.set_bandwidth(bw * 1e9)
                    for budget in budgets:
                        run = {"preset": preset, "layers": args.layers, "budget": budget,
                               "bandwidth_gbps": bw, "batch": batch, "systems": {"transformers": floor}}  # fmt: skip
                        for name in systems:
                            log(f"[{preset}, batch {batch}, {bw:g} GB/s, {budget}] {name} ...")
                            spec = {**base, "system": name, "budget": budget, "bandwidth_gbps": bw,
                                    "budget_frac": float(budget.rstrip("%")) / 100}  # fmt: skip
                            r = run_child(spec, throttle, log, args.timeout)
                            if "error" not in r:
                                r["tokens_match"] = r["token_ids"] == floor["token_ids"]
                                log(
                                    f"  TPOT {r['tpot_s'] * 1e3:.0f} ms, TTFT {r['ttft_s']:.2f} s, "
                                    f"{r['tokens_per_s']:.2f} tok/s, read {fmt_bytes(r['bytes_read'])}, peak "
                                    f"{fmt_bytes(r['peak_rss_bytes'])}, tokens match: {r['tokens_match']}"
                                    + (f", time per token (ms): {r['where_the_time_goes_ms']}"
                                       if r.get("where_the_time_goes_ms") else "")
                                )  # fmt: skip
                            else:
                                log(f"  failed: {r['error']}")
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
        if throttle:
            throttle.remove()
        shutil.rmtree(CACHE / f"offload-{os.getpid()}", ignore_errors=True)
    results["figures"] = figures(results["runs"])
    for line in results["figures"]:
        print(line)
    # "systems": the one configuration of a single-configuration run (--quick), else the headline one
    runs = results["runs"]
    headline = (
        runs[0]
        if len(runs) == 1
        else next(
            (r for r in runs if (r["budget"], r["bandwidth_gbps"], r["batch"]) == ("25%", 0.5, 1)), None
        )
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
