"""CLI commands of planning and simulation: trace convert/synth, calibrate, plan, simulate."""

from __future__ import annotations

import json
import sys

from ..errors import ConfigError
from ..sim.simulator import SIM_POLICIES

__all__ = ["add_plan_commands"]


def add_plan_commands(sub) -> None:
    t = sub.add_parser("trace", help="convert and synthesise routing traces")
    tsub = t.add_subparsers(dest="trace_command", metavar="ACTION")
    tsub.required = True
    p = tsub.add_parser("convert", help="a recorded trace (zipmoe-trace/1) into the count format")
    p.add_argument("trace_in")
    p.add_argument("trace_out")
    p.add_argument(
        "--include-prefill", action="store_true", help="count prefill steps too (default: decode only)"
    )
    p.set_defaults(func=cmd_trace_convert)
    p = tsub.add_parser("synth", help="a synthetic count trace with a chosen popularity skew (Zipf exponent)")
    p.add_argument("trace_out")
    p.add_argument("--store", help="take the model shape from a store")
    p.add_argument("--layers", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--expert-bytes", type=int)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="tokens per prompt")
    p.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of expert popularity (0: uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_trace_synth)

    p = sub.add_parser("calibrate", help="measure this machine into a device profile (JSON)")
    p.add_argument("--store", help="measure reads on this store's files (and the engine, with --engine)")
    p.add_argument(
        "--engine", action="store_true", help="also measure the runtime on --store (about a minute)"
    )
    p.add_argument("--workers", type=int, help="decode lanes (default: CPU count)")
    p.add_argument("--out", help="write the profile here (default: print it)")
    p.set_defaults(func=cmd_calibrate)

    for name, helptext in (
        ("plan", "choose how many experts to hold in each cache form for a workload and a device"),
        ("simulate", "simulate a policy on a trace and a device profile"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "plan":
            p.add_argument(
                "--store", help="plan for this store: a uniform prior, or its exact sizes with --trace"
            )
            p.add_argument("--trace", help="a recorded or count trace")
            p.add_argument("--out", help="write the plan (JSON) for `zipmoe generate --plan`")
        else:
            p.add_argument("--trace", required=True, help="a recorded or count trace")
            p.add_argument("--store", help="exact expert sizes from this store (default: estimated)")
            p.add_argument(
                "--policy", default="zipmoe", choices=SIM_POLICIES, help="the cache policy to simulate"
            )
            p.add_argument("--plan", help="use this plan (policy zipmoe) instead of planning")
            p.add_argument(
                "--replan-every",
                type=int,
                default=0,
                metavar="N",
                help="policy zipmoe: re-plan online as the engine does (`generate --replan-every`, default "
                "256 there), timing the plan against full-only every N simulated decode steps (default 0: "
                "the plan throughout)",
            )
        p.add_argument(
            "--memory-budget", required=True, help="bytes (1.5GiB) or a share of the expert bytes (25%%)"
        )
        p.add_argument("--device-profile", default="orin-agx-64gb", help="built-in name or JSON file")
        p.add_argument("--batch-size", type=int, default=1)
        p.add_argument("--seed", type=int, default=0, help="seed of the step draws from a count trace")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_plan if name == "plan" else cmd_simulate)


def _writable(path, what: str) -> None:
    from ..store.durable import check_writable

    if path:
        check_writable(path, what)


def cmd_trace_convert(args) -> int:
    from ..trace import CountTrace, load_recorded

    _writable(args.trace_out, "count trace")
    ct = CountTrace.from_recorded(load_recorded(args.trace_in), include_prefill=args.include_prefill)
    ct.save(args.trace_out)
    print(
        f"wrote {args.trace_out}: {len(ct.counts)} prompts, {ct.num_layers} layers x {ct.num_experts} experts"
    )
    return 0


def cmd_trace_synth(args) -> int:
    from ..trace import synth

    _writable(args.trace_out, "trace")
    shape = dict(
        num_layers=args.layers, num_experts=args.experts, top_k=args.top_k, expert_bytes=args.expert_bytes
    )
    if args.store:
        from ..store import open_store

        s = open_store(args.store)
        shape = dict(
            num_layers=len(s.layers()),
            num_experts=s.num_experts,
            top_k=s.top_k,
            expert_bytes=max(r.original_bytes for r in s.index.experts),
        )
    missing = [k for k, v in shape.items() if v is None]
    if missing:
        raise ConfigError(
            f"trace synth needs --store or {', '.join('--' + m.replace('num_', '').replace('_', '-') for m in missing)}"
        )
    ct = synth(**shape, prompts=args.prompts, tokens=args.tokens, skew=args.skew, seed=args.seed)
    ct.save(args.trace_out)
    print(f"wrote {args.trace_out}: skew {args.skew:g}, {args.prompts} prompts x {args.tokens} tokens")
    return 0


def cmd_calibrate(args) -> int:
    from ..plan.calibrate import calibrate

    probe = None
    if args.engine and not args.store:
        raise ConfigError("zipmoe calibrate --engine measures the runtime on a store: give --store STORE_DIR")
    _writable(args.out, "profile (--out)")
    if args.engine:
        from .calibrate_engine import measure_engine as probe
    profile = calibrate(args.store, engine_probe=probe, workers=args.workers)
    text = json.dumps(profile.to_json(), indent=2)
    if args.out:
        profile.save(args.out)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def _workload(args):
    """(workload, the store or None) from --trace and/or --store; a trace recorded on a store of another
    checkpoint than --store's is refused."""
    from ..plan.workload import Workload
    from ..trace import CountTrace, load_any

    sizes = layers = None
    store = None
    if getattr(args, "store", None):
        from ..cache.layout import expert_sizes
        from ..store import open_store

        store = open_store(args.store)
        sizes, layers = expert_sizes(store), store.layers()
    if getattr(args, "trace", None):
        tr = load_any(args.trace)
        theirs, mine = tr.fingerprint, store.index.source["fingerprint"] if store is not None else ""
        if theirs and mine and theirs != mine:
            raise ConfigError(
                f"{args.trace} was recorded on a store of another checkpoint (fingerprint {theirs[:12]}..., "
                f"{args.store} has {mine[:12]}...); give a trace of this model"
            )
        if isinstance(tr, CountTrace):
            if layers is not None and len(layers) != tr.num_layers:
                raise ConfigError(f"the trace has {tr.num_layers} layers, the store {len(layers)}")
            return Workload.from_count_trace(
                tr, batch=args.batch_size, seed=args.seed, layers=layers, sizes=sizes
            )
        if args.batch_size != 1:
            raise ConfigError("--batch-size applies to count traces; a recorded trace keeps its own batches")
        return Workload.from_recorded(tr, sizes=sizes)
    return Workload.uniform(
        layers, store.num_experts, store.top_k, sizes, batch=args.batch_size, seed=args.seed
    )


def _store_id(args) -> str:
    """The hex id of --store's store ("" without --store)."""
    if not getattr(args, "store", None):
        return ""
    from ..store import open_store

    with open_store(args.store) as s:
        return s.index.store_id.hex()


def cmd_plan(args) -> int:
    if not (args.store or args.trace):
        raise ConfigError("zipmoe plan needs --store STORE_DIR or --trace TRACE (or both)")
    from ..plan import load_profile
    from ..runtime.budget import minimum_budget
    from ..runtime.sizes import parse_size
    from ..sim.simulator import choose_plan

    _writable(args.out, "plan (--out)")
    w = _workload(args)
    profile = load_profile(args.device_profile)
    budget = parse_size(args.memory_budget, total=w.expert_bytes)
    plan = choose_plan(w, budget, profile, minimum_budget(w.sizes, w.top_k))
    plan.store_id = _store_id(args)  # what `generate --plan` checks it against
    if args.out:
        plan.save(args.out)
    doc = {k: v for k, v in plan.to_json().items() if k not in ("forms", "access")}
    doc["split"] = vars(plan.split_rule(w.sizes))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        per = doc["experts_per_form"]
        print(
            f"plan ({plan.scope} budget {budget:,} B, {profile.name}): {plan.chosen}; experts full {per['full']}, "
            f"compressed {per['compressed']}, sm-only {per['sm']}, disk {per['disk']}; expected "
            f"MoE time per step {plan.expected_makespan_s * 1e3:.1f} ms"
        )
        for name, score in sorted(plan.candidates.items(), key=lambda kv: kv[1]):
            print(f"  {name:<22} {score * 1e3:8.1f} ms")
        if args.out:
            print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_simulate(args) -> int:
    from ..plan import Plan, load_profile
    from ..runtime.sizes import parse_size
    from ..sim import simulate

    w = _workload(args)
    profile = load_profile(args.device_profile)
    budget = parse_size(args.memory_budget, total=w.expert_bytes)
    plan = Plan.load(args.plan) if args.plan else None
    mine = _store_id(args)
    if plan is not None and plan.store_id and mine and plan.store_id != mine:
        raise ConfigError(
            f"{args.plan} was made for another store than {args.store}; make one for it with zipmoe plan"
        )
    from .progress import TqdmProgress

    with TqdmProgress("simulate", quiet=len(w.steps) < 2000, unit="step") as bar:
        r = simulate(w, budget, profile, args.policy, plan=plan, progress=bar, replan_every=args.replan_every)
    if args.json:
        print(json.dumps(r.to_json(), indent=2))
        return 0
    h = r.hit_rates
    print(
        f"{args.policy} on {profile.name}, budget {budget:,} B, batch {r.batch}: TPOT {r.tpot_s * 1e3:.1f} ms "
        f"(lower bound {r.lower_bound_tpot_s * 1e3:.1f} ms, {r.lower_bound['kind']}), {r.tokens_per_s:.1f} tok/s; "
        f"hits full {h.get('full', 0):.0%} compressed {h.get('compressed', 0):.0%} sm {h.get('sm', 0):.0%}, disk "
        f"{h.get('disk', 0):.0%}; read {r.bytes_read_per_step / 1e6:.1f} MB/step; I/O busy {r.io_utilisation:.0%}"
    )
    if r.replan:
        steps = ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in r.replan["step_s"].items())
        said = f"last round's median step: {steps}" if steps else "no round completed: too few steps"
        print(f"online re-planning: {r.replan['in_use']} in use at the end ({said})")
    elif args.replan_every and args.policy == "zipmoe":
        print(
            "online re-planning: nothing to time, the start-up plan already is full-only (classic offloading)"
        )
    if r.prefetch:
        f = r.prefetch
        recall = "n/a" if f["recall"] is None else f"{f['recall']:.0%}"
        print(
            f"prefetch (the trace's recorded predictions): {f['predicted']} experts asked ahead, {f['used']} "
            f"used, {f['wasted']} wasted, recall {recall}; {f['gated']} layers only scored (precision gate shut)"
        )
    return 0
