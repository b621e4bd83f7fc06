"""The prefetch precision gate: when predicting the next layer's experts is worth fetching them.

Shared by the executor's ExpertClient (stages/client.py) and the simulator's replay of recorded predictions
(sim/prefetch.py), so that both open and shut the gate at the same steps. Plain Python: no torch.
"""

from __future__ import annotations

__all__ = ["MIN_PRECISION", "PRECISION_MEMORY", "PrefetchGate"]

# A wrong guess costs its read on the I/O lane; a right one saves at most that read's wait: prefetch pays
# only while more than half of what it fetches is used. Below that the client stops sending predictions,
# but goes on scoring them against the routing that follows, fetching nothing, so the gate opens again as
# soon as the routing becomes predictable (another prompt, another phase) at no cost while it is not.
MIN_PRECISION = 0.5
# weight of the past in the running precision, per predicted layer: one sample a layer (the share of its
# guesses it routed to), so that a prefill, whose prediction names most experts and is mostly right, counts
# as much as one decode step and cannot hold the gate open for the decode steps after it
PRECISION_MEMORY = 0.9


class PrefetchGate:
    """The running share of a predicted layer's guesses that it routed to (optimistic start)."""

    __slots__ = ("precision",)

    def __init__(self) -> None:
        self.precision = 1.0

    @property
    def open(self) -> bool:
        """Whether predictions are fetched (else only scored)."""
        return self.precision >= MIN_PRECISION

    def scored(self, used: int, guessed: int) -> None:
        """A predicted layer routed to ``used`` of its ``guessed`` experts (fetched or only scored)."""
        if guessed:
            self.precision = PRECISION_MEMORY * self.precision + (1 - PRECISION_MEMORY) * used / guessed
