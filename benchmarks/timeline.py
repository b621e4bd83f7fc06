"""Turn an executor timeline (an engine started with timeline=True) into "where the time of a token goes"."""

from __future__ import annotations

import bisect

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


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


class _Busy:
    """The device's busy time as disjoint sorted intervals; busy seconds inside any window by bisection, so
    that a profile of thousands of layers costs a logarithm per layer."""

    def __init__(self, intervals: list[tuple[float, float]]):
        self.spans = _union(intervals)
        self.starts = [a for a, _ in self.spans]
        self.ends = [b for _, b in self.spans]
        self.cum = [0.0]
        for a, b in self.spans:
            self.cum.append(self.cum[-1] + b - a)

    def upto(self, t: float) -> float:
        """Busy seconds before time ``t``."""
        k = bisect.bisect_right(self.starts, t)
        if k == 0:
            return 0.0
        return self.cum[k - 1] + min(t, self.ends[k - 1]) - self.starts[k - 1]

    def within(self, a: float, b: float) -> float:
        return self.upto(b) - self.upto(a) if b > a else 0.0

    def first_last(self, a: float, b: float) -> tuple[float, float] | None:
        """When the device first starts and last stops being busy inside [a, b] (None: idle throughout)."""
        i = bisect.bisect_right(self.ends, a)  # first interval ending after a
        j = bisect.bisect_left(self.starts, b) - 1  # last interval starting before b
        if i > j:
            return None
        return max(a, self.starts[i]), min(b, self.ends[j])


DECODE_IDLE_KEYS = (
    "layer_start",  # in a MoE layer, before its first read starts (the request's round trip, hits first)
    "between_reads",  # in a MoE layer, between two reads (nothing queued: staging full, or decoding)
    "layer_end",  # in a MoE layer, after its last read (the last experts decoded and computed)
    "layers_without_reads",  # MoE layers that read nothing (every expert held)
    "between_layers",  # from one MoE layer's end to the next one's start within a step (attention)
    "step_boundaries",  # from a step's last MoE layer to the next step's first (lm_head, sampling, ...)
)


def device_idle(events: list[tuple], reads: list[tuple], start: float, end: float) -> dict:
    """Where the storage device idles in [start, end] (unix seconds), from an executor timeline
    (``ZipMoEEngine.timeline()``) and the device's reads (``ZipMoEEngine.read_timeline()``) of one generation:
    seconds busy and idle over the window, in the prefill (until the first step ends) and in the decode
    steps, whose idle time is split by where the executor was (:data:`DECODE_IDLE_KEYS`; they add up to
    ``decode_idle_s``). With an emulated device each read is the interval it booked. One device's reads:
    on a cluster, one node's (``ZipMoEEngine.read_timeline()``'s last field), beside that node's events."""
    busy = _Busy([(r[0], r[0] + r[1]) for r in reads if r[0] < end and r[0] + r[1] > start])
    steps = sorted(e[0] for e in events if e[1] == "step" and start <= e[0] <= end)
    first = steps[0] if steps else end

    def idle(a: float, b: float) -> float:
        return max(0.0, (b - a) - busy.within(a, b))

    spans, opened = [], None
    for t, kind, *_ in events:
        if not first <= t <= end:
            continue
        if kind == "layer":
            opened = t
        elif kind == "layer_done" and opened is not None:
            spans.append((opened, t))
            opened = None
    parts = dict.fromkeys(DECODE_IDLE_KEYS, 0.0)
    for a, b in spans:
        fl = busy.first_last(a, b)
        if fl is None:
            parts["layers_without_reads"] += b - a
            continue
        parts["layer_start"] += fl[0] - a
        parts["layer_end"] += b - fl[1]
        parts["between_reads"] += idle(fl[0], fl[1])
    edges = [first, *[x for s in spans for x in s], end]
    for a, b in zip(edges[0::2], edges[1::2]):  # the gaps around and between the layers
        boundary = a == first or b == end or bisect.bisect_left(steps, a) < bisect.bisect_right(steps, b)
        parts["step_boundaries" if boundary else "between_layers"] += idle(a, b)
    return {
        "window_s": end - start,
        "busy_s": busy.within(start, end),
        "idle_s": idle(start, end),
        "prefill_s": first - start,
        "prefill_idle_s": idle(start, first),
        "decode_s": end - first,
        "decode_idle_s": idle(first, end),
        "decode_idle": parts,
    }
