"""Simulating one model served across several devices (what one machine cannot show).

The same placement as the runtime's ClusterScheduler: every expert has a home device, interleaved
(``(layer + expert) mod n``); each device runs the runtime's own Scheduler over its budget with its own I/O
lane and decode lanes (SimRunner on the device profile). Device 0 runs the executor. Per MoE layer:

* experts homed on device 0 are served exactly as in ``simulate`` (full-form hits in executor memory, a
  scheduler round trip for the rest, each computed on the executor when ready);
* for each expert homed on device j > 0 the executor sends that expert's input rows (tokens x hidden x 2 B)
  over the network; device j fetches the expert through its cache (a full-form copy on j is served without
  a task), computes it on its accelerator (``expert bytes / executor_gbps``, one expert at a time), and
  sends the output rows back. The executor's network link is one lane each way (``bytes / gbps`` plus
  ``latency_s`` per message) and every remote expert costs ``rpc_overhead_s`` of call overhead;
* the layer ends when the executor's own experts and every remote output are done, plus the non-MoE time.

With one device this reduces to ``simulate`` step for step (tests/test_planning.py checks it).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import ConfigError
from ..runtime.budget import inflight_per_node
from ..stages.cluster_scheduler import home_index, remote_node_config
from ..stages.scheduler import Scheduler
from .runner import SimRunner, ready_time
from .simulator import executor_layer, policy_setup

__all__ = ["NETWORKS", "ClusterSimResult", "NetworkProfile", "simulate_cluster"]


def _ask(sched, runner, layer, experts, released, at):
    """A node scheduler's answer to a request sent at ``at`` (its tasks start then)."""
    runner.now = at
    return sched.request(layer, experts, [], released)


def _take(heap, order, answer, arrive) -> list:
    """Queue ``answer``'s deliveries by the time each can be computed (ready and its rows arrived); returns
    the experts it deferred."""
    for d in answer.deliveries:
        r = max(ready_time(d.parts or d.handle), arrive[d.expert])
        heapq.heappush(heap, (r, next(order), d.expert))
    return list(answer.deferred)


@dataclass(frozen=True)
class NetworkProfile:
    name: str
    gbps: float  # GB/s each way of one device's link
    latency_s: float  # one way, per message
    rpc_overhead_s: float  # per remote expert: the call to its device and the result back (both ends)
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.gbps > 0 or self.latency_s < 0 or self.rpc_overhead_s < 0:
            raise ConfigError(f"network {self.name}: gbps must be positive, latency and overhead >= 0")


NETWORKS = {
    "1gbe": NetworkProfile(
        "1gbe",
        0.117,
        150e-6,
        1e-3,
        {
            "gbps": "datasheet: 1000BASE-T, 1 Gbit/s = 0.125 GB/s less ~6% Ethernet/IP/TCP framing",
            "latency_s": "estimate: one switch hop between two hosts on a LAN, ~0.1-0.2 ms one way",
            "rpc_overhead_s": "estimate: a Ray actor call and its result, ~1 ms; a call to a loopback actor "
            "measured ~0.5-1 ms on this project's 2-core x86 VM (one scheduler round trip per layer ~1.9 ms)",
        },
    ),
    "10gbe": NetworkProfile(
        "10gbe",
        1.17,
        50e-6,
        1e-3,
        {"gbps": "datasheet: 10GBASE-T less framing", "latency_s": "estimate", "rpc_overhead_s": "as 1gbe"},
    ),
}


@dataclass
class ClusterSimResult:
    devices: int
    policy: str
    budget_per_device: int
    batch: int
    steps: int
    tpot_s: float
    tokens_per_s: float
    hit_rates: dict[str, float]
    bytes_read: int
    bytes_read_per_step: float
    remote_share: float  # of expert uses, those computed away from the executor's device
    network_bytes_per_step: float
    network: str
    per_device: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def simulate_cluster(
    workload,
    devices: int,
    budget_per_device: int,
    profile,
    network: NetworkProfile | str = "1gbe",
    policy: str = "zipmoe",
    *,
    hidden_size: int,
    warm_start: bool = True,
) -> ClusterSimResult:
    """Replay ``workload`` on ``devices`` copies of ``profile`` joined by ``network``, each with
    ``budget_per_device`` bytes, serving one model as the runtime's cluster mode does. Blocks."""
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"devices must be a positive integer, got {devices!r}")
    net = NETWORKS[network] if isinstance(network, str) else network
    ps = policy_setup(workload, policy, budget_per_device, profile, plan_budget=budget_per_device * devices)
    sizes = ps.sizes
    base = replace(ps.config, reserve_experts=inflight_per_node(workload.top_k, devices))
    costs = profile.costs()
    runners, scheds = [], []
    for j in range(devices):
        r = SimRunner.on_profile(sizes, profile, costs, executor=j == 0)
        cfg = base if j == 0 else remote_node_config(base)
        runners.append(r)
        scheds.append(Scheduler(ps.layout, cfg, r, costs))
    home = {key: home_index(key, devices) for key in sizes}
    exec_bps, non_layer, non_token = ps.exec_bps, ps.non_layer_s, ps.non_token_s
    net_bps = net.gbps * 1e9
    first = len(workload.steps) if warm_start else 0
    t = 0.0
    step_times: list[float] = []
    released: list[list] = [[] for _ in range(devices)]
    notes: list = []
    marks = None
    uses = remote_uses = 0
    net_bytes = 0.0
    compute_busy = [0.0] * devices
    for i, step in enumerate([*workload.steps, *workload.steps] if warm_start else workload.steps):
        if i == first:
            for s in scheds:
                s.reset_stats()
            marks = (t, [r.bytes_read for r in runners], [r.io_busy for r in runners])
            uses = remote_uses = 0
            net_bytes = 0.0
            compute_busy = [0.0] * devices
        t0 = t
        for pos, picks in enumerate(step):
            layer = workload.layers[pos]
            local = [(e, tok) for e, tok in picks if home[(layer, e)] == 0]
            away: dict[int, list] = {}
            for e, tok in picks:
                if home[(layer, e)]:
                    away.setdefault(home[(layer, e)], []).append((e, tok))
            uses += len(picks)
            # -- the executor's device: exactly simulate()'s layer ---------------------------------------
            t_exec, busy, released[0] = executor_layer(
                scheds[0],
                runners[0],
                layer,
                local,
                t,
                sizes,
                exec_bps,
                profile.request_overhead_s,
                released[0],
                notes,
                profile.delivery_overhead_s,
            )
            compute_busy[0] += busy
            # -- other devices: rows out, expert fetched and computed there, rows back ------------------------
            done = t_exec
            nic_out = nic_in = t
            for j, wanted in sorted(away.items()):
                remote_uses += len(wanted)
                sched, runner = scheds[j], runners[j]
                arrive: dict[int, float] = {}
                for e, tok in wanted:  # input rows leave the executor one message after another
                    nbytes = tok * hidden_size * 2
                    nic_out = max(nic_out, t) + nbytes / net_bps
                    arrive[e] = nic_out + net.latency_s + net.rpc_overhead_s / 2
                    net_bytes += nbytes
                lane = t
                tokens = dict(wanted)
                # as the executor's client: the first request, then one for the deferred experts as soon as a
                # result is back (its release rides along), its answer taken with the next result. A model:
                # the engine has one such request on its way for the whole layer, started by any computed
                # expert of it, and sends a deferred expert's rows only once it is placed; here each node
                # runs its own, and every row leaves at the layer's start
                heap, order, answer = [], itertools.count(), None
                lag = profile.request_overhead_s + net.latency_s
                deferred = _take(
                    heap, order, _ask(sched, runner, layer, wanted, released[j], lane + lag), arrive
                )
                released[j], back = [], lane
                while heap or deferred or answer is not None:
                    if not heap:
                        idle = answer is None
                        if idle:
                            answer = _ask(sched, runner, layer, deferred, released[j], back + lag)
                            released[j] = []
                        deferred, answer = _take(heap, order, answer, arrive), None
                        if idle and deferred and not heap:  # nothing in flight, given nothing: would loop
                            raise RuntimeError(
                                f"node {j} deferred every expert of layer {layer} with none in flight"
                            )
                        continue
                    r, _, e = heapq.heappop(heap)
                    dt = sizes[(layer, e)].full / exec_bps
                    # the node's ExpertHost takes the expert over (the profile's hand-over), then computes it
                    lane = max(lane, r) + profile.delivery_overhead_s + dt
                    compute_busy[j] += dt
                    released[j].append((layer, e))
                    nbytes = tokens[e] * hidden_size * 2
                    nic_in = max(nic_in, lane + net.latency_s) + nbytes / net_bps
                    net_bytes += nbytes
                    back = nic_in + net.rpc_overhead_s / 2
                    done = max(done, back)
                    if answer is not None:
                        deferred, answer = _take(heap, order, answer, arrive), None
                    if deferred:
                        answer = _ask(sched, runner, layer, deferred, released[j], back + lag)
                        released[j], deferred = [], []
            t = done + non_layer
        t += non_token
        for j, (s, r) in enumerate(zip(scheds, runners)):
            r.now = t
            s.step(notes if j == 0 else [], released[j])
            released[j] = []
        notes = []
        if i >= first:
            step_times.append(t - t0)
    if marks is None:
        raise ConfigError("the workload has no steps to simulate")
    elapsed = t - marks[0] or 1e-12
    stats = [s.stats() for s in scheds]
    hits = {f: sum(st["hits"][f] for st in stats) for f in stats[0]["hits"]}
    misses = sum(st["misses"] for st in stats)
    acc = sum(hits.values()) + misses
    read = sum(r.bytes_read - m for r, m in zip(runners, marks[1]))
    tpot = sum(step_times) / len(step_times)
    per_device = [
        {
            "device": j,
            "experts_homed": sum(1 for h in home.values() if h == j),
            "bytes_read": runners[j].bytes_read - marks[1][j],
            "hit_rates": {**stats[j]["hit_rate"], "disk": stats[j]["miss_rate"]},
            "io_utilisation": min(1.0, (runners[j].io_busy - marks[2][j]) / elapsed),
            "compute_utilisation": min(1.0, compute_busy[j] / elapsed),
        }
        for j in range(devices)
    ]
    return ClusterSimResult(
        devices=devices,
        policy=policy,
        budget_per_device=budget_per_device,
        batch=workload.batch,
        steps=len(step_times),
        tpot_s=tpot,
        tokens_per_s=workload.batch / tpot if tpot else 0.0,
        hit_rates={
            **{f: (v / acc if acc else 0.0) for f, v in hits.items()},
            "disk": misses / acc if acc else 0.0,
        },
        bytes_read=read,
        bytes_read_per_step=read / len(step_times),
        remote_share=remote_uses / uses if uses else 0.0,
        network_bytes_per_step=net_bytes / len(step_times),
        network=net.name,
        per_device=per_device,
    )
