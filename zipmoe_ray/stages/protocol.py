"""What crosses between the executor and the scheduler (picklable; handles are ObjectRefs or Futures)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Delivery", "LayerResponse", "TaskRunner"]


@dataclass
class Delivery:
    """One expert on its way to the executor."""

    expert: int
    handle: Any  # resolves to the flat weights (unsigned words), or planes for on-device recombination
    kind: str  # "words" | "planes" | "raw" (raw-codec extent: the weights' bytes as stored)
    keep: bool  # the executor keeps it as the expert's FULL form
    form: str  # the form it was fetched from (for the executor's statistics)
    parts: list[Any] | None = None  # when the decode was spread over lanes: one handle per piece
    node: str | None = None  # compute on this node's ExpertHost instead of fetching the weights (clusters)


@dataclass
class LayerResponse:
    layer: int
    deliveries: list[Delivery]
    drop_full: list[tuple[int, int]] = field(default_factory=list)  # FULL copies the executor must drop
    deferred: list[tuple[int, int]] = field(
        default_factory=list
    )  # (expert, tokens) to request in a next wave


class TaskRunner(Protocol):
    """Where the scheduler's tasks run: threads (local backend) or actors (Ray backend).

    Every method returns immediately with handles; handles may be passed as inputs to later tasks. Tasks
    on one lane, and reads on the I/O lane, run in the order they were submitted."""

    workers: int

    def read(self, key: tuple[int, int], part: str) -> Any:
        """One region of an extent: ``exp`` (compressed exponent shards), ``raw`` (SM planes) or ``all``."""
        ...

    def read_split(self, key: tuple[int, int]) -> tuple[Any, Any]:
        """The whole extent in one read, as two handles: (E region, SM region)."""
        ...

    def decode(
        self, lane: int, key: tuple[int, int], exp: Any, sm: Any, planes_only: bool = False
    ) -> Any: ...

    def derive(self, lane: int, key: tuple[int, int], words: Any, part: str) -> Any: ...
