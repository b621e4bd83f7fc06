"""Checks the engine runs on a store and what it is handed before anything starts: the whole store against
its checksums (``verify``), a plan made for it, a recorded trace next to it. Each blocks briefly and raises
a ZipMoEError saying what to do."""

from __future__ import annotations

import logging
import os
import time

from .errors import ConfigError, StoreCorruptError

__all__ = ["check_trace_next_to_store", "checked_plan", "verify_before_start"]

log = logging.getLogger(__name__)


def verify_before_start(store_dir: str) -> None:
    """Every checksum of the store, before anything starts (no decode). Raises StoreCorruptError naming
    the first damaged file, tensor or expert (and how many more)."""
    from .store.verify import verify_store

    t0 = time.perf_counter()
    report = verify_store(store_dir, decode=False)
    if not report.ok:
        problems = [f for f in report.failures if not f.startswith("...")]
        more = (
            f" (and {len(problems) - 1} more: `zipmoe verify {store_dir}` lists them)"
            if len(problems) > 1
            else ""
        )
        raise StoreCorruptError(f"{store_dir}: --verify: {problems[0]}{more}")
    log.info(
        "verified %d chunks (%.1f MB) in %.1f s", report.chunks, report.bytes / 1e6, time.perf_counter() - t0
    )


def checked_plan(plan, store, store_dir: str, budget: int):
    """The plan (loaded from its file if given as a path), refused (ConfigError) when it was made for another
    store, with a warning when made for another budget (its shares per form then apply to this budget)."""
    from .plan.planner import Plan

    p = plan if isinstance(plan, Plan) else Plan.load(plan)
    mine = store.index.store_id.hex()
    if p.store_id and p.store_id != mine:
        raise ConfigError(
            f"the plan was made for another store (id {p.store_id[:12]}..., this one is {mine[:12]}...); "
            f"make one for this store: zipmoe plan --store {store_dir} --memory-budget ... --out PLAN"
        )
    if not p.store_id:
        log.warning("the plan records no store identity (made without --store, or by an older version)")
    if p.budget != budget:
        log.warning(
            "the plan was made for a memory budget of %s B, this engine has %s B: its shares per cache "
            "form are re-scaled to this budget",
            f"{p.budget:,}",
            f"{budget:,}",
        )
    return p


def check_trace_next_to_store(store_dir: str, store) -> None:
    """A trace next to the store (what start-up plans from) must have been recorded on a store of the same
    checkpoint (routing depends on the weights, not on how they were compressed); ConfigError otherwise."""
    from .plan.choice import TRACE_NAME
    from .trace.recorded import load_recorded

    path = os.path.join(store_dir, TRACE_NAME)
    if not os.path.isfile(path):
        return
    theirs = load_recorded(path).fingerprint
    mine = store.index.source["fingerprint"]
    if theirs and theirs != mine:
        raise ConfigError(
            f"{path} was recorded on a store of another checkpoint (fingerprint {theirs[:12]}..., this "
            f"store's {mine[:12]}...); the engine plans from it: remove or move it"
        )
