"""The split between cache forms an engine starts with: given, or planned for this store at start-up.

    explicit ``split`` or a baseline ``policy``  ->  as given ("fixed split")
    ``plan`` (a Plan or its JSON file)            ->  that plan ("given plan")
    a trace recorded next to the store            ->  planned from it (``zipmoe-trace.jsonl``)
    otherwise                                     ->  planned from a uniform prior

Planning uses the calibrated costs, so it runs between the backend's ``calibrate`` and ``start_pipeline``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from ..cache.layout import ModelLayout
from ..errors import ConfigError
from ..runtime.budget import minimum_budget
from ..stages.scheduler import SchedulerConfig
from .planner import Plan, make_plan
from .workload import Workload

__all__ = ["TRACE_NAME", "PlanChoice", "choose_split", "scheduler_config"]

log = logging.getLogger(__name__)

TRACE_NAME = "zipmoe-trace.jsonl"  # a recorded trace here is what the engine plans from


@dataclass
class PlanChoice:
    config: SchedulerConfig
    plan: Plan | None
    source: str  # said in stats()["split"]["source"]


def scheduler_config(
    config, budget: int, device: str | None, pieces_in_place: bool = False
) -> SchedulerConfig:
    """The scheduler's settings from an EngineConfig, a budget in bytes and the executor's device (None:
    not known here, the stages were placed elsewhere: planned as for a CPU). ``pieces_in_place``: the
    backend's lanes decode an expert's pieces into one shared buffer (see Backend.pieces_in_place)."""
    accel = (device or "cpu") != "cpu"
    rod = config.recombine_on_device
    return SchedulerConfig(
        budget=budget,
        split=config.split_rule(),
        popularity=config.popularity,
        decay=config.decay,
        recombine_on_device=bool(rod) if rod is not None else accel,
        keep_full_payload=not accel,
        # An expert's decode is spread over lanes when the pieces cost no copy: they go straight to an
        # accelerator, or the lanes share the executor's memory (the local backend decodes them in place);
        # a CPU executor behind Ray would have to copy the pieces together (docs/architecture.md).
        decode_parts=None if (accel or pieces_in_place) else 1,
        # the start-up plan is checked against full-only by timing both while generating (a fixed split
        # or a baseline policy is what the user asked for: kept as given)
        replan_every=config.replan_every if (config.split is None and config.policy == "zipmoe") else 0,
    )


def choose_split(
    store_dir: str, store, layout: ModelLayout, base: SchedulerConfig, costs, config, plan=None
) -> PlanChoice:
    """``base`` with the split (and popularity prior) of the plan chosen as the module docstring says.
    Raises ConfigError for a plan that names experts this store does not have."""
    if config.split is not None or config.policy != "zipmoe":
        return PlanChoice(base, None, "fixed split")
    if plan is not None:
        p = plan if isinstance(plan, Plan) else Plan.load(plan)
        source = "given plan"
    else:
        trace = os.path.join(store_dir, TRACE_NAME)
        w = None
        if os.path.isfile(trace):
            from ..trace.recorded import load_recorded

            w = Workload.from_recorded(load_recorded(trace), sizes=layout.sizes)
            source = f"planned from {trace}"
        if w is None or not w.steps:  # no trace, or one without a step
            w = Workload.uniform(store.layers(), store.num_experts, store.top_k, layout.sizes)
            source = "planned from a uniform prior"
        reserve = minimum_budget(layout.sizes, layout.top_k)
        p = make_plan(
            w, base.budget, costs, config.workers, reserve=reserve, on_device=base.recombine_on_device
        )
    unknown = [k for k in p.forms if k not in layout.sizes]
    if unknown:
        raise ConfigError(
            f"the plan names experts {unknown[:3]} that this store does not have; plan for this store"
        )
    log.info("cache plan (%s): %s", source, p.counts())
    config = replace(base, split=p.split_rule(layout.sizes), prior=p.access)
    if p.decay is not None and config.popularity == "lfu":
        config = replace(config, decay=p.decay)  # the popularity memory the plan was chosen with
    return PlanChoice(config, p, source)
