"""Lower bounds on TPOT for a workload, a budget and a device.

Two relaxations, both reported by the simulator; neither is an achievable schedule.

``online_lower_bound`` (the simulator's ``lower_bound_tpot_s`` for count traces): for systems that fetch a
layer's experts once its routing is known (layer by layer, no speculation: the runtime and every baseline)
and that do not know the future. Under the independent reference model (each step's experts drawn
independently from fixed popularities; count traces are drawn that way, up to the small dependence of
drawing without replacement), no online cache does better in expectation than the best *static*
allocation (the classic A0 result for independent references). Relax it further: let it hold any
fraction h_e of an expert's stored extent x_e (an SM-only copy saves its SM bytes of every read, a
COMPRESSED or FULL copy all of them) and fill the budget, in extents, with the most frequently used
experts of the measured steps. Then a layer takes at least its computation outside the experts plus the
largest of its expert computation, its expected reading and its expected decoding spread over all W
lanes (reads of a layer cannot start before its routing, so layers do not overlap), and a token at least
the sum over layers plus the per-token work. The sum of per-layer maxima is bounded below by any convex
combination of the three resources, whose minimum over fluid allocations (holding part of an expert's
extent, or all of it in full form) is a fractional knapsack; the bound is the best such combination on a
grid, taken for the compressed store and for a raw store (classic offloading) and the smaller kept, so it
holds for both.

``offline_lower_bound`` (``offline_lower_bound_tpot_s``; ``lower_bound_tpot_s`` for recorded traces):
for any policy, even one that knows the future and prefetches freely. Holding h bytes of an expert saves at
most h bytes of each of its reads, so the fewest bytes read is that of fluid paging with the budget in
extents; with equal sizes Belady's rule (evict what is used furthest in the future), started with the
budget filled by the experts used soonest, is optimal for it, fractional holdings included (offline
paging with equal page sizes has an integral LP optimum). Every miss is also one read request. Reading
and computing could at best overlap completely: TPOT >= max(compute, reading) / steps.

Staging buffers are ignored by both (more room only lowers a bound).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter

__all__ = ["belady_misses", "lower_bound", "offline_lower_bound", "online_lower_bound"]


def belady_misses(requests: list[list[tuple[int, int]]], capacity: int) -> list[int]:
    """Misses per step of Belady's MIN on ``requests`` (per step, the keys used), with a cache of
    ``capacity`` equal-size items pre-filled with the keys used soonest."""
    flat = [(i, k) for i, keys in enumerate(requests) for k in keys]
    nxt = [0] * len(flat)
    last: dict = {}
    for j in range(len(flat) - 1, -1, -1):
        nxt[j] = last.get(flat[j][1], 1 << 60)
        last[flat[j][1]] = j
    cache: set = set()
    heap: list = []  # (-next use, key), lazily invalidated
    when: dict = {}
    for j, (_, k) in enumerate(flat):  # pre-fill: the first `capacity` distinct keys by first use
        if len(cache) >= capacity:
            break
        if k not in cache:
            cache.add(k)
            when[k] = j
            heapq.heappush(heap, (-j, k))
    misses = [0] * len(requests)
    for j, (i, k) in enumerate(flat):
        if k not in cache:
            misses[i] += 1
            if capacity <= 0:
                continue
            while len(cache) >= capacity:
                neg, v = heapq.heappop(heap)
                if v in cache and when[v] == -neg:
                    cache.discard(v)
            cache.add(k)
        when[k] = nxt[j]
        heapq.heappush(heap, (-nxt[j], k))
    return misses


def executor_rates(workload, profile) -> tuple[float, float, float]:
    """(executor bytes/s for expert weights, seconds outside the experts per layer, per token) on
    ``profile``: a per-layer figure the profile lacks is estimated from the layer's non-expert bytes (or
    four experts' worth)."""
    sizes = workload.sizes
    exec_bps = profile.executor_gbps * 1e9
    non_layer = profile.non_moe_s_per_layer
    if non_layer is None:
        per_layer = workload.non_expert_bytes_per_layer or 4 * max(s.full for s in sizes.values())
        non_layer = per_layer / exec_bps
    return exec_bps, non_layer, profile.non_moe_s_per_token or 0.0


def _knapsack(items: list[tuple[float, float, float]], budget: float) -> float:
    """Fractional knapsack over concave per-expert frontiers: ``items`` are (expert id, bytes, saving)
    segments already in order within each expert; returns the largest total saving."""
    items = sorted(items, key=lambda it: -(it[2] / it[1]) if it[1] > 0 else 0.0)
    total = 0.0
    for _, nbytes, saving in items:
        if budget <= 0:
            break
        take = min(1.0, budget / nbytes) if nbytes > 0 else 1.0
        total += take * saving
        budget -= take * nbytes
    return total


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Segments (bytes, saving) of the upper concave hull of (0, 0) and ``points`` (bytes, saving)."""
    pts = sorted({(0.0, 0.0), *points})
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(hull) if b[1] > a[1]]


def online_lower_bound(workload, budget: int, profile, steps=None) -> dict[str, float]:
    steps = workload.steps if steps is None else steps
    if not steps:
        return {"tpot_s": 0.0}
    sizes = workload.sizes
    exec_bps, non_layer, non_token = executor_rates(workload, profile)
    bw, lat = profile.ssd_read_gbps * 1e9, profile.ssd_latency_s
    workers = profile.decode_workers
    dec_bps = (
        profile.decompress_gbps_per_core if profile.recombine_on_device else profile.decode_gbps_per_core
    ) * 1e9
    n = len(steps)
    L = len(workload.layers)
    uses: Counter = Counter()
    compute = [0.0] * L
    for step in steps:
        for pos, picks in enumerate(step):
            layer = workload.layers[pos]
            for e, _ in picks:
                uses[(layer, e)] += 1
                compute[pos] += sizes[(layer, e)].full / exec_bps
    compute = [c / n for c in compute]
    # Per use of an expert, the compressed store costs a read r of its extent (less what is held) and a
    # decode d on one of W lanes unless held in full; the raw store reads its full bytes, no decode.
    best = 0.0
    grid = [
        (a / 4, (4 - a - c) / 4, c / 4) for a in range(5) for c in range(5 - a)
    ]  # (compute, io, cpu) weights
    for wc, wi, wd in grid:
        for raw in (False, True):
            base, items = 0.0, []
            for k, u in uses.items():
                s = sizes[k]
                p = u / n
                if raw:
                    r = lat + s.full / bw
                    base += wi * p * r
                    items += [(k, nb, sv) for nb, sv in _frontier([(s.full, wi * p * r)])]
                else:
                    r = lat + s.extent / bw
                    d = s.full / dec_bps / workers
                    base += wi * p * r + wd * p * d
                    items += [
                        (k, nb, sv)
                        for nb, sv in _frontier([(s.extent, wi * p * r), (s.full, wi * p * r + wd * p * d)])
                    ]
            value = wc * sum(compute) + base - _knapsack(items, budget)
            if raw:
                raw_value = value
            else:
                comp_value = value
        best = max(best, min(comp_value, raw_value))  # valid for both stores at these weights
    total = best + L * non_layer + non_token
    return {"tpot_s": total, "compute_s": sum(compute) + L * non_layer + non_token}


def offline_lower_bound(workload, budget: int, profile, steps=None) -> dict[str, float]:
    steps = workload.steps if steps is None else steps
    if not steps:
        return {"tpot_s": 0.0}
    sizes = workload.sizes
    exec_bps, non_layer, non_token = executor_rates(workload, profile)
    extent = min(s.extent for s in sizes.values())
    compute = 0.0
    requests = []
    for step in steps:
        keys = []
        for pos, picks in enumerate(step):
            layer = workload.layers[pos]
            compute += non_layer
            for e, _ in picks:
                keys.append((layer, e))
                compute += sizes[(layer, e)].full / exec_bps
        compute += non_token
        requests.append(keys)
    n_miss = sum(belady_misses(requests, budget // extent))
    io = n_miss * (profile.ssd_latency_s + extent / (profile.ssd_read_gbps * 1e9))
    n = len(steps)
    return {
        "tpot_s": max(compute, io) / n,
        "compute_s": compute / n,
        "io_s": io / n,
        "oracle_misses_per_step": n_miss / n,
    }


def lower_bound(workload, budget: int, profile, steps=None, *, recorded: bool = False) -> dict[str, float]:
    """Both bounds; ``tpot_s`` is the online one for drawn (count-trace) workloads, the offline one for
    recorded traces, whose temporal locality an online policy may exploit."""
    off = offline_lower_bound(workload, budget, profile, steps)
    on = online_lower_bound(workload, budget, profile, steps)
    return {
        "tpot_s": off["tpot_s"] if recorded else on["tpot_s"],
        "kind": "offline" if recorded else "online",
        "online_tpot_s": on["tpot_s"],
        "offline_tpot_s": off["tpot_s"],
        "compute_s": on.get("compute_s", 0.0),
        "oracle_misses_per_step": off.get("oracle_misses_per_step", 0.0),
    }
