"""The memory budget, in one place: parsed once, its minimum computed once, refused once.

    --memory-budget 25%  ->  Budget.parse(spec, layout)  ->  budget.require(layout, nodes)  ->  SchedulerConfig

The budget covers every cached form of every routed expert *and* the buffers in flight (read buffers and
decoded outputs: the staging); non-expert weights and activations are reported apart. Its minimum is the
staging reserve: one MoE layer's active experts, each read from disk and decoded, in flight at once
(``top_k`` x the largest expert's extent plus its decoded bytes). Across ``n`` nodes the budget is split
equally and each node stages its share of a layer, ``ceil(top_k / n)`` experts (more are served in waves).

The scheduler and the cache keep their own invariant checks (BudgetError with the figures); a user meets
the refusal here, before anything starts, with the flag and the number to give.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..cache.forms import ExpertSizes, Form, Key
from ..cache.layout import ModelLayout
from ..errors import BudgetError
from .sizes import parse_size

__all__ = ["Budget", "inflight_per_node", "machine_memory", "minimum_budget"]


def minimum_budget(sizes: dict[Key, ExpertSizes], experts_in_flight: int) -> int:
    """The smallest budget that serves ``experts_in_flight`` experts of one layer, each read from disk and
    decoded, at once: the staging reserve."""
    worst = max(s.staging(Form.DISK) for s in sizes.values())
    return experts_in_flight * worst


def machine_memory() -> int | None:
    """Bytes of memory this process can have: the physical memory, or the cgroup's limit when lower
    (containers); None where neither can be read."""
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        cg = int(limit) if limit.isdigit() else None
    except OSError:
        cg = None
    known = [m for m in (phys, cg) if m]
    return min(known) if known else None


def inflight_per_node(top_k: int, nodes: int) -> int:
    """Experts of one layer a node stages at once: its share of the top-k (more are served in waves)."""
    return max(1, math.ceil(top_k / nodes))


@dataclass(frozen=True)
class Budget:
    """A parsed memory budget: ``bytes`` in all, out of ``expert_bytes`` of routed experts."""

    bytes: int
    expert_bytes: int

    @classmethod
    def parse(cls, spec: int | str, layout: ModelLayout) -> Budget:
        """Bytes from ``spec`` (bytes, ``1.5GiB``, ``800MB``, or ``25%`` of the routed-expert bytes). Raises
        BudgetError naming the accepted forms."""
        total = layout.expert_bytes
        return cls(parse_size(spec, total=total), total)

    def share(self) -> float:
        return self.bytes / self.expert_bytes if self.expert_bytes else 0.0

    def per_node(self, nodes: int) -> int:
        """Each node's share when the budget is split over ``nodes`` devices (each brings the same memory)."""
        return self.bytes // nodes

    def minimum(self, layout: ModelLayout, nodes: int = 1) -> int:
        """The smallest total budget that serves ``layout`` on ``nodes`` devices."""
        inflight = layout.top_k if nodes == 1 else inflight_per_node(layout.top_k, nodes)
        return nodes * minimum_budget(layout.sizes, inflight)

    def require_memory(self, nodes: int = 1, memory: int | None = None, allow: bool = False) -> None:
        """Refuse a budget whose share per node exceeds the memory of this machine (``memory``, default
        :func:`machine_memory`), unless ``allow`` (``--allow-budget-above-memory``)."""
        memory = machine_memory() if memory is None else memory
        share = self.per_node(nodes)
        if allow or memory is None or share <= memory:
            return
        per = f" per node ({nodes} nodes)" if nodes > 1 else ""
        raise BudgetError(
            f"memory budget {share:,} B{per} is more than this machine's memory ({memory:,} B, "
            f"{memory / 2**30:.1f} GiB): the cache would not fit; give a smaller --memory-budget, or pass "
            "--allow-budget-above-memory if you know better"
        )

    def require(self, layout: ModelLayout, nodes: int = 1) -> None:
        """Refuse a budget below :meth:`minimum`, with the figure to give ``--memory-budget``."""
        need = self.minimum(layout, nodes)
        if self.bytes >= need:
            return
        share = f"{self.share():.1%} of the routed-expert bytes"
        if nodes == 1:
            raise BudgetError(
                f"memory budget {self.bytes:,} B ({share}) is too small: one MoE layer's {layout.top_k} active "
                f"experts need {need:,} B of buffers in flight ({need / self.expert_bytes:.1%}); give at least "
                f"--memory-budget {need}"
            )
        inflight = inflight_per_node(layout.top_k, nodes)
        raise BudgetError(
            f"memory budget {self.bytes:,} B ({share}) split over {nodes} nodes leaves {self.per_node(nodes):,} B "
            f"per node; each needs at least {need // nodes:,} B for {inflight} experts in flight: give at least "
            f"--memory-budget {need}"
        )
