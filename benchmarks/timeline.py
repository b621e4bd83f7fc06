"""Turn an executor timeline (an engine started with timeline=True) into "where the time of a token goes"."""

from __future__ import annotations

from zipmoe_ray.stages.client import response_waits


def breakdown(events: list[tuple]) -> dict[str, float]:
    """Average milliseconds per generated token spent: in scheduler round trips (the time blocked on the
    answers, ``zipmoe_ray.stages.client.response_waits``), waiting for experts to arrive, computing
    experts, and outside the MoE layers (attention, shared experts, lm_head, sampling). Uses the steps
    between the first and the last recorded step."""
    steps = [i for i, e in enumerate(events) if e[1] == "step"]
    if len(steps) < 2:
        return {}
    ev = events[steps[0] : steps[-1] + 1]
    n = len(steps) - 1
    total = ev[-1][0] - ev[0][0]
    request = sum(response_waits(ev))  # blocked on answers, the hits computed meanwhile left out
    wait = moe = 0.0
    t_layer = last = None
    for t, kind, *_ in ev:
        if kind == "layer":
            t_layer = last = t
        elif kind in ("response", "computed"):
            last = t
        elif kind == "ready" and last is not None:
            wait += t - last
            last = t
        elif kind == "layer_done" and t_layer is not None:
            moe += t - t_layer
            t_layer = None
    return {
        "token_ms": 1e3 * total / n,
        "scheduler_round_trips_ms": 1e3 * request / n,
        "waiting_for_experts_ms": 1e3 * wait / n,
        "expert_compute_ms": 1e3 * (moe - request - wait) / n,
        "outside_moe_layers_ms": 1e3 * (total - moe) / n,
    }


BREAKDOWN_KEYS = {  # breakdown_ms's key: breakdown's
    "round_trips": "scheduler_round_trips_ms",
    "waiting_for_experts": "waiting_for_experts_ms",
    "expert_compute": "expert_compute_ms",
    "outside_moe": "outside_moe_layers_ms",
}


def breakdown_ms(events: list[tuple]) -> dict[str, float] | None:
    """:func:`breakdown` as the benchmarks' JSON reports it (``breakdown_ms``): milliseconds per generated
    token in ``round_trips``, ``waiting_for_experts``, ``expert_compute`` and ``outside_moe``; they add up to
    the timeline's token time. None when fewer than two steps were recorded."""
    where = breakdown(events)
    return {k: where[v] for k, v in BREAKDOWN_KEYS.items()} if where else None
