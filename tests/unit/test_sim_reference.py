"""The simulator's fast paths (sim runner, cache, layer plan and dispatch, executor model) against plain reference
versions of each (tests/reference_sim.py): every figure of every policy's result must be identical."""

from __future__ import annotations

import dataclasses

import pytest

import zipmoe_ray.sim.simulator as simulator
import zipmoe_ray.stages.placement as placement
import zipmoe_ray.stages.scheduler as scheduler
from zipmoe_ray.plan import BUILTIN_PROFILES, Workload
from zipmoe_ray.sim import SIM_POLICIES, simulate
from zipmoe_ray.trace import synth

from ..reference_sim import RefCache, RefRunner, ref_dispatch, ref_executor_layer

pytestmark = pytest.mark.unit


def workload(experts: int, top_k: int, skew: float, batch: int = 1) -> Workload:
    shape = dict(num_layers=3, num_experts=experts, top_k=top_k, expert_bytes=1_000_000)
    w = Workload.from_count_trace(synth(**shape, prompts=4, tokens=30, skew=skew, seed=3), batch=batch)
    for k in w.sizes:
        w.sizes[k] = dataclasses.replace(w.sizes[k], shards=4)
    return w


def results(w, budget, profile, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(simulator.SimRunner, "on_profile", classmethod(_ref_on_profile))
        monkeypatch.setattr(scheduler, "ExpertCache", RefCache)
        monkeypatch.setattr(placement.Placement, "_dispatch", ref_dispatch)
        monkeypatch.setattr(simulator, "executor_layer", ref_executor_layer)
    out = {}
    for policy in SIM_POLICIES:
        out[policy] = simulate(w, budget, profile, policy, warm_start=False, measure_from=20).to_json()
    return out


def _ref_on_profile(cls, sizes, profile, costs=None):
    return RefRunner(
        sizes,
        costs or profile.costs(),
        profile.decode_workers,
        on_device=profile.recombine_on_device,
    )


@pytest.mark.parametrize(
    "profile,experts,top_k,skew,batch,share",
    [
        ("orin-agx-64gb", 12, 2, 1.0, 1, 0.3),  # pieces over 10 lanes, recombined on the device
        ("orin-agx-64gb", 16, 4, 0.5, 2, 0.15),  # waves: more active experts than the budget holds at once
        ("orin-agx-32gb", 12, 3, 1.5, 1, 0.5),
    ],
)
def test_fast_paths_give_the_reference_results(monkeypatch, profile, experts, top_k, skew, batch, share):
    p = BUILTIN_PROFILES[profile]
    w = workload(experts, top_k, skew, batch)
    budget = int(share * w.expert_bytes)
    fast = results(w, budget, p)
    ref = results(w, budget, p, monkeypatch)
    assert fast == ref
