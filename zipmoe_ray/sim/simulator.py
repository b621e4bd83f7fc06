"""The trace-driven simulator: the runtime's own Scheduler, ExpertCache and layer scheduler on a virtual clock.

Nothing about caching or scheduling is re-implemented here: ``Scheduler`` (admission, demotion, waves,
planning each layer) runs unchanged over a SimRunner whose tasks take the device profile's times. What is
modelled is the executor: per MoE layer, one scheduler round trip when something misses
(``request_overhead_s``), full-form hits computed first, each fetched expert taken over
(``delivery_overhead_s``) and computed when it is ready (``expert bytes / executor_gbps``), then the rest
of the layer (``non_moe_s_per_layer``); a recorded trace's predictions are sent to the Scheduler's prefetch
as the executor's client sends them (sim/prefetch.py); per token,
``non_moe_s_per_token``. On a CPU executor (the profile's ``executor_cores``) all of that work slows
while decode lanes run on the same cores (``SimRunner.compute``). Time per step is the per-sequence TPOT;
a step serves ``batch`` tokens.

Policies:
    zipmoe           planned split between forms (plan.planner) + cache-affinity scheduling
    full-lru         classic offloading: full BF16 experts only, uncompressed reads, least recently used
    full-lfu         the same with aged least-frequently-used eviction
    compressed-only  every cached expert in compressed form
    sm-only          every cached expert as its sign+mantissa planes
"""

from __future__ import annotations

import heapq
import itertools
import logging
from dataclasses import asdict, dataclass, field, replace
from operator import itemgetter
from typing import Any

from ..cache.forms import ExpertSizes, Form
from ..cache.layout import ModelLayout
from ..cache.popularity import DEFAULT_DECAY
from ..cache.split import SplitRule
from ..errors import ConfigError
from ..runtime.budget import minimum_budget
from ..runtime.config import check_replan_every
from ..runtime.stats import prefetch_stats
from ..stages.scheduler import Scheduler, SchedulerConfig
from . import background
from .bound import executor_rates, lower_bound
from .prefetch import SimPrefetch
from .runner import SimRunner, delivery_ready

__all__ = [
    "SIM_POLICIES",
    "PolicySetup",
    "SimResult",
    "choose_plan",
    "executor_layer",
    "policy_setup",
    "simulate",
]

log = logging.getLogger(__name__)

SIM_POLICIES = ("zipmoe", "full-lru", "full-lfu", "compressed-only", "sm-only")


@dataclass
class SimResult:
    policy: str
    budget: int
    batch: int
    steps: int
    tpot_s: float
    tokens_per_s: float
    lower_bound_tpot_s: float
    offline_lower_bound_tpot_s: float
    lower_bound: dict[str, float]
    hit_rates: dict[str, float]
    bytes_read: int
    bytes_read_per_step: float
    io_utilisation: float
    cpu_utilisation: list[float]
    split: dict[str, float]
    plan: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    replan: dict[str, Any] | None = None  # online re-planning, as the engine's stats()["replan"]
    prefetch: dict[str, Any] | None = None  # replayed predictions (recorded traces), as the engine reports
    # per step, as the engine's timeline breakdown (benchmarks/timeline.py): the executor idle on the
    # scheduler's answers, idle on experts, computing experts (hand-overs included), outside the MoE layers
    breakdown_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _raw_sizes(sizes: dict) -> dict:
    return {k: ExpertSizes(s.full, s.full, 0, s.full, raw_codec=True) for k, s in sizes.items()}


WARM_STEPS = 1000  # steps replayed unmeasured before a warm-started measurement: enough to fill any cache
BACKGROUND_BOUND_PAIRS = 100_000  # (step, layer) pairs from which the lower bounds run beside the replay
BACKGROUND_TRIAL_PAIRS = 10_000  # (step, layer) pairs of the planner's trials from which half run beside
EVALUATE_STEPS = 120  # steps of the workload the planner's candidates are replayed on
DECAYS = (DEFAULT_DECAY, 0.999)  # popularity memories the plan chooses between (short: locality; long: IRM)


def choose_plan(workload, budget, profile, reserve):
    """The planner's plan, its shortlist re-scored by replaying the start of the workload in the simulator,
    then the popularity memory (decay per step) that replays best with it: a long one for workloads
    drawn independently step by step (count traces), where the long-run frequency ranks experts best, a
    short one where consecutive steps reuse experts."""
    from ..plan.planner import Plan, make_plan
    from ..plan.workload import Workload

    head = Workload(
        workload.layers,
        workload.num_experts,
        workload.top_k,
        workload.sizes,
        workload.steps[: min(len(workload.steps), EVALUATE_STEPS)],
        workload.batch,
        workload.non_expert_bytes_per_layer,
        access=workload.access,
        recorded=workload.recorded,
        predictions=workload.predictions[:EVALUATE_STEPS] if workload.predictions else None,
    )

    def evaluate(forms, decay=None) -> float:
        trial = Plan(budget, reserve, forms, 0.0, "trial", access=workload.access, decay=decay)
        return simulate(head, budget, profile, "zipmoe", plan=trial, bound=False).tpot_s

    def evaluate_all(candidates: dict) -> dict:
        """Each candidate's replay; the second half in a forked child beside the first when the replays
        are long enough to pay for it (each is independent and deterministic: the same scores)."""
        names = list(candidates)
        if len(head.steps) * len(head.layers) * len(names) < BACKGROUND_TRIAL_PAIRS:
            return {n: evaluate(candidates[n]) for n in names}
        mine, theirs = names[: (len(names) + 1) // 2], names[(len(names) + 1) // 2 :]
        pending = background.start(lambda: {n: evaluate(candidates[n]) for n in theirs})
        scores = {n: evaluate(candidates[n]) for n in mine}
        scores.update(pending.result())
        return {n: scores[n] for n in names}

    costs = profile.costs()
    plan = make_plan(
        workload,
        budget,
        costs,
        profile.decode_workers,
        reserve=reserve,
        on_device=profile.recombine_on_device,
        device=profile.name,
        evaluator=evaluate_all,
    )
    scores = {DEFAULT_DECAY: plan.expected_makespan_s}
    for decay in DECAYS[1:]:
        scores[decay] = evaluate(plan.forms, decay)
    plan.decay = min(scores, key=lambda d: (scores[d], d != DEFAULT_DECAY))
    plan.expected_makespan_s = scores[plan.decay]
    return plan


@dataclass
class PolicySetup:
    """What a policy runs with in the simulator: expert sizes as stored, the layout, the scheduler config, the
    plan (zipmoe only), and the executor's modelled rates."""

    sizes: dict
    layout: ModelLayout
    config: SchedulerConfig  # its split is the policy's
    plan: Any
    exec_bps: float
    non_layer_s: float
    non_token_s: float


def policy_setup(
    workload, policy: str, budget: int, profile, *, plan=None, plan_budget=None, decay: float | None = None
) -> PolicySetup:
    """Sizes, scheduler config and executor rates of ``policy`` with ``budget`` bytes (per device); a zipmoe
    plan is made for ``plan_budget`` (a cluster's total; default ``budget``) unless ``plan`` is given.
    ``decay``: the LFU popularity decay to run with (default: the plan's for zipmoe, else the default)."""
    if policy not in SIM_POLICIES:
        raise ConfigError(f"policy {policy!r} is not one of {', '.join(SIM_POLICIES)}")
    decay_override = decay
    raw = policy.startswith("full-")  # classic offloading: full BF16 only, uncompressed reads
    sizes = _raw_sizes(workload.sizes) if raw else dict(workload.sizes)
    on_device = profile.recombine_on_device
    prior = None
    if policy == "zipmoe":
        if plan is None:
            reserve = minimum_budget(sizes, workload.top_k)
            plan = choose_plan(workload, plan_budget or budget, profile, reserve)
        split, prior = plan.split_rule(sizes), plan.access
        decay = plan.decay if plan.decay is not None else DEFAULT_DECAY
    else:
        plan, split, decay = None, SplitRule.for_policy("full-only" if raw else policy), DEFAULT_DECAY
    if decay_override is not None:
        decay = decay_override
    config = SchedulerConfig(
        budget=budget,
        split=split,
        popularity="lru" if policy == "full-lru" else "lfu",
        decay=decay,
        recombine_on_device=on_device,
        keep_full_payload=False,
        prior=prior,
        decode_parts=None if on_device else 1,  # as the engine does (pieces only go to an accelerator)
    )
    return PolicySetup(
        sizes, ModelLayout(sizes, workload.top_k, raw), config, plan, *executor_rates(workload, profile)
    )


def executor_layer(
    sched,
    runner,
    layer: int,
    picks,
    t: float,
    sizes,
    exec_bps: float,
    overhead: float,
    released: list,
    notes: list,
    handoff: float = 0.0,
    ahead: SimPrefetch | None = None,
    waits: list[float] | None = None,
) -> tuple[float, float, list]:
    """One MoE layer on the executor's device from time ``t``, as the client runs it: held FULL experts are
    computed at once; the rest are requested (what the staging cannot take yet is asked for again as each
    expert is computed and released, as ExpertClient._consume does) and computed in the order they become
    ready, each after ``handoff`` seconds of the executor's own time taking it over (the profile's
    ``delivery_overhead_s``: building its weights from the delivered buffers, the bookkeeping).
    ``released`` goes out with the first request; hits without a request are added to ``notes`` (reported
    with the step). With ``ahead`` (recorded predictions replayed, sim/prefetch.py), experts prefetched for
    this layer are taken from their prefetch and computed after the hits, and the next layer's prediction
    (``ahead.guess``) goes out as the client sends it. ``waits`` ([round trips, experts]), if given, gains
    the seconds the executor sat idle on the scheduler's answers and on experts not yet ready. Returns (the
    time the layer's experts are computed, the compute seconds spent, the experts to release with the next
    request)."""
    entries, full = sched.cache.entries, Form.FULL
    stretch = runner.compute if runner.contended else None  # lanes slow a CPU executor down
    if ahead is None:
        hits, misses, early = [], [], []
        for e, tok in picks:
            (hits if entries[(layer, e)].form == full else misses).append((e, tok))
    else:
        hits, early, misses, wrong = ahead.route(layer, picks, sched.cache)
        released = released + wrong
        early.sort(key=_first)
    t_exec, busy = t, 0.0
    if not misses:
        notes.extend((layer, e, tok) for e, tok in hits)
        if ahead is not None:  # the next layer's prediction goes out at once
            released = ahead.issue(sched, runner, t, released)
    for e, _ in hits:
        dt = sizes[(layer, e)].full / exec_bps
        t_exec = stretch(t_exec, dt) if stretch else t_exec + dt
        busy += dt
    if misses:  # the request (answered while the hits are computed), then the next layer's prediction
        t_call = t + overhead
        runner.now = t_call
        used = ahead.take_used() if ahead is not None else ()
        resp = sched.request(layer, misses, hits, released, used)
        released = ahead.issue(sched, runner, t_call, []) if ahead is not None else []
    if early:  # prefetched experts were on their way before the request went out
        t_exec, more = _computed(early, layer, t_exec, sizes, exec_bps, handoff, stretch, waits, released)
        busy += more
    if not misses:
        return t_exec, busy, released
    # the wave's deliveries in the order they become ready; experts the staging could not take yet are asked
    # for again as soon as one is computed and released (its release rides along), one request on its way
    # at a time, and its answer is taken once the next expert is computed (or at once, with nothing else
    # to compute), as ExpertClient._consume does
    if t_call > t_exec:
        if waits is not None:
            waits[0] += t_call - t_exec
        t_exec = t_call
    order = itertools.count()
    ready = [(delivery_ready(d), next(order), d.expert) for d in resp.deliveries]
    heapq.heapify(ready)
    deferred, refill = resp.deferred, None  # refill: (when its answer is in, the answer)

    def take(t_exec: float) -> float:
        nonlocal refill, deferred
        t_ans, answer = refill
        refill = None
        if t_ans > t_exec:
            if waits is not None:
                waits[0] += t_ans - t_exec
            t_exec = t_ans
        for d in answer.deliveries:
            heapq.heappush(ready, (delivery_ready(d), next(order), d.expert))
        deferred = answer.deferred
        return t_exec

    def ask(t_exec: float) -> None:
        nonlocal refill, deferred, released
        runner.now = t_exec + overhead
        refill = (runner.now, sched.request(layer, deferred, [], released))
        released, deferred = [], []

    while ready or deferred or refill is not None:
        if not ready:
            idle = refill is None
            if idle:
                ask(t_exec)
            t_exec = take(t_exec)
            if idle and deferred and not ready:  # asked with nothing in flight, given nothing: would loop
                raise RuntimeError(
                    f"the scheduler deferred every expert of layer {layer} with none in flight"
                )
            continue
        r, _, e = heapq.heappop(ready)
        t_exec, dt = _compute_one(r, e, layer, t_exec, sizes, exec_bps, handoff, stretch, waits, released)
        busy += dt
        if refill is not None:
            t_exec = take(t_exec)
        if deferred:
            ask(t_exec)
    return t_exec, busy, released


_first = itemgetter(0)


def _computed(
    arrivals, layer, t_exec, sizes, exec_bps, handoff, stretch, waits, released
) -> tuple[float, float]:
    """Compute ``arrivals`` ((ready time, expert), in order) from ``t_exec``: each once it is ready, after its
    hand-over; idle time goes to ``waits[1]``, each expert to ``released``. Returns (the time the last is
    computed, the compute seconds spent)."""
    busy = 0.0
    for r, e in arrivals:
        t_exec, dt = _compute_one(r, e, layer, t_exec, sizes, exec_bps, handoff, stretch, waits, released)
        busy += dt
    return t_exec, busy


def _compute_one(
    r, e, layer, t_exec, sizes, exec_bps, handoff, stretch, waits, released
) -> tuple[float, float]:
    """Expert ``e`` of ``layer``, ready at ``r``, computed from ``t_exec`` after its hand-over (idle time to
    ``waits[1]``, the expert to ``released``). Returns (the time it is computed, its compute seconds)."""
    dt = sizes[(layer, e)].full / exec_bps
    if r > t_exec:
        if waits is not None:
            waits[1] += r - t_exec
        t_exec = r
    t_exec += handoff
    t_exec = stretch(t_exec, dt) if stretch else t_exec + dt
    released.append((layer, e))
    return t_exec, dt


def simulate(
    workload,
    budget: int,
    profile,
    policy: str = "zipmoe",
    *,
    plan=None,
    warm_start: bool = True,
    measure_from: int = 0,
    bound: bool = True,
    progress=None,
    decay: float | None = None,
    replan_every: int = 0,
) -> SimResult:
    """Replay ``workload`` (plan.workload.Workload; its steps are the decode steps, its batch the batch size)
    under ``policy`` with ``budget`` bytes on ``profile``. With ``warm_start`` the first ``WARM_STEPS``
    steps (all of a shorter workload) are first replayed unmeasured, so that every policy is measured in
    steady state, not on cold misses; without it, steps before ``measure_from`` warm the cache and are not
    measured (replaying a recorded warm-up). ``bound=False`` skips the lower bounds (NaN; the planner's
    trial replays do not need them). ``progress`` (store.Progress: ``start(total, 0)``, ``advance(n, 0)``)
    hears of every replayed step. ``decay`` overrides the LFU popularity decay (see policy_setup).
    ``replan_every`` > 0 (zipmoe only): re-plan online as the engine does (schedule/split_tuner.py), the
    Scheduler timing each candidate on the simulated decode steps; its report is ``SimResult.replan``, and
    ``split`` is then the split in use at the end. Blocks."""
    check_replan_every(replan_every)
    ps = policy_setup(workload, policy, budget, profile, plan=plan, decay=decay)
    if replan_every and policy == "zipmoe":
        ps.config = replace(ps.config, replan_every=replan_every)
    sizes, plan = ps.sizes, ps.plan
    costs = profile.costs()
    runner = SimRunner.on_profile(sizes, profile, costs)
    sched = Scheduler(ps.layout, ps.config, runner, costs)
    exec_bps, non_layer, non_token = ps.exec_bps, ps.non_layer_s, ps.non_token_s
    if warm_start:
        warm, measured = workload.steps[:WARM_STEPS], workload.steps
    else:
        warm, measured = workload.steps[:measure_from], workload.steps[measure_from:]
    first = len(warm)
    preds = workload.predictions
    if preds and (len(preds) != len(workload.steps) or any(len(p) != len(workload.layers) for p in preds)):
        raise ConfigError(
            f"the workload's predictions cover {len(preds)} steps, its routing {len(workload.steps)}: "
            "one list per layer for every step"
        )
    ahead = SimPrefetch() if preds else None
    if preds:  # aligned with the steps replayed: warm-up, then the measured ones
        preds = preds[: len(warm)] + (preds if warm_start else preds[measure_from:])
    pending = None
    if bound:  # independent of the replay: a long one is computed on another core meanwhile
        big = len(measured) * len(workload.layers) >= BACKGROUND_BOUND_PAIRS
        recorded = getattr(workload, "recorded", False)
        pending = background.start(
            lambda: lower_bound(workload, budget, profile, measured, recorded=recorded), fork=big
        )
    if progress is not None:
        progress.start(len(warm) + len(measured), 0)
    t = 0.0
    waits, moe = [0.0, 0.0], 0.0  # idle on round trips and on experts, time inside MoE layers
    step_times: list[float] = []
    released: list = []
    notes: list = []
    marks = None
    for i, step in enumerate(itertools.chain(warm, measured)):
        if progress is not None and i % 100 == 99:
            progress.advance(100, 0)
        if i == first:
            sched.reset_stats()
            marks = (t, runner.io_busy, list(runner.cpu_busy), runner.bytes_read)
            if ahead is not None:
                ahead.reset_stats()
            waits, moe = [0.0, 0.0], 0.0  # measured steps only
        t0 = t
        nxt = preds[i] if ahead is not None else None
        for pos, picks in enumerate(step):
            layer = workload.layers[pos]
            if nxt is not None:  # the next layer's recorded prediction, sent while this one is served
                ahead.guess = (workload.layers[pos + 1], nxt[pos + 1]) if pos + 1 < len(step) else None
            t_exec, _, released = executor_layer(
                sched,
                runner,
                layer,
                picks,
                t,
                sizes,
                exec_bps,
                profile.request_overhead_s,
                released,
                notes,
                profile.delivery_overhead_s,
                ahead,
                waits,
            )
            moe += t_exec - t
            t = runner.compute(t_exec, non_layer)
        t = runner.compute(t, non_token)
        runner.now = t
        used = ahead.take_used() if ahead is not None else ()
        sched.step(notes, released, used, timing=(t - t0, workload.batch))
        notes, released = [], []
        if i >= first:
            step_times.append(t - t0)
    if marks is None:
        raise ConfigError("the workload has no steps to simulate")
    elapsed = t - marks[0] or 1e-12
    st = sched.stats()
    lb = pending.result() if pending is not None else {"tpot_s": float("nan"), "offline_tpot_s": float("nan")}
    n = len(step_times)
    tpot = sum(step_times) / n
    split = sched.split
    return SimResult(
        policy=policy,
        budget=budget,
        batch=workload.batch,
        steps=len(step_times),
        tpot_s=tpot,
        tokens_per_s=workload.batch / tpot if tpot else 0.0,
        lower_bound_tpot_s=lb["tpot_s"],
        offline_lower_bound_tpot_s=lb["offline_tpot_s"],
        lower_bound=lb,
        hit_rates={**st["hit_rate"], "disk": st["miss_rate"]},
        bytes_read=runner.bytes_read - marks[3],
        bytes_read_per_step=(runner.bytes_read - marks[3]) / len(step_times),
        io_utilisation=min(1.0, (runner.io_busy - marks[1]) / elapsed),
        cpu_utilisation=[min(1.0, (b - a) / elapsed) for a, b in zip(marks[2], runner.cpu_busy)],
        split={"full": split.full, "compressed": split.compressed, "sm": split.sm},
        plan={
            "chosen": plan.chosen,
            "expected_makespan_s": plan.expected_makespan_s,
            "experts_per_form": plan.counts(),
        }
        if plan is not None
        else None,
        replan=st.get("replan"),
        prefetch=prefetch_stats(ahead.report(), st) if ahead is not None else None,
        breakdown_s={
            "round_trips": waits[0] / n,
            "waiting_for_experts": waits[1] / n,
            "expert_compute": (moe - waits[0] - waits[1]) / n,
            "outside_moe": tpot - moe / n,
        },
    )
