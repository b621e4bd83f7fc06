"""Serving benchmark: `zipmoe serve` under N concurrent streaming clients against the same requests sent one
at a time, and the server's overhead per token over ZipMoEEngine.generate in-process.

Question: how much output throughput does batching concurrent requests buy on an edge-like device (the
Qwen1.5-MoE preset cut to --layers MoE layers, budget 25% of the routed-expert bytes, page cache bypassed,
SSD emulated at 0.5 GB/s), and what does the HTTP server cost per token at batch 1?

Same store, same engine settings (Ray backend, 2 decode lanes, nominal costs so that both plan the same
split), same warm-up prompt, same --requests prompts of --prompt-tokens tokens:
  * one at a time: each prompt through ZipMoEEngine.generate in-process (its own Ray instance), then through
    the server (the `zipmoe serve` CLI in its own process group, --max-batch 8; the official openai client,
    streaming, greedy, --new-tokens each), alternately: the pair sees the same machine load and the same cache
    history, so the per-token difference is the server's overhead (median over the pairs);
  * then the same requests from 4 and 8 concurrent streaming clients.
Per concurrency: requests/s and output tokens/s over the wall time of all requests, TTFT (send to first
token) and TPOT (mean gap between a request's tokens) p50/p95 as clients see them. The one-at-a-time server
run's tokens are checked against the in-process run's (both solo, greedy: they must be identical).

Where the time goes, per concurrency: the bytes the server read (its /metrics), the seconds the emulated SSD
needed for them and that share of the wall time, and an I/O floor: the server records the routing it served
(--trace-out) and Belady's rule (evict what is used furthest ahead; optimal for any cache, even one knowing
the future, with the budget in compressed extents, zipmoe_ray/sim/bound.py) replays it over the whole run,
so no cache of this budget reads fewer bytes for that level's steps. A level cannot take less wall time
than its floor's bytes over the bandwidth, which bounds the concurrent-over-one-at-a-time ratio reachable
against this run's one-at-a-time speed (``tokens_per_s_N_over_1_io_bound``).

    flock /work/bench.lock python benchmarks/bench_serve.py [--json OUT] [--skew none|S] [--budget 25%]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import emulated_engine, log, machine, prompt_ids, routed_model, stores_for

HERE = Path(__file__).resolve().parent


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def paired_one_at_a_time(engine, client, prompts, new_tokens) -> tuple[list[dict], list[dict]]:
    """Each prompt in-process (ZipMoEEngine.generate) and then through the server, alternately, so that both
    see the same moment's machine load and the same cache history; returns (in-process rows, server rows)."""
    local, served = [], []
    for p in prompts:
        out = engine.generate(p, new_tokens)
        s = engine.stats()
        local.append({"token_ids": out.token_ids, "ttft_s": s["ttft_s"], "tpot_s": s["tpot_s"]})
        served.append(one_request(client, p, new_tokens))
    return local, served


class Server:
    """`zipmoe serve` in its own process group; stopped with SIGTERM."""

    def __init__(self, store, args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "zipmoe_ray.cli.main", "serve", str(store), "--port", str(self.port)]
        cmd += ["--model-name", "qwen", "--memory-budget", args.budget, "--max-batch", str(args.max_batch)]
        cmd += ["--max-queue", "64", "--num-decompressors", str(args.workers), "--no-calibrate"]
        cmd += ["--read-mode", "bypass", "--ssd-bandwidth", f"{args.bandwidth}GB"]
        self.log_path = Path(args.out_dir) / "bench_serve-server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.trace = Path(args.out_dir) / "bench_serve-trace.jsonl"
        self.trace.unlink(missing_ok=True)  # a trace is appended to; this run's alone
        cmd += ["--trace-out", str(self.trace)]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
            time.sleep(1)
        raise RuntimeError("the server did not become healthy in 900 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def one_request(client, prompt, new_tokens) -> dict:
    t0 = time.perf_counter()
    times: list[float] = []
    ids = None
    stream = client.completions.create(
        model="qwen",
        prompt=prompt,
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    for c in stream:
        if not c.choices:
            continue
        if c.choices[0].finish_reason:
            ids = (c.choices[0].model_extra or {}).get("token_ids")
        else:  # the server streams one chunk per token (its text may be empty)
            times.append(time.perf_counter())
    n = len(ids or [])
    first, last = (times[0], times[-1]) if times else (time.perf_counter(),) * 2
    return {
        "token_ids": ids,
        "ttft_s": first - t0,
        "tpot_s": (last - first) / (n - 1) if n > 1 else 0.0,
        "tokens": n,
        "start": t0,
        "end": time.perf_counter(),
    }


def run_level(client, prompts, concurrency, new_tokens) -> dict:
    lock = threading.Lock()
    todo = list(enumerate(prompts))
    rows: dict[int, dict] = {}

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, p = todo.pop(0)
            rows[i] = one_request(client, p, new_tokens)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        for f in [ex.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    ordered = [rows[i] for i in range(len(prompts))]
    tokens = sum(r["tokens"] for r in ordered)
    return summarize(ordered, wall, tokens, concurrency)


def summarize(rows, wall, tokens, concurrency) -> dict:
    ttft = [r["ttft_s"] for r in rows]
    tpot = [r["tpot_s"] for r in rows if r["tpot_s"]]
    return {
        "concurrency": concurrency,
        "requests": len(rows),
        "wall_s": wall,
        "requests_per_s": len(rows) / wall,
        "output_tokens_per_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p95_s": pct(ttft, 0.95),
        "tpot_p50_s": pct(tpot, 0.5),
        "tpot_p95_s": pct(tpot, 0.95),
        "token_ids": [r["token_ids"] for r in rows],
    }


def server_metrics(base) -> str:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        return r.read().decode()


def read_bytes(text: str) -> float:
    """The server engine's bytes read so far, from its /metrics text."""
    m = re.search(r"^zipmoe_read_bytes_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def served_requests(trace: Path, rows: int, timeout_s: float = 60.0) -> int:
    """The number of generations recorded once they hold ``rows`` sequences (the engine appends a
    generation's steps as it ends, which may be just after its last token reached the client)."""
    from zipmoe_ray.trace.recorded import load_recorded

    deadline = time.monotonic() + timeout_s
    while True:
        steps = load_recorded(trace).steps if trace.exists() else []
        prefills = [s for s in steps if s.step == 0]
        if sum(s.batch for s in prefills) >= rows or time.monotonic() > deadline:
            return len(prefills)
        time.sleep(0.2)


def io_floors(trace: Path, bounds: list[int], store: Path, budget: str) -> tuple[list[int], int]:
    """Per level (generations ``bounds[i-1]..bounds[i]-1`` of the trace, in order), the fewest bytes any
    cache of ``budget`` must read for its steps: Belady's rule on every step of the run in order, with the
    budget in compressed extents (replay_eviction.py), misses times the extent. Also the extent."""
    from replay_eviction import belady, per_range, steps_of

    from zipmoe_ray.cache.layout import ModelLayout
    from zipmoe_ray.runtime.budget import Budget
    from zipmoe_ray.store import open_store
    from zipmoe_ray.trace.recorded import load_recorded

    st = open_store(store)
    try:
        layout = ModelLayout.of_store(st)
    finally:
        st.close()
    extent = min(s.extent for s in layout.sizes.values())
    steps = steps_of(load_recorded(trace))
    misses = per_range(steps, belady(steps, Budget.parse(budget, layout).bytes // extent), bounds)
    return [m * extent for m in misses], extent


def server_replan(text: str) -> dict | None:
    """The server engine's online re-planning from its /metrics text: the split in use, rounds, and per
    batch size the split chosen and its last round's median decode step (None: re-planning off)."""
    out: dict = {"in_use": None, "rounds": 0, "by_batch": {}}
    pat = re.compile(r"^(zipmoe_\w+)(?:\{(.*)\})? (\S+)$")
    for line in text.splitlines():
        m = pat.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")), m.group(3)
        if name == "zipmoe_split_in_use":
            out["in_use"] = labels["split"]
        elif name == "zipmoe_replan_rounds_total":
            out["rounds"] = int(float(value))
        elif name == "zipmoe_split_chosen":
            out["by_batch"].setdefault(labels["batch"], {"step_s": {}})["split"] = labels["split"]
        elif name == "zipmoe_replan_step_seconds":
            b = out["by_batch"].setdefault(labels["batch"], {"step_s": {}})
            b["step_s"][labels["split"]] = float(value)
    return out if out["in_use"] else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--out-dir", default=str(HERE.parent / "bench-results"))
    ap.add_argument("--store", help="an existing store to serve instead of the preset's (e.g. a smoke test)")
    ap.add_argument("--preset", default="qwen1.5-moe")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument(
        "--skew", default="none", help="'none': the model's own routing, or a Zipf skew to re-bias to"
    )
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--bandwidth", type=float, default=0.5, help="emulated SSD, GB/s")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4,8")
    args = ap.parse_args()
    import openai
    from transformers import AutoTokenizer

    skew = None if args.skew == "none" else float(args.skew)
    if args.store:
        store = Path(args.store)
    else:
        model = routed_model(args.preset, args.layers, skew, log=log)
        store = stores_for(model, codecs=("zstd",), log=log)["zstd"]
    tok = AutoTokenizer.from_pretrained(store)
    warm = prompt_ids(tok, args.prompt_tokens, 40)
    prompts = [prompt_ids(tok, args.prompt_tokens, 3 * i) for i in range(args.requests)]

    log("starting zipmoe serve ...")
    t0 = time.perf_counter()
    server = Server(store, args)
    log(f"  healthy after {time.perf_counter() - t0:.0f} s")
    levels = [int(c) for c in args.concurrency.split(",") if int(c) > 1]
    results = []
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", timeout=1800, max_retries=0)
        log("in-process engine (its own Ray instance) ...")
        engine = emulated_engine(
            store,
            args.bandwidth,
            memory_budget=args.budget,
            backend="ray",
            num_decompressors=args.workers,
            calibrate=False,
        )
        try:
            engine.generate(warm, args.new_tokens)  # the same warm-up for both
            one_request(client, warm, args.new_tokens)
            sent = 1
            bounds = [served_requests(server.trace, sent)]  # the warm-up's generation(s) come first
            read0 = read_bytes(server_metrics(server.base))
            log(f"one at a time, in-process and server alternately, {len(prompts)} requests ...")
            local, served = paired_one_at_a_time(engine, client, prompts, args.new_tokens)
            engine_stats = engine.stats()
        finally:
            engine.close()
            import ray

            if ray.is_initialized():
                ray.shutdown()
        busy = sum(r["end"] - r["start"] for r in served)  # back to back, as one client would send them
        solo = summarize(served, busy, sum(r["tokens"] for r in served), 1)
        sent += len(prompts)
        bounds.append(served_requests(server.trace, sent))
        text = server_metrics(server.base)
        solo["server_replan"] = server_replan(text)
        solo["read_bytes"], read0 = read_bytes(text) - read0, read_bytes(text)
        results.append(solo)
        log(f"  server {solo['output_tokens_per_s']:.2f} tok/s, TPOT p50 {solo['tpot_p50_s'] * 1e3:.0f} ms")
        for c in levels:
            log(f"{c} concurrent clients, {len(prompts)} requests ...")
            r = run_level(client, prompts, c, args.new_tokens)
            sent += len(prompts)
            bounds.append(served_requests(server.trace, sent))
            text = server_metrics(server.base)
            r["server_replan"] = server_replan(text)  # as this level left it
            r["read_bytes"], read0 = read_bytes(text) - read0, read_bytes(text)
            log(
                f"  {r['output_tokens_per_s']:.2f} tok/s, {r['requests_per_s']:.3f} req/s, TTFT p50 "
                f"{r['ttft_p50_s']:.2f} s, TPOT p50 {r['tpot_p50_s'] * 1e3:.0f} ms"
            )
            results.append(r)
        metrics = server_metrics(server.base)
    finally:
        server.stop()
    floors, extent = io_floors(server.trace, bounds, store, args.budget)
    bps = args.bandwidth * 1e9
    for r, floor in zip(results, floors[1:]):  # floors[0]: the warm-up
        tokens = r["output_tokens_per_s"] * r["wall_s"]
        r["read_gb"] = r.pop("read_bytes") / 1e9
        r["ssd_busy_s"] = r["read_gb"] * 1e9 / bps
        r["ssd_busy_share"] = r["ssd_busy_s"] / r["wall_s"]
        r["io_floor_gb"] = floor / 1e9
        r["io_floor_s"] = floor / bps
        r["io_floor_tokens_per_s"] = tokens / r["io_floor_s"] if floor else None
    for r, lo, hi in zip(results, bounds, bounds[1:]):
        r["generations"] = hi - lo  # how the server batched the level's requests
    same = solo["token_ids"] == [r["token_ids"] for r in local]
    gaps = [b["tpot_s"] - a["tpot_s"] for a, b in zip(local, served) if a["tpot_s"] and b["tpot_s"]]
    tpot_in = statistics.median(r["tpot_s"] for r in local)
    tpot_srv = solo["tpot_p50_s"]
    overhead = statistics.median(gaps)
    best = max(results, key=lambda r: r["concurrency"])
    ratio = best["output_tokens_per_s"] / solo["output_tokens_per_s"]
    local_s = sum(r["ttft_s"] + r["tpot_s"] * (len(r["token_ids"]) - 1) for r in local)
    doc = {
        "machine": machine(),
        "load_average": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "routing": "model's own" if skew is None else f"Zipf skew {skew:g}",
        "in_process": {
            "output_tokens_per_s": sum(len(r["token_ids"]) for r in local) / local_s,
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in local),
            "tpot_p50_s": tpot_in,
            "tpot_p95_s": pct([r["tpot_s"] for r in local], 0.95),
            "bytes_read": engine_stats["bytes_read"],
            "hits": engine_stats["hits"],
            "replan": engine_stats.get("replan"),
        },
        "server": [{k: v for k, v in r.items() if k != "token_ids"} for r in results],
        "tokens_identical_one_at_a_time": same,
        "overhead_per_token_s": overhead,
        "overhead_per_token_p95_s": pct(gaps, 0.95),
        f"tokens_per_s_{best['concurrency']}_over_1": ratio,
        f"tokens_per_s_{best['concurrency']}_over_1_io_bound": (
            best["io_floor_tokens_per_s"] / solo["output_tokens_per_s"]
            if best["io_floor_tokens_per_s"]
            else None
        ),
        "io_floor": {
            "rule": "Belady over the served routing (every level in order), budget in compressed extents",
            "extent_bytes": extent,
            "trace": str(server.trace),
        },
        "server_metrics": metrics,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    rp = results[-1].get("server_replan")
    if rp:
        log(
            "server's split per batch size: "
            + ", ".join(
                f"{b}: {v.get('split')}" for b, v in sorted(rp["by_batch"].items(), key=lambda x: int(x[0]))
            )
            + f" ({rp['rounds']} rounds)"
        )
    for r in results:
        log(
            f"  {r['concurrency']} client(s): {r['generations']} generations, read {r['read_gb']:.2f} GB = "
            f"{r['ssd_busy_s']:.1f} s of SSD ({r['ssd_busy_share']:.0%} of {r['wall_s']:.1f} s); I/O floor "
            f"{r['io_floor_gb']:.2f} GB = {r['io_floor_s']:.1f} s"
        )
    bound = doc[f"tokens_per_s_{best['concurrency']}_over_1_io_bound"]
    if bound:
        log(f"  {best['concurrency']} clients over one at a time, at most {bound:.2f}x by the I/O floor")
    print(
        f"bench_serve: {best['concurrency']} clients {best['output_tokens_per_s']:.2f} tok/s = {ratio:.2f}x one at a "
        f"time ({solo['output_tokens_per_s']:.2f}); TPOT at 1: server {tpot_srv * 1e3:.1f} ms, in-process "
        f"{tpot_in * 1e3:.1f} ms, paired overhead p50 {overhead * 1e3:+.1f} ms/token; tokens identical: {same}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
