"""How much of the all-hit Ray overhead is Ray itself? The same all-hit generation in four settings.

bench_e2e's ``ray_overhead_ms_per_layer`` compares an all-hit run on the Ray backend with the same run on the
local backend (no Ray at all). This benchmark splits that gap. Every setting runs the same engine on the
Qwen1.5-MoE preset with 4 MoE layers (routing skew 0, its zstd store, 150% budget: every
expert in full form after the warm-up, no reads, no decodes), a warm-up generation then ``--rounds``
measured ones of the same prompt, each in a fresh process:

* ``local``: the local backend in a process with no Ray anywhere (the baseline);
* ``local+ray``: the same, with a Ray instance started beside it (``ray.init`` as the engine starts one):
  what Ray's own processes cost an engine that never talks to them;
* ``local-in-actor``: the local backend inside a bare Ray actor, run on one thread of its own as the
  executor runs (stages/compute_thread.py), with the same OpenMP spin count as ``local``: what running in
  a Ray worker process costs;
* ``ray``: the Ray backend (executor and scheduler actors, lanes in the executor, the executor's OpenMP
  spin count of ray_stages.EXECUTOR_SPINCOUNT).

Settings alternate over ``--repeats`` rounds, the order reversed every other round, so that each sees the same
machine load; the table gives every measured TPOT and the median's difference to ``local`` per MoE layer.
Tokens must be equal everywhere.

    python benchmarks/bench_ray_floor.py [--repeats 3] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

SETTINGS = ("local", "local+ray", "local-in-actor", "ray")
LAYERS = 4


def measure(store: str, backend: str, prompt: list[int], rounds: int, new_tokens: int) -> dict:
    """TPOT (ms) of ``rounds`` all-hit generations after a warm-up one, and the tokens of the last."""
    sys.path.insert(0, str(Path(__file__).parent))  # also inside an actor, which starts elsewhere
    from common import emulated_engine

    engine = emulated_engine(
        store, None, memory_budget="150%", backend=backend, num_decompressors=2, calibrate=False
    )
    try:
        engine.generate([prompt], new_tokens)
        tpot, misses = [], 0
        for _ in range(rounds):
            engine.reset_stats()
            out = engine.generate([prompt], new_tokens)
            s = engine.stats()
            tpot.append(s["tpot_s"] * 1e3)
            misses += sum(s["misses"].values())
        return {"tpot_ms": tpot, "disk_misses": misses, "token_ids": out[0].token_ids}
    finally:
        engine.close()


def in_actor(store: str, prompt: list[int], rounds: int, new_tokens: int) -> dict:
    import ray

    @ray.remote(num_cpus=0)
    class Host:
        def run(self, *args):
            box: dict = {}

            def body():
                try:
                    box["out"] = measure(*args)
                except BaseException as e:  # re-raised on the caller's side
                    box["error"] = e

            t = threading.Thread(target=body, name="zipmoe-generate")  # one thread, as the executor's
            t.start()
            t.join()
            if "error" in box:
                raise box["error"]
            return box["out"]

    host = Host.remote()  # libgomp's own spin count, as in ``local`` (the executor's is ray_stages')
    return ray.get(host.run.remote(store, "local", prompt, rounds, new_tokens))


def one(setting: str, store: str, prompt: list[int], rounds: int, new_tokens: int) -> dict:
    """Run ``setting`` in this process (a fresh one per setting and round)."""
    if setting in ("local", "ray"):
        return measure(store, setting, prompt, rounds, new_tokens)
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        if setting == "local+ray":
            return measure(store, "local", prompt, rounds, new_tokens)
        return in_actor(store, prompt, rounds, new_tokens)
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the four settings")
    ap.add_argument("--rounds", type=int, default=3, help="measured generations per setting and round")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting, print its JSON
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from common import log, machine, prompt_ids, routed_model, stores_for

    if args.one:
        from transformers import AutoTokenizer

        prompt = prompt_ids(AutoTokenizer.from_pretrained(args.store), 32, 0)
        res = one(args.one, args.store, prompt, args.rounds, args.new_tokens)
        print("RESULT " + json.dumps(res), flush=True)
        return
    store = str(
        stores_for(routed_model("qwen1.5-moe", LAYERS, 0.0, log=log), codecs=("zstd",), log=log)["zstd"]
    )
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # loopback only (common.py sets the rest)
    results: dict[str, list[float]] = {s: [] for s in SETTINGS}
    ref = None
    for r in range(args.repeats):
        for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:  # a drifting machine favours no one
            log(f"[round {r + 1}] {setting} ...")
            cmd = [sys.executable, __file__, "--one", setting, "--store", store, "--rounds", str(args.rounds),
                   "--new-tokens", str(args.new_tokens)]  # fmt: skip
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                sys.exit(f"{setting} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
            res = json.loads(line[len("RESULT ") :])
            if res["disk_misses"]:
                sys.exit(f"{setting}: {res['disk_misses']} disk misses in an all-hit run")
            ref = ref or res["token_ids"]
            if res["token_ids"] != ref:
                sys.exit(f"{setting}: tokens differ from the first setting's")
            results[setting] += res["tpot_ms"]
    base = statistics.median(results["local"])
    runs = f"{args.repeats} rounds x {args.rounds} generations of {args.new_tokens} tokens"
    print(f"\nall-hit TPOT, {runs}; tokens identical\n")
    print("| setting | TPOT (every generation) | median | over local, per MoE layer |")
    print("|---|---|---|---|")
    for setting, tpots in results.items():
        med = statistics.median(tpots)
        print(
            f"| {setting} | {', '.join(f'{t:.0f}' for t in tpots)} ms | {med:.1f} ms | "
            f"{(med - base) / LAYERS:+.2f} ms |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(), "settings": vars(args), "tpot_ms": results}, indent=2)
        )


if __name__ == "__main__":
    main()
