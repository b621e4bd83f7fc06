"""Does the simulator predict this machine's engine? TPOT measured against TPOT simulated, at three budgets.

Setup: the Qwen1.5-MoE preset with 4 MoE layers (routing re-biased to skew 0, see routing.py), the Ray
backend with 2 decompressors, page cache bypassed, SSD emulated at 0.5 GB/s. The device profile is
`zipmoe calibrate --engine` on this machine (micro-measurements plus the runtime's own overheads), with
its SSD figures set to the emulated cap. For each budget the engine runs a warm-up generation and a measured
one while recording its routing (zipmoe-trace/1); the simulator replays that same trace with the same plan
(the engine's split and popularity prior), warming on the warm-up steps and measuring the rest. The
engine runs its start-up plan throughout (online re-planning off, ``replan_every=0``): the simulator
replays one plan, and a switch to full-only mid-run would compare two different things. Each row also
gives the replay with the executor undisturbed by the lanes (``executor_cores=0``), as if it computed on
another device. The engine runs with prefetch on (its default) and records its predictions; the simulator
replays them through the same precision gate, and each row compares the two runs' prefetch figures. On
this skew-0 routing the gate stays shut; ``--checkpoint`` runs the same on another local checkpoint (the
demo's SmolLM2 MoE, whose trained routing the next layer's router does predict).

    python benchmarks/bench_sim_validation.py [--json OUT] [--budgets 15%,25%,50%] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import (
    emulated_engine,
    log,
    machine,
    prompt_ids,
    prompts,
    routed_model,
    stores_for,
    warm_then_measure,
)
from timeline import breakdown_ms

from zipmoe_ray.cache.layout import expert_sizes
from zipmoe_ray.cli.calibrate_engine import measure_engine
from zipmoe_ray.plan import Workload
from zipmoe_ray.plan.calibrate import calibrate
from zipmoe_ray.sim import simulate
from zipmoe_ray.trace import load_recorded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--budgets", default="15%,25%,50%")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bandwidth", type=float, default=0.5, help="emulated SSD GB/s")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--traces-dir", help="keep the recorded traces here (trace-<budget>.jsonl)")
    ap.add_argument(
        "--checkpoint",
        help="a local transformers MoE checkpoint instead of the Qwen preset (compressed next to it once), "
        "e.g. ~/.cache/zipmoe/demo/smollm2-moe after `zipmoe demo`",
    )
    args = ap.parse_args()
    model = (
        Path(args.checkpoint).expanduser()
        if args.checkpoint
        else routed_model("qwen1.5-moe", args.layers, 0.0, log=log)
    )
    store = stores_for(model, codecs=("zstd",), log=log)["zstd"]
    log("calibrating this machine with the engine (about a minute) ...")
    profile = calibrate(store, engine_probe=measure_engine, workers=2)
    profile = profile.with_(ssd_read_gbps=args.bandwidth, ssd_latency_s=0.0, name="calibrated, SSD capped")
    log(f"  profile: {json.dumps({k: v for k, v in profile.to_json().items() if k != 'sources'})}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(store)
    if args.checkpoint and tok.chat_template:  # a chat model stops at once on bare text: ask it properly
        warm, prompt = _chat(tok, 20), _chat(tok, 0)
    else:
        warm, prompt = prompt_ids(tok, 32, 20), prompt_ids(tok, 32, 0)
    sizes = None
    rows = []
    for budget in args.budgets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "t.jsonl"
            with emulated_engine(
                store,
                args.bandwidth,
                memory_budget=budget,
                backend="ray",
                num_decompressors=2,
                trace_path=trace,
                replan_every=0,
                timeline=True,
            ) as engine:
                st = warm_then_measure(engine, warm, 24, prompt, args.new_tokens).stats
                where = breakdown_ms(engine.timeline())
                plan = engine.plan
                sizes = sizes or expert_sizes(engine.store)
            if args.traces_dir:
                Path(args.traces_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(trace, Path(args.traces_dir) / f"trace-{budget.strip('%')}pct.jsonl")
            rec = load_recorded(trace)
            w = Workload.from_recorded(rec, sizes=sizes)
            first = sum(1 for s in rec.steps if s.kind == "decode" and s.request == 0)
            sim = simulate(
                w, engine.budget, profile, "zipmoe", plan=plan, warm_start=False, measure_from=first
            )
            # the same replay on lanes that leave the executor undisturbed (what the simulator did before
            # it modelled shared cores): how much of the fit the shared-core model accounts for
            apart = simulate(
                w, engine.budget, profile.with_(executor_cores=0), "zipmoe", plan=plan, warm_start=False,
                measure_from=first, bound=False,
            )  # fmt: skip
        err = (sim.tpot_s - st["tpot_s"]) / st["tpot_s"]
        rows.append(
            {
                "budget": budget,
                "engine_tpot_s": st["tpot_s"],
                "simulated_tpot_s": sim.tpot_s,
                "error": err,
                "simulated_cores_apart_tpot_s": apart.tpot_s,
                "engine_hits": st["hits"],
                "engine_misses": st["misses"],
                "simulated_hit_rates": sim.hit_rates,
                "engine_bytes_read": st["bytes_read"],
                "simulated_bytes_read": sim.bytes_read,
                "engine_breakdown_ms": where,
                "simulated_breakdown_ms": {k: 1e3 * v for k, v in sim.breakdown_s.items()},
                "engine_prefetch": st["prefetch"],
                "simulated_prefetch": sim.prefetch,
            }
        )
        print(
            f"budget {budget}: engine TPOT {st['tpot_s'] * 1e3:.0f} ms, simulated {sim.tpot_s * 1e3:.0f} ms "
            f"({err:+.0%}; {apart.tpot_s * 1e3:.0f} ms with the executor undisturbed by the lanes); "
            f"bytes read engine {st['bytes_read'] / 1e6:.0f} MB (prefill included), simulated "
            f"{sim.bytes_read / 1e6:.0f} MB (decode steps); prefetch {_prefetch(st['prefetch'])} in the "
            f"engine, {_prefetch(sim.prefetch)} simulated\n  per token, engine / simulated (ms): "
            + ", ".join(
                f"{k} {where[k]:.0f} / {1e3 * v:.0f}" if where else f"{k} - / {1e3 * v:.0f}"
                for k, v in sim.breakdown_s.items()
            )
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(), "profile": profile.to_json(), "rows": rows}, indent=2)
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: Ray's atexit hooks can hang after the engine runs


def _chat(tok, index: int) -> list[int]:
    """Prompt ``index`` of the benchmark set as a user turn in the model's chat template."""
    got = tok.apply_chat_template(
        [{"role": "user", "content": prompts()[index]["prompt"]}], add_generation_prompt=True, tokenize=True
    )
    return list(got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got)


def _prefetch(p: dict | None) -> str:
    if not p:
        return "off"
    recall = "n/a" if p["recall"] is None else f"{p['recall']:.0%}"
    return f"{p['issued']} issued, {p['used']} used, recall {recall}, {p['gated']} layers gated"


if __name__ == "__main__":
    main()
