"""Turn an executor timeline (an engine started with timeline=True) into "where the time of a token goes"."""

from __future__ import annotations


def breakdown(events: list[tuple]) -> dict[str, float]:
    """Average milliseconds per generated token spent: in scheduler round trips (blocked on the answer: from
    the request, or from the last expert computed after it, to the response),
    waiting for experts to arrive, computing experts, and outside the MoE layers (attention, shared
    experts, lm_head, sampling). Uses the steps between the first and the last recorded step."""
    steps = [i for i, e in enumerate(events) if e[1] == "step"]
    if len(steps) < 2:
        return {}
    ev = events[steps[0] : steps[-1] + 1]
    n = len(steps) - 1
    total = ev[-1][0] - ev[0][0]
    request = wait = moe = 0.0
    t_req = t_layer = None
    last = None
    for t, kind, *_ in ev:
        if kind == "layer":
            t_layer = last = t
        elif kind == "request":
            t_req = t
        elif kind == "response" and t_req is not None:
            request += max(0.0, t - t_req)
            t_req = None
            last = t
        elif kind == "ready" and last is not None:
            wait += t - last
            last = t
        elif kind == "computed":  # a FULL hit computed while the request is answered is not a round trip
            last = t
            if t_req is not None:
                t_req = t
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
