"""Device profiles and the planner (plan/profile.py, planner.py): plans fit the budget, round-trip, and match the workload."""

from __future__ import annotations

import dataclasses
import json

import pytest

from zipmoe_ray.cache.forms import Form
from zipmoe_ray.errors import ConfigError
from zipmoe_ray.plan import BUILTIN_PROFILES, Plan, Workload, load_profile, make_plan
from zipmoe_ray.runtime.budget import minimum_budget
from zipmoe_ray.sim import simulate
from zipmoe_ray.trace import synth

ORIN = BUILTIN_PROFILES["orin-agx-64gb"]


SHAPE = dict(num_layers=3, num_experts=12, top_k=2, expert_bytes=1_000_000)


def workload(skew: float, prompts=3, tokens=40, seed=0, batch=1) -> Workload:
    w = Workload.from_count_trace(
        synth(**SHAPE, prompts=prompts, tokens=tokens, skew=skew, seed=seed), batch=batch
    )
    for k in w.sizes:
        w.sizes[k] = dataclasses.replace(w.sizes[k], shards=4)
    return w


def test_profiles(tmp_path):
    assert set(BUILTIN_PROFILES) >= {"orin-agx-64gb", "orin-agx-32gb"}
    for p in BUILTIN_PROFILES.values():
        assert set(p.sources) >= {"ssd_read_gbps", "decompress_gbps_per_core", "cpu_cores", "memory_bytes"}
    ORIN.save(tmp_path / "p.json")
    assert load_profile(str(tmp_path / "p.json")) == ORIN
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_profile("pdp-11")
    with pytest.raises(ConfigError, match="ssd_read_gbps"):
        dataclasses.replace(ORIN, ssd_read_gbps=0)
    assert ORIN.decode_gbps_per_core == ORIN.decompress_gbps_per_core  # GPU recombination
    cpu = dataclasses.replace(ORIN, recombine_on_device=False)
    assert cpu.decode_gbps_per_core < cpu.decompress_gbps_per_core


def test_a_budget_that_fits_everything_plans_everything_and_only_hits():
    w = workload(1.0)
    budget = 2 * w.expert_bytes
    plan = make_plan(w, budget, ORIN.costs(), ORIN.decode_workers, reserve=minimum_budget(w.sizes, 2))
    used = {k for k, p in w.access.items() if p > 0}
    assert all(plan.forms[k] != Form.DISK for k in used)
    r = simulate(w, budget, ORIN, "zipmoe")
    assert r.hit_rates["disk"] == 0.0 and r.bytes_read == 0


def test_zero_skew_gives_a_uniform_plan():
    w = workload(0.0, prompts=6, tokens=200)
    w.access = {k: 2 / 12 for k in w.sizes}  # the exact uniform prior, without sampling noise
    budget = int(0.3 * w.expert_bytes)
    plan = make_plan(w, budget, ORIN.costs(), ORIN.decode_workers, reserve=minimum_budget(w.sizes, 2))
    per_layer = {}
    for (layer, _), f in plan.forms.items():
        per_layer.setdefault(layer, []).append(f)
    counts = [sum(f != Form.DISK for f in forms) for forms in per_layer.values()]
    assert max(counts) - min(counts) <= 1  # every layer gets the same share of the budget
    kinds = {f for forms in per_layer.values() for f in forms if f != Form.DISK}
    assert len(kinds) == 1  # one form for all: with no skew no expert earns a better one than another


@pytest.mark.parametrize("skew", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("share", [0.15, 0.4])
def test_plan_fits_the_budget_and_round_trips(skew, share):
    w = workload(skew)
    budget = int(share * w.expert_bytes)
    reserve = minimum_budget(w.sizes, 2)
    plan = make_plan(w, budget, ORIN.costs(), ORIN.decode_workers, reserve=reserve)
    assert 0 < sum(plan.held(w.sizes).values()) <= budget - reserve  # holds something, within the cache
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert (
        again.forms == {k: f for k, f in plan.forms.items() if f != Form.DISK} and again.chosen == plan.chosen
    )
