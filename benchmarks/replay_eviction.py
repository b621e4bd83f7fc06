"""Replay a recorded routing trace under several eviction rules: how many expert reads each would need.

Question: for the routing a server or a generation really saw (a zipmoe-trace/1 file, `zipmoe serve
--trace-out` or `zipmoe generate --trace-out`), how far from the fewest possible reads is each way of choosing
what a cache of N equal slots keeps, and does the best rule change with the batch size?

Every rule sees the same accesses in the trace's order: per generation step, per MoE layer, the experts the
layer routed to (with their token counts). A slot holds one expert (for a zipmoe store, a compressed extent:
`--slots` is then the budget over the extent); a miss is one read of it. Rules:

* ``belady``: evict the expert used furthest ahead (sim/bound.py; the fewest misses of any rule, even one
  that knows the future: the floor);
* ``lru``: evict the least recently used;
* ``arc``: adaptive replacement (Megiddo and Modha, 2003), balancing recency against frequency;
* ``count``: a decayed token count per expert, the engine's order (cache/popularity.py): a missed expert is
  admitted only over the coldest one not used by the current layer, and only if its count is higher;
  ``--decays`` lists the per-step decays replayed (1 is an undecayed count);
* ``tinylfu``: LRU order with frequency admission (Einziger et al., 2017): a missed expert replaces the LRU
  victim only if it was used more often, counts halved every ten times the slots in accesses.

This is a model of the engine's cache, not the engine: one form, equal slots, no staging, no prefetch.
Reads are reported per range of generations (``--levels``: cumulative generation counts, as bench_serve
records them; default: every generation as one range) in misses and, with ``--slot-bytes``, in GB.

    python benchmarks/replay_eviction.py TRACE --slots 88 [--levels 1,9,11,12] [--slot-bytes 11467368]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

Key = tuple[int, int]


def steps_of(trace) -> list[tuple[int, list[tuple[int, list[tuple[int, int]]]]]]:
    """Per step of the trace, in order: (request, [(layer, [(expert, tokens), ...]), ...])."""
    return [(s.request, [(layer, list(picks)) for layer, picks in s.layers.items()]) for s in trace.steps]


def _flat(steps) -> list[list[Key]]:
    return [[(layer, e) for layer, picks in layers for e, _ in picks] for _, layers in steps]


def belady(steps, slots: int) -> list[int]:
    from zipmoe_ray.sim.bound import belady_misses

    return belady_misses(_flat(steps), slots)


def lru(steps, slots: int) -> list[int]:
    held: collections.OrderedDict = collections.OrderedDict()
    out = []
    for keys in _flat(steps):
        m = 0
        for k in keys:
            if k in held:
                held.move_to_end(k)
                continue
            m += 1
            held[k] = None
            if len(held) > slots:
                held.popitem(last=False)
        out.append(m)
    return out


def arc(steps, slots: int) -> list[int]:
    t1: collections.OrderedDict = collections.OrderedDict()  # seen once recently
    t2: collections.OrderedDict = collections.OrderedDict()  # seen at least twice
    b1: collections.OrderedDict = collections.OrderedDict()  # ghosts evicted from t1
    b2: collections.OrderedDict = collections.OrderedDict()  # ghosts evicted from t2
    p = 0  # the target size of t1

    def replace(k) -> None:
        if t1 and (len(t1) > p or (k in b2 and len(t1) == p)):
            b1[t1.popitem(last=False)[0]] = None
        else:
            b2[t2.popitem(last=False)[0]] = None

    out = []
    for keys in _flat(steps):
        m = 0
        for k in keys:
            if k in t1:
                del t1[k]
                t2[k] = None
                continue
            if k in t2:
                t2.move_to_end(k)
                continue
            m += 1
            if k in b1:
                p = min(slots, p + max(len(b2) // max(len(b1), 1), 1))
                replace(k)
                del b1[k]
                t2[k] = None
                continue
            if k in b2:
                p = max(0, p - max(len(b1) // max(len(b2), 1), 1))
                replace(k)
                del b2[k]
                t2[k] = None
                continue
            if len(t1) + len(b1) == slots:
                if len(t1) < slots:
                    b1.popitem(last=False)
                    replace(k)
                else:
                    t1.popitem(last=False)
            elif len(t1) + len(t2) + len(b1) + len(b2) >= slots:
                if len(t1) + len(t2) + len(b1) + len(b2) >= 2 * slots:
                    b2.popitem(last=False)
                replace(k)
            t1[k] = None
        out.append(m)
    return out


def count(steps, slots: int, decay: float) -> list[int]:
    score: dict[Key, float] = collections.defaultdict(float)
    scale = 1.0
    held: set[Key] = set()
    out = []
    for _, layers in steps:
        m = 0
        for layer, picks in layers:
            busy = {(layer, e) for e, _ in picks}  # in use by this layer: never a victim
            for e, tokens in picks:
                score[(layer, e)] += tokens * scale
            for e, _ in picks:
                k = (layer, e)
                if k in held:
                    continue
                m += 1
                if len(held) < slots:
                    held.add(k)
                    continue
                free = [x for x in held if x not in busy]
                if not free:
                    continue
                coldest = min(free, key=score.__getitem__)
                if score[k] > score[coldest]:
                    held.discard(coldest)
                    held.add(k)
        scale /= decay
        if scale > 1e100:
            for x in score:
                score[x] /= scale
            scale = 1.0
        out.append(m)
    return out


def tinylfu(steps, slots: int) -> list[int]:
    freq: collections.Counter = collections.Counter()
    held: collections.OrderedDict = collections.OrderedDict()
    window, seen, out = 10 * slots, 0, []
    for keys in _flat(steps):
        m = 0
        for k in keys:
            freq[k] += 1
            seen += 1
            if seen >= window:
                for x in freq:
                    freq[x] //= 2
                seen = 0
            if k in held:
                held.move_to_end(k)
                continue
            m += 1
            if len(held) < slots:
                held[k] = None
            elif freq[k] > freq[next(iter(held))]:
                held.popitem(last=False)
                held[k] = None
        out.append(m)
    return out


def rules(decays: list[float]) -> dict:
    out = {"belady": belady, "lru": lru, "arc": arc, "tinylfu": tinylfu}
    for d in decays:
        out[f"count {d:g}"] = lambda steps, slots, d=d: count(steps, slots, d)
    return out


def per_range(steps, misses: list[int], levels: list[int] | None) -> list[int]:
    """Misses summed per range of generations (``levels``: cumulative counts of generations, in order)."""
    order = sorted({r for r, _ in steps})
    bounds = levels or [len(order)]
    where = {}
    for i, (lo, hi) in enumerate(zip([0, *bounds], bounds)):
        for r in order[lo:hi]:
            where[r] = i
    out = [0] * len(bounds)
    for (r, _), m in zip(steps, misses):
        if r in where:
            out[where[r]] += m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="a zipmoe-trace/1 file")
    ap.add_argument("--slots", type=int, required=True, help="experts the cache holds")
    ap.add_argument("--levels", help="cumulative generation counts that end each range (default: one range)")
    ap.add_argument("--slot-bytes", type=int, help="bytes a miss reads (the extent), to report GB")
    ap.add_argument("--decays", default="0.8,0.98,1", help="per-step decays of the count rule")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.slots < 1:
        ap.error("--slots must be at least 1")
    from zipmoe_ray.errors import ZipMoEError
    from zipmoe_ray.trace.recorded import load_recorded

    try:
        steps = steps_of(load_recorded(args.trace))
        decays = [float(x) for x in args.decays.split(",") if x]
        levels = [int(x) for x in args.levels.split(",")] if args.levels else None
    except (ZipMoEError, OSError, ValueError) as e:
        sys.exit(f"replay_eviction: {e}")
    if any(not 0 < d <= 1 for d in decays):
        ap.error("--decays must be in (0, 1]")
    results = {}
    for name, rule in rules(decays).items():
        results[name] = per_range(steps, rule(steps, args.slots), levels)
    unit = (lambda m: f"{m * args.slot_bytes / 1e9:.2f} GB") if args.slot_bytes else (lambda m: f"{m} misses")
    print(
        f"{args.trace}: {len(steps)} steps, {args.slots} slots; reads per range of generations {levels or 'all'}"
    )
    for name, ms in results.items():
        print(f"  {name:12s} " + " | ".join(unit(m) for m in ms))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"slots": args.slots, "levels": levels, "misses": results}, indent=2)
        )


if __name__ == "__main__":
    main()
