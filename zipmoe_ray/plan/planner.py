"""The cache planner: how many experts to hold in each form, and which ones, for a workload and a device.

Scope: one global budget shared by every layer (the runtime's cache is one pool): a layer whose routing is
more skewed, or more often missed, can take more of the budget than another, which per-layer budgets would
forbid; the scheduler then works per layer, where the makespan is decided.

Objective: the expected sum over MoE layers of a decode step's fetch makespan. For the greedy search each
layer's makespan is estimated from its expected I/O time A = sum_e p_e a_e and decode time B = sum_e p_e b_e
(p_e: probability that expert e is active in a step, per expert, from the workload) as
max(A, B/W) + 0.3 min(A, B/W): the lanes overlap, imperfectly. Greedy: from everything on disk, repeatedly
apply the upgrade of one expert to a better form (SM, COMPRESSED, FULL) with the largest decrease of the
objective per byte of budget, re-evaluating lazily, until nothing fits or helps. The result and the best
single-form caches (FULL / COMPRESSED / SM-only holding the most popular experts) are then scored by
replaying the workload's steps through the runtime's own layer scheduler (schedule.layer_schedule) and the
best one is chosen, so the plan is never worse than the best single-form cache under that model.
"""

from __future__ import annotations

import heapq
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cache.forms import Form, Key
from ..cache.split import SplitRule
from ..errors import BudgetError, ConfigError
from ..schedule import CostModel, Task, pieces_for, plan_layer
from .workload import Workload

__all__ = ["PLAN_FORMAT", "Plan", "expected_makespan", "make_plan"]

PLAN_FORMAT = "zipmoe-plan/1"
UPGRADES = (Form.SM, Form.COMPRESSED, Form.FULL)  # cheapest first
EVALUATE_TOP = 3  # planned candidates an evaluator re-scores (with every single-form cache)


@dataclass
class Plan:
    budget: int
    reserve: int
    forms: dict[Key, Form]
    expected_makespan_s: float
    chosen: str
    candidates: dict[str, float] = field(default_factory=dict)
    access: dict[Key, float] = field(default_factory=dict)
    scope: str = "global"
    device: str = ""
    decay: float | None = None  # popularity decay per step the cache should run with (None: the config's)
    store_id: str = ""  # hex id of the store it was made for ("" when made without one)

    def held(self, sizes) -> dict[Form, int]:
        out = {Form.FULL: 0, Form.COMPRESSED: 0, Form.SM: 0}
        for k, f in self.forms.items():
            if f != Form.DISK:
                out[f] += sizes[k].held(f)
        return out

    def split_rule(self, sizes) -> SplitRule:
        """Shares of the cache budget (budget - reserve) per form, for the runtime."""
        cache = max(1, self.budget - self.reserve)
        h = self.held(sizes)
        free = cache - sum(h.values())
        # unplanned room goes to the form that covers the most experts per byte among those used
        used = [f for f in (Form.SM, Form.COMPRESSED, Form.FULL) if h[f]] or [Form.SM]
        h[used[0]] += max(0, free)
        return SplitRule(h[Form.FULL] / cache, h[Form.COMPRESSED] / cache, h[Form.SM] / cache)

    def counts(self) -> dict[str, int]:
        out = {f.label: 0 for f in Form}
        for f in self.forms.values():
            out[f.label] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "scope": self.scope,
            "device": self.device,
            "store_id": self.store_id,
            "budget": self.budget,
            "reserve": self.reserve,
            "chosen": self.chosen,
            "expected_makespan_s": self.expected_makespan_s,
            "candidates": self.candidates,
            "experts_per_form": self.counts(),
            "forms": [[layer, e, f.label] for (layer, e), f in sorted(self.forms.items()) if f != Form.DISK],
            "access": [[layer, e, p] for (layer, e), p in sorted(self.access.items()) if p > 0],
            "decay": self.decay,
        }

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "plan") -> Plan:
        if d.get("format") != PLAN_FORMAT:
            raise ConfigError(f"{where}: format {d.get('format')!r}, expected {PLAN_FORMAT}")
        forms = {(int(layer), int(e)): Form[f.upper()] for layer, e, f in d["forms"]}
        return cls(
            budget=int(d["budget"]),
            reserve=int(d["reserve"]),
            forms=forms,
            expected_makespan_s=float(d["expected_makespan_s"]),
            chosen=d["chosen"],
            candidates=d.get("candidates", {}),
            access={(int(layer), int(e)): float(p) for layer, e, p in d.get("access", [])},
            scope=d.get("scope", "global"),
            device=d.get("device", ""),
            decay=float(d["decay"]) if d.get("decay") is not None else None,
            store_id=str(d.get("store_id", "")),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        try:
            return cls.from_json(json.loads(Path(path).read_text()), str(path))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path}: cannot read the plan ({type(e).__name__}: {e})") from None


def _task_costs(w: Workload, costs: CostModel, on_device: bool):
    io = {f: {k: costs.io_time(s, f) for k, s in w.sizes.items()} for f in Form}
    cpu = {f: {k: costs.cpu_time(s, f, on_device) for k, s in w.sizes.items()} for f in Form}
    return io, cpu


def expected_makespan(
    w: Workload,
    forms: dict[Key, Form],
    costs: CostModel,
    workers: int,
    on_device: bool = False,
    max_steps: int = 150,
) -> float:
    """Mean over the workload's steps of the sum over layers of the layer scheduler's makespan, with each
    expert held in ``forms`` (static placement)."""
    steps = w.steps[:max_steps]
    if not steps:
        return 0.0
    total = 0.0
    for step in steps:
        for pos, picks in enumerate(step):
            layer = w.layers[pos]
            tasks = []
            for e, t in picks:
                k = (layer, e)
                f = forms.get(k, Form.DISK)
                if f == Form.FULL:
                    continue
                s = w.sizes[k]
                tasks.append((k, costs.io_time(s, f), costs.cpu_time(s, f, on_device), t, s.shards))
            if tasks:
                # decodes are cut into shard pieces only for an accelerator, as the engine does (decode_parts)
                n = pieces_for(len(tasks), workers, min(x[4] for x in tasks)) if on_device else 1
                total += plan_layer([Task(k, a, b, t, parts=n) for k, a, b, t, _ in tasks], workers).makespan
    return total / len(steps)


def _greedy(
    w: Workload,
    cache_bytes: int,
    io: dict,
    cpu: dict,
    workers: int,
    allowed,
    start: dict[Key, Form] | None = None,
    pieces: int = 1,
) -> dict[Key, Form]:
    """Greedy upgrades by objective decrease per byte (see the module docstring). Per layer the objective
    is max(A, B / min(W, n P)) + 0.3 min(A, B / min(W, n P)) + q * b / P: expected read time A, decode
    time B spread over at most as many lanes as there are pieces to decode (n expected non-FULL active
    experts, each cut into up to P pieces), plus the decode that follows the last read (q: probability that
    any non-FULL expert is active, b: one decode, over P lanes).
    ``io`` and ``cpu``: per form, per expert, its read and decode seconds (_task_costs)."""
    p = w.access
    forms = dict(start) if start else {k: Form.DISK for k in w.sizes}
    A = {layer: 0.0 for layer in w.layers}
    B = {layer: 0.0 for layer in w.layers}
    N = {layer: 0.0 for layer in w.layers}
    LOGQ = {layer: 0.0 for layer in w.layers}  # sum of log(1 - p) over non-FULL experts
    bdec = {layer: 0.0 for layer in w.layers}
    for k in w.sizes:
        pk = min(p.get(k, 0.0), 1 - 1e-9)
        f = forms[k]
        A[k[0]] += pk * io[f][k]
        B[k[0]] += pk * cpu[f][k]
        if f != Form.FULL:
            N[k[0]] += pk
            LOGQ[k[0]] += math.log1p(-pk)
        bdec[k[0]] = max(bdec[k[0]], cpu[Form.DISK][k])

    def J(layer: int, a: float, b: float, n: float, logq: float) -> float:
        x, y = a, b / min(workers, max(1.0, n) * pieces)
        return max(x, y) + 0.3 * min(x, y) + (1 - math.exp(logq)) * bdec[layer] / pieces

    def moved(k: Key, target: Form):
        f = forms[k]
        layer = k[0]
        pk = min(p.get(k, 0.0), 1 - 1e-9)
        a = A[layer] + pk * (io[target][k] - io[f][k])
        b = B[layer] + pk * (cpu[target][k] - cpu[f][k])
        full_now, full_then = f == Form.FULL, target == Form.FULL
        n = N[layer] + (pk if full_now else 0) - (pk if full_then else 0)
        lq = LOGQ[layer] - (math.log1p(-pk) if full_then and not full_now else 0)
        return a, b, n, lq

    def gain(k: Key, target: Form) -> tuple[float, int]:
        layer = k[0]
        a, b, n, lq = moved(k, target)
        return J(layer, A[layer], B[layer], N[layer], LOGQ[layer]) - J(layer, a, b, n, lq), w.sizes[k].held(
            target
        ) - w.sizes[k].held(forms[k])

    heap = []
    for k in w.sizes:
        if p.get(k, 0.0) <= 0:
            continue
        for t in allowed:
            g, c = gain(k, t)
            if g > 0 and c > 0:
                heap.append((-g / c, k[1], k[0], t))  # ties go round-robin over layers, not layer by layer
    heapq.heapify(heap)
    used = sum(w.sizes[k].held(f) for k, f in forms.items() if f != Form.DISK)
    while heap:
        _, e, layer, t = heapq.heappop(heap)
        k = (layer, e)
        if t >= forms[k]:
            continue  # already at this form or better (forms are ordered best first)
        g, c = gain(k, t)
        if g <= 0 or c <= 0:
            continue
        ratio = g / c
        if heap and ratio < -heap[0][0] - 1e-15:
            heapq.heappush(heap, (-ratio, e, layer, t))  # stale: re-queue with its current value
            continue
        if used + c > cache_bytes:
            continue
        layer = k[0]
        A[layer], B[layer], N[layer], LOGQ[layer] = moved(k, t)
        used += c
        forms[k] = t
        for t2 in allowed:  # further upgrades of this expert
            if t2 >= t:
                continue
            g2, c2 = gain(k, t2)
            if g2 > 0 and c2 > 0:
                heapq.heappush(heap, (-g2 / c2, e, layer, t2))
    return forms


def _single_form(w: Workload, cache_bytes: int, form: Form) -> dict[Key, Form]:
    forms = {k: Form.DISK for k in w.sizes}
    used = 0
    for k in sorted(w.sizes, key=lambda k: (-w.access.get(k, 0.0), k[1], k[0])):
        need = w.sizes[k].held(form)
        if w.access.get(k, 0.0) <= 0 or used + need > cache_bytes:
            continue
        forms[k] = form
        used += need
    return forms


def make_plan(
    w: Workload,
    budget: int,
    costs: CostModel,
    workers: int,
    *,
    reserve: int = 0,
    on_device: bool = False,
    device: str = "",
    evaluator=None,
) -> Plan:
    """Choose the forms of every expert for ``budget`` bytes (``reserve`` of them kept for staging).

    ``evaluator({name: forms}) -> {name: seconds}`` (optional) re-scores the ``EVALUATE_TOP`` best candidates
    of the static model and the single-form caches with a more faithful model (the simulator passes short
    replays of the workload through the dynamic cache, several at once where a core is free), and the plan
    is chosen on those scores."""
    if budget < reserve:
        raise BudgetError(f"budget {budget:,} B is below the staging reserve {reserve:,} B")
    cache = budget - reserve
    cands: dict[str, dict[Key, Form]] = {}
    # The FULL form only pays off when it covers a layer's active experts together (it removes the decode
    # that follows the last read), which a per-byte greedy cannot see; so search over the share of the
    # cache given to the most popular experts in full form, and fill the rest greedily.
    io, cpu = _task_costs(w, costs, on_device)
    lower = tuple(f for f in UPGRADES if f != Form.FULL)
    shards = min((s.shards for s in w.sizes.values()), default=1)
    pieces = max(1, min(shards, workers)) if on_device else 1  # lanes one expert's decode can spread over
    for share in (0.0, 0.1, 0.2, 0.35, 0.5, 0.7, 0.85, 1.0):
        start = _single_form(w, int(cache * share), Form.FULL) if share else None
        forms = _greedy(w, cache, io, cpu, workers, lower, start=start, pieces=pieces)
        cands[f"planned-full{round(share * 100)}"] = forms
    for f in UPGRADES:
        cands[f"{f.label}-only"] = _single_form(w, cache, f)
    scores = {name: expected_makespan(w, forms, costs, workers, on_device) for name, forms in cands.items()}
    if evaluator is not None:
        ranked = sorted((n for n in scores if n.startswith("planned")), key=scores.__getitem__)[:EVALUATE_TOP]
        shortlist = [*ranked, *(n for n in scores if n.endswith("-only"))]
        scores = evaluator({name: cands[name] for name in shortlist})
    chosen = min(scores, key=lambda n: (scores[n], not n.startswith("planned")))
    return Plan(
        budget=budget,
        reserve=reserve,
        forms=cands[chosen],
        expected_makespan_s=scores[chosen],
        chosen=chosen,
        candidates=scores,
        access=dict(w.access),
        device=device,
    )
