"""bench_e2e's output: one table per configuration, one summary table over many, the issues' figures, the
plot."""

from __future__ import annotations

SYSTEMS = (
    "transformers", "accelerate-disk", "llama.cpp", "full-lru", "full-lru-local", "zipmoe-local", "zipmoe-ray",
    "zipmoe-ray-actors",
)  # fmt: skip
PRESET_LABEL = {"qwen1.5-moe": "Qwen1.5-MoE", "deepseek-v2-lite": "DeepSeek-V2-Lite"}


def peak(r: dict):
    """A system's peak memory (``peak_rss_bytes`` in JSON written before the cgroup counters)."""
    return r.get("peak_memory_bytes", r.get("peak_rss_bytes"))


def fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _s(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def hit_cell(name: str, r: dict, floor: str) -> str:
    """Share of expert uses served from a cache (engines), resident layers (Accelerate), or ``floor``."""
    if r.get("hit_rate"):
        return f"{r['hit_rate']['any']:.0%}"
    if name == "accelerate-disk":
        return f"{r['resident_layers']}/{r['moe_layers']} layers resident"
    if name == "llama.cpp" and r.get("memory_limit_bytes"):
        return "page cache"  # whatever of its memory-mapped experts the capped cgroup keeps
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
            f"| {name} | {_s(r['ttft_s'])} | {r['tpot_s'] * 1e3:.0f} ms | {r['tokens_per_s']:.2f} | {rel} | "
            f"{fmt_bytes(peak(r))} | {fmt_bytes(r['bytes_read'])} | {gbps} | {hr} | "
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
                f"{bold}{name}{bold} | {_s(r['ttft_s'])} | {bold}{r['tpot_s'] * 1e3:.0f} ms{bold} | "
                f"{r['tokens_per_s']:.2f} | {rel} | {fmt_bytes(peak(r))} | {fmt_bytes(r['bytes_read'])} "
                f"| {gbps} | {hr} |"
            )
    return "\n".join(lines)


def _tpot(s: dict, name: str):
    return s.get(name, {}).get("tpot_s") or None


def figures(runs: list[dict], overhead: dict | None = None) -> list[str]:
    """The pipeline issue's figures (issue 12), where the runs contain them; ``overhead``: the all-hit
    runs' ``ray_overhead`` per preset."""
    out = []
    for r in runs:
        s, where = r["systems"], f"{r['budget']}, {r['bandwidth_gbps']:g} GB/s, batch {r['batch']}"
        z = _tpot(s, "zipmoe-ray")
        lru = [t for t in (_tpot(s, "full-lru"), _tpot(s, "full-lru-local")) if t]
        if not z:
            continue
        if r["batch"] == 1 and lru:
            goal = 0.75 if (r["budget"], r["bandwidth_gbps"]) == ("25%", 0.5) else 1.0
            line = f"{where}: zipmoe-ray TPOT = {z / min(lru):.2f}x the better full-lru (goal <= {goal:g})"
            if _tpot(s, "llama.cpp"):
                goal = " (goal <= 0.6)" if (r["budget"], r["bandwidth_gbps"]) == ("25%", 0.5) else ""
                line += f", {z / _tpot(s, 'llama.cpp'):.2f}x llama.cpp{goal}"
            if _tpot(s, "accelerate-disk"):
                line += f", {z / _tpot(s, 'accelerate-disk'):.2f}x accelerate-disk"
            out.append(line)
        if r["batch"] > 1 and s.get("full-lru", {}).get("tokens_per_s"):
            ratio = s["zipmoe-ray"]["tokens_per_s"] / s["full-lru"]["tokens_per_s"]
            out.append(f"{where}: zipmoe-ray throughput = {ratio:.2f}x full-lru's (goal >= 1.5 at 25%)")
    for preset, o in (overhead or {}).items():
        for name, v in o.items():
            if v.get("ms_per_layer") is not None:
                goal = " (goal <= 0.5)" if name == "zipmoe-ray" else ""
                rounds = v.get("ms_per_layer_rounds") or []
                each = (
                    f", median of {len(rounds)} pairs: " + ", ".join(f"{x:.2f}" for x in rounds)
                    if len(rounds) > 1
                    else ""
                )
                out.append(
                    f"{preset}, all hits: {name} Ray overhead = {v['ms_per_layer']:.2f} ms per MoE layer{goal}{each}"
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
