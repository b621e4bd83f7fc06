"""`zipmoe calibrate --engine`: measure the runtime itself into a device profile's fields.

An all-hit run gives the time per layer outside the experts, per token outside the layers and the
executor's real expert rate; a run under a small budget with every cached expert compressed (so that the
decode lanes are busy beside the model, as they are wherever a plan keeps compressed forms) gives the
scheduler round trip, the executor's time taking over each delivered expert and the decode rate of the
lanes while everything else runs, which is what the simulator needs to predict this machine's engine.
Round trips and hand-overs are means, not medians: the simulator adds them up, one per layer and one per
expert, as the engine's time does. Passed to ``plan.calibrate.calibrate`` as its engine probe.
"""

from __future__ import annotations

import numpy as np

from ..engine import ZipMoEEngine
from ..plan.profile import DeviceProfile
from ..stages.client import response_waits

__all__ = ["measure_engine"]


def measure_engine(store: str, workers: int, base: DeviceProfile) -> tuple[dict, dict]:
    """Measure the runtime on ``store`` (Ray backend): an all-hit run and a run under a small budget."""
    prompt = [3 + (i * 7) % 200 for i in range(32)]
    out, src = {}, {}
    opts = {"backend": "ray", "num_decompressors": workers, "timeline": True}
    with ZipMoEEngine(store, memory_budget="200%", **opts) as e:
        e.generate(prompt, 16)
        e.generate(prompt, 16)  # everything resident now
        e.reset_stats()
        e.generate(prompt, 16)
        tl = e.timeline()
        expert_bytes = max(s.full for s in e.sizes.values())
        layers = len(e.store.layers())
    steps = [t for t, k, *_ in tl if k == "step"]
    moe, n_experts, layer_t = 0.0, 0, None
    for t, kind, _layer, x, _ in tl:
        if steps and (t < steps[0] or t > steps[-1]):
            continue
        if kind == "layer":
            layer_t = t
            n_experts += x
        elif kind == "layer_done" and layer_t is not None:
            moe += t - layer_t
    nsteps = max(1, len(steps) - 1)
    total = steps[-1] - steps[0] if len(steps) > 1 else 0.0
    per_token_outside = (total - moe) / nsteps
    out["executor_gbps"] = n_experts * expert_bytes / max(moe, 1e-9) / 1e9
    src["executor_gbps"] = "measured: the engine applying resident experts (all-hit run)"
    # split the time outside MoE layers into per layer and per token with the base profile's estimate of
    # a layer's non-expert work (4 expert sizes): what the simulator would otherwise assume
    out["non_moe_s_per_layer"] = min(
        per_token_outside / layers, 4 * expert_bytes / (out["executor_gbps"] * 1e9)
    )
    out["non_moe_s_per_token"] = max(0.0, per_token_outside - layers * out["non_moe_s_per_layer"])
    src["non_moe_s_per_layer"] = "measured: time outside MoE layers in an all-hit run, per layer"
    src["non_moe_s_per_token"] = "measured: the rest of that time, per token (embeddings, lm_head, sampling)"
    loaded = {**opts, "policy": "compressed-only", "replan_every": 0}
    with ZipMoEEngine(store, memory_budget="15%", **loaded) as e:
        e.generate(prompt, 16)
        e.reset_stats()
        e.generate(prompt, 24)
        tl = e.timeline()
        st = e.stats()
    reqs = response_waits(tl)
    if reqs:
        out["request_overhead_s"] = float(np.mean(reqs))
        src["request_overhead_s"] = (
            "measured: scheduler round trip per layer (blocked on the response), mean, lanes busy"
        )
    handoff = _handoff_s(tl, expert_bytes / (out["executor_gbps"] * 1e9), base, workers)
    if handoff is not None:
        out["delivery_overhead_s"] = handoff
        src["delivery_overhead_s"] = (
            "measured: executor time per delivered expert beyond computing it (its compute taken as "
            "slowed by busy lanes), mean, lanes busy"
        )
    lanes = st["lanes"]
    if lanes["decode_busy_s"] > 0 and lanes["decoded_bytes"] > 0:
        observed = lanes["decoded_bytes"] / lanes["decode_busy_s"] / 1e9
        scale = observed / base.decode_gbps_per_core
        out["decompress_gbps_per_core"] = base.decompress_gbps_per_core * scale
        out["recombine_gbps_per_core"] = base.recombine_gbps_per_core * scale
        src["decompress_gbps_per_core"] = src["recombine_gbps_per_core"] = (
            f"measured: decode lanes in the engine ({observed:.2f} GB/s per lane while the model runs beside them)"
        )
    return out, src


def _handoff_s(events: list[tuple], compute_s: float, base: DeviceProfile, workers: int) -> float | None:
    """The executor's mean time per delivered expert from its arrival (``ready``) to the end of its
    computation (``computed``), less ``compute_s`` (one expert alone) slowed as the simulator slows it
    with every lane busy (SimRunner.compute); None when no expert was delivered."""
    arrived: dict[tuple[int, int], float] = {}
    spans = []
    for t, kind, layer, expert, _ in events:
        if kind == "ready":
            arrived[(layer, expert)] = t
        elif kind == "computed" and (layer, expert) in arrived:
            spans.append(t - arrived.pop((layer, expert)))
    if not spans:
        return None
    threads = base.executor_cores + workers
    slowed = compute_s * (
        threads / base.cpu_cores if base.executor_cores and threads > base.cpu_cores else 1.0
    )
    return max(0.0, float(np.mean(spans)) - slowed)
