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

import numpy as np

from ..cache.forms import ExpertSizes, Form

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


def _entries(workload, steps):
    """The measured steps as flat arrays: one entry per (step, layer, active expert): its pair (step x
    layer) index, non-decreasing, and its expert index into ``keys``."""
    keys = sorted(workload.sizes)
    index = {k: i for i, k in enumerate(keys)}
    rows = [
        [index[(layer, e)] for e, _ in picks] for step in steps for layer, picks in zip(workload.layers, step)
    ]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    expert = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    pair = np.repeat(np.arange(len(rows)), lengths)
    return keys, pair, expert, len(rows)


def _segment_max(values: np.ndarray, starts: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """Per pair, the largest of its entries' ``values`` (0 for a pair without entries)."""
    out = (
        np.maximum.reduceat(values, np.minimum(starts, len(values) - 1))
        if len(values)
        else np.zeros(len(starts))
    )
    out[empty] = 0.0
    return out


def _form_costs(workload, keys, profile, raw: bool):
    """Per expert and form option (best first: FULL, COMPRESSED, SM, DISK; a raw store: FULL, DISK): bytes
    held, read seconds, decode seconds on one lane; per expert its pieces and compute seconds; per option
    whether using it needs a fetch (everything but FULL)."""
    costs = profile.costs()
    on_device = profile.recombine_on_device
    forms = (Form.FULL, Form.DISK) if raw else (Form.FULL, Form.COMPRESSED, Form.SM, Form.DISK)
    held = np.zeros((len(keys), len(forms)))
    read = np.zeros_like(held)
    dec = np.zeros_like(held)
    exec_bps = profile.executor_gbps * 1e9
    pieces = np.ones(len(keys))
    compute = np.zeros(len(keys))
    for i, k in enumerate(keys):
        s = workload.sizes[k]
        if raw:
            s = ExpertSizes(s.full, s.full, 0, s.full, raw_codec=True)
        for j, f in enumerate(forms):
            held[i, j] = s.held(f)
            read[i, j] = costs.io_time(s, f)
            dec[i, j] = costs.cpu_time(s, f, on_device)
        pieces[i] = max(1, min(s.shards, profile.decode_workers)) if on_device else 1
        compute[i] = s.full / exec_bps
    fetch = np.array([0.0 if f == Form.FULL else 1.0 for f in forms])  # 1 where a form must be fetched
    return forms, held, read, dec, pieces, compute, fetch


def _mckp_lp(held: np.ndarray, cost: np.ndarray, budget: float) -> tuple[float, np.ndarray]:
    """The LP relaxation of choosing one option per expert (``held`` bytes, ``cost`` seconds; the last
    option holds nothing) within ``budget`` bytes: a lower bound on the best integral choice. Returns the
    value and, per expert, the option it takes (the one fractional expert rounded to the cheaper side)."""
    n, m = held.shape
    base = cost[:, -1].sum()
    items = []  # (saving per byte, expert, option, bytes, saving): segments of each expert's lower hull
    for i in range(n):
        pts = [(0.0, 0.0, m - 1)] + [(held[i, j], cost[i, -1] - cost[i, j], j) for j in range(m - 1)]
        pts.sort(key=lambda x: (x[0], -x[1]))
        hull: list[tuple[float, float, int]] = []
        for p in pts:
            if hull and p[1] <= hull[-1][1]:
                continue  # holds more for no more saving
            while len(hull) >= 2:
                (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
                if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                    hull.pop()
                else:
                    break
            hull.append(p)
        for a, b in itertools.pairwise(hull):
            db, ds = b[0] - a[0], b[1] - a[1]
            items.append((ds / db if db > 0 else float("inf"), i, b[2], db, ds))
    items.sort(key=lambda it: -it[0])
    choice = np.full(n, m - 1)
    saved, left = 0.0, float(budget)
    for _, i, j, db, ds in items:
        if left <= 0:
            break
        take = min(1.0, left / db) if db > 0 else 1.0
        saved += take * ds
        left -= take * db
        if take >= 1.0:
            choice[i] = j
    return base - saved, choice


def _project_simplex(x: np.ndarray) -> np.ndarray:
    """Each column of ``x`` projected onto the probability simplex (Euclidean; Duchi et al. 2008)."""
    k = x.shape[0]
    u = -np.sort(-x, axis=0)
    css = np.cumsum(u, axis=0) - 1.0
    idx = np.arange(1, k + 1)[:, None]
    rho = (u - css / idx > 0).sum(axis=0)
    theta = css[rho - 1, np.arange(x.shape[1])] / rho
    return np.maximum(x - theta, 0.0)


def _lagrangian(pair, expert, npairs, costs, workers, budget, overheads=(0.0, 0.0), rounds=30, lr=0.5):
    """A lower bound on min over allocations (one form per expert within ``budget``) of the sum over
    (step, layer) pairs of max(compute + a hand-off per fetched expert (the executor takes each over in
    turn), round trip + max(reads, decodes / W, the longest expert chain: read + decode over its pieces +
    hand-off + compute)), the round trip and hand-off (``overheads``) paid only by a pair that fetches.

    For weights w (per pair, a point of the simplex over the four terms) and v (per pair, one active
    expert: its chain, and whether it is fetched, stand for the pair's), the pair's time is >= w . terms:
    linear in the allocation, so the minimum over allocations is a multiple-choice knapsack whose LP
    relaxation (_mckp_lp) is a valid bound for *any* w and v. The rounds maximise it over w by projected
    subgradient ascent (the dual function is concave; its subgradient is the terms under the minimising
    allocation), v being each pair's longest chain under the current allocation."""
    _, held, read, dec, pieces, compute, fetch = costs
    trip, handoff = overheads
    n_exp, m = held.shape
    tab_read, tab_dec = read.ravel(), dec.ravel()
    tab_chain = (read + dec / pieces[:, None] + handoff * fetch[None, :]).ravel()  # + the expert's compute
    rows = expert * m  # + an entry's option: its index into the tables
    cexp = compute[expert]
    cmp_pair = np.bincount(pair, weights=cexp, minlength=npairs)
    starts = np.searchsorted(pair, np.arange(npairs))
    empty = np.bincount(pair, minlength=npairs) == 0
    ent = np.arange(len(pair), dtype=float)
    w = np.full((4, npairs), 0.25)
    choice = np.full(n_exp, m - 1)  # the allocation v is read from: everything on disk at first
    best, scale = 0.0, None
    for t in range(rounds):
        chain = tab_chain[rows + choice[expert]] + cexp
        longest_chain = _segment_max(chain, starts, empty)
        longest = _segment_max(np.where(chain >= longest_chain[pair], ent, -1.0), starts, empty).astype(
            np.int64
        )
        v_exp = expert[longest]  # per pair the expert v picks: (the last of) its longest chains
        v_exp[empty] = 0
        w3 = np.where(empty, 0.0, w[3])
        alpha = np.bincount(expert, weights=w[0][pair], minlength=n_exp) + np.bincount(v_exp, w3, n_exp)
        beta = np.bincount(expert, weights=w[1][pair], minlength=n_exp) / workers + np.bincount(
            v_exp, w3 / pieces[v_exp], n_exp
        )
        gamma = np.bincount(v_exp, np.where(empty, 0.0, trip * (w[0] + w[1] + w[3]) + handoff * w[3]), n_exp)
        gamma += handoff * np.bincount(
            expert, weights=w[2][pair], minlength=n_exp
        )  # the executor's hand-offs
        const = float(np.sum(w[2] * cmp_pair) + np.sum(w3 * compute[v_exp]))
        cost = alpha[:, None] * read + beta[:, None] * dec + gamma[:, None] * fetch[None, :]
        value, choice = _mckp_lp(held, cost, budget)
        best = max(best, value + const)
        opt = rows + choice[expert]  # the subgradient: each term under the minimising allocation
        ride = np.where(empty, 0.0, trip * fetch[choice[v_exp]])
        terms = np.stack(
            [
                np.bincount(pair, weights=tab_read[opt], minlength=npairs) + ride,
                np.bincount(pair, weights=tab_dec[opt], minlength=npairs) / workers + ride,
                cmp_pair + handoff * np.bincount(pair, weights=fetch[choice[expert]], minlength=npairs),
                np.where(empty, 0.0, tab_chain[v_exp * m + choice[v_exp]] + compute[v_exp]) + ride,
            ]
        )
        if scale is None:
            scale = float(np.mean(np.abs(terms))) or 1.0
        w = _project_simplex(w + (lr / np.sqrt(t + 1)) * terms / scale)
    return best


def online_lower_bound(workload, budget: int, profile, steps=None) -> dict[str, float]:
    steps = workload.steps if steps is None else steps
    if not steps:
        return {"tpot_s": 0.0}
    exec_bps, non_layer, non_token = executor_rates(workload, profile)
    keys, pair, expert, npairs = _entries(workload, steps)
    n = len(steps)
    overheads = (profile.request_overhead_s or 0.0, profile.delivery_overhead_s or 0.0)
    per_store = []
    for raw in (False, True):
        costs = _form_costs(workload, keys, profile, raw)
        rounds = 12 if raw else 30  # the raw store's two options settle in a few rounds
        per_store.append(
            _lagrangian(pair, expert, npairs, costs, profile.decode_workers, budget, overheads, rounds=rounds)
        )
    moe = min(per_store) / n  # valid for both stores: the compressed one (zipmoe) and a raw one (full-lru)
    compute_s = float(sum(workload.sizes[keys[i]].full for i in expert.tolist()) / exec_bps / n)
    L = len(workload.layers)
    return {
        "tpot_s": moe + L * non_layer + non_token,
        "compute_s": compute_s + L * non_layer + non_token,
    }


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
