"""A workload for the planner and the simulator: expert sizes, and routing steps drawn from a trace.

``access[(layer, expert)]`` is the probability that the expert is active in a decode step, estimated from
the steps the workload yields, so it reflects which expert is popular (not only its rank) and the real
number of experts active per step (top-k at batch 1, more at larger batches).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..cache.forms import ExpertSizes, Key
from ..codec import auto_shards
from ..trace.counts import CountTrace
from ..trace.recorded import RecordedTrace

__all__ = ["ESTIMATED_RATIO", "Workload", "estimated_sizes"]

ESTIMATED_RATIO = 0.663  # stored/original of BF16 experts measured on random-init and trained weights

Step = list[list[tuple[int, int]]]  # [layer position] -> [(expert, tokens)]


def estimated_sizes(expert_bytes: int, ratio: float = ESTIMATED_RATIO) -> ExpertSizes:
    """Form sizes of a BF16 expert of ``expert_bytes`` without a store: SM = half, E = the rest of ``ratio``;
    exponent shards per tensor as ``zipmoe compress`` chooses them for its three tensors (gate, up, down)."""
    sm = expert_bytes // 2
    exp = int(expert_bytes * (ratio - 0.5))
    return ExpertSizes(expert_bytes, sm + exp, exp, sm, shards=auto_shards(expert_bytes // 2 // 3))


@dataclass
class Workload:
    layers: list[int]  # model layer ids, in order
    num_experts: int
    top_k: int
    sizes: dict[Key, ExpertSizes]
    steps: list[Step]  # decode steps, in order
    batch: int = 1
    non_expert_bytes_per_layer: int | None = None
    access: dict[Key, float] = field(default_factory=dict)
    recorded: bool = False  # steps come from a recorded trace (real order), not drawn from counts
    # per step, per layer position: the experts prefetch predicted for it (recorded traces with prefetch on;
    # None: no predictions, the simulator fetches nothing ahead)
    predictions: list[Step] | None = None

    def __post_init__(self):
        if not self.access:
            self._estimate_access()

    def _estimate_access(self) -> None:
        n = max(1, len(self.steps))
        seen = [[0] * self.num_experts for _ in self.layers]  # steps each expert is active in, per layer
        for step in self.steps:
            for row, picks in zip(seen, step):
                for e, _ in picks:
                    row[e] += 1
        self.access = {k: 0.0 for k in self.sizes}
        for layer, row in zip(self.layers, seen):
            for e, c in enumerate(row):
                if c:
                    self.access[(layer, e)] = c / n

    @property
    def expert_bytes(self) -> int:
        return sum(s.full for s in self.sizes.values())

    @classmethod
    def from_count_trace(
        cls, trace: CountTrace, *, batch: int = 1, seed: int = 0, layers: list[int] | None = None, sizes=None
    ) -> Workload:
        ids = layers or list(range(trace.num_layers))
        sizes = sizes or {
            (layer, e): estimated_sizes(trace.expert_bytes) for layer in ids for e in range(trace.num_experts)
        }
        return cls(
            ids,
            trace.num_experts,
            trace.top_k,
            sizes,
            list(trace.steps(batch=batch, seed=seed)),
            batch,
            trace.model.get("non_expert_bytes_per_layer"),
        )

    @classmethod
    def from_recorded(cls, trace: RecordedTrace, *, sizes=None, include_prefill: bool = False) -> Workload:
        ids = trace.layers
        m = trace.model
        sizes = sizes or {
            (layer, e): estimated_sizes(m["expert_bytes"]) for layer in ids for e in range(m["num_experts"])
        }
        kept = [s for s in trace.steps if include_prefill or s.kind == "decode"]
        steps = [[list(s.layers.get(layer, [])) for layer in ids] for s in kept]
        predictions = None
        if any(s.predicted for s in kept):
            predictions = [[list(s.predicted.get(layer, [])) for layer in ids] for s in kept]
        batch = max((s.batch for s in trace.steps), default=1)
        return cls(
            ids,
            m["num_experts"],
            m["top_k"],
            sizes,
            steps,
            batch,
            m.get("non_expert_bytes_per_layer"),
            recorded=True,
            predictions=predictions,
        )

    @classmethod
    def uniform(
        cls,
        layers: list[int],
        num_experts: int,
        top_k: int,
        sizes,
        *,
        steps: int = 256,
        batch: int = 1,
        seed: int = 0,
    ):
        """No trace: every expert equally likely (the engine's default prior)."""
        rng = random.Random(seed)
        out = []
        for _ in range(steps):
            step = []
            for _ in layers:
                picks: dict[int, int] = {}
                for _ in range(batch):
                    for e in rng.sample(range(num_experts), top_k):
                        picks[e] = picks.get(e, 0) + 1
                step.append(sorted(picks.items()))
            out.append(step)
        return cls(list(layers), num_experts, top_k, sizes, out, batch)
