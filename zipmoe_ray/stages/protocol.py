"""The stages' contracts: what crosses between executor, scheduler and lanes, and what each side offers.

    Executor ─ ExpertClient ──Transport──> Scheduler ──TaskRunner──> IOLoader, Decompressor × W
                  ▲                             │
                  └──── handles (ObjectRefs / Futures / simulated times) of the lanes' results

Two implementations of Transport (local: a Scheduler in this process; ray: a Scheduler actor, plus other
nodes' ExpertHosts in a cluster) and three of TaskRunner (threads, actors, the simulator's virtual clock);
tests/unit/test_protocols.py checks that each keeps these signatures. Everything here pickles.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..cache.forms import Key

__all__ = ["Delivery", "Later", "LayerResponse", "TaskRunner", "Transport"]


class Later:
    """A region a decode lane is handed before it has arrived (a Future or an ObjectRef of a read still
    running): the lane decompresses the exponent shards it already has while the sign+mantissa planes are
    read, and waits for them only to recombine (Decompressor.decode). Pickles with its handle (Ray passes
    an ObjectRef nested in an argument through unresolved)."""

    __slots__ = ("handle",)

    def __init__(self, handle: Any):
        self.handle = handle

    def get(self) -> Any:
        """The region; blocks until it has arrived. Raises what the read raised."""
        h = self.handle
        if isinstance(h, Future):
            return h.result()
        ray = sys.modules.get("ray")  # an ObjectRef exists only where ray was imported
        if ray is not None and isinstance(h, ray.ObjectRef):
            return ray.get(h)
        return h


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
    drop_full: list[Key] = field(default_factory=list)  # FULL copies the executor must drop
    # (expert, tokens) the staging cannot take yet: asked for again as the layer's experts are released
    deferred: list[tuple[int, int]] = field(default_factory=list)
    tasks: Any = (
        None  # lanes in the executor: (task specs, tokens let go of) to run there (backends/colocated.py)
    )


class TaskRunner(Protocol):
    """Where the scheduler's tasks run: threads (local backend), actors (Ray backend) or a virtual clock
    (the simulator).

    Every method returns immediately with a handle; handles may be passed as inputs to later tasks. Tasks
    on one lane, and reads on the I/O lane, run in the order they were submitted."""

    workers: int  # decode lanes

    def read(self, key: Key, part: str) -> Any:
        """One region of an extent: ``exp`` (compressed exponent shards), ``raw`` (SM planes) or ``all``."""
        ...

    def read_split(self, key: Key) -> tuple[Any, Any]:
        """The whole extent as two handles, (E region, SM region), read in that order: the E region's
        handle completes first, so that its decode can start while the SM region is still being read."""
        ...

    def decode(
        self,
        lane: int,
        key: Key,
        exp: Any,
        sm: Any,
        planes_only: bool = False,
        part: tuple[int, int] | None = None,
    ) -> Any:
        """Verify and decode an expert on ``lane`` from its E and SM regions (handles or arrays): the flat
        weights, or with ``part=(i, n)`` the i-th of n pieces (see Decompressor.decode)."""
        ...

    def decode_lane(self, lane: int, jobs: list[tuple]) -> list[Any]:
        """``decode`` for each of ``jobs`` ((key, exp, sm, planes_only, part), in order) on ``lane``: one
        call for a layer's pieces on one lane; their handles, in order."""
        ...

    def derive(self, lane: int, key: Key, words: Any, part: str) -> Any:
        """Rebuild an expert's SM region (``raw``) or whole extent (``all``) from its decoded weights."""
        ...


class Transport(Protocol):
    """The executor's side of the control path: how its ExpertClient reaches the scheduler, waits for
    result handles, and (in a cluster) has experts computed on the node that holds them."""

    node_timeout: float | None  # seconds to wait on another node before checking it lives (None: no nodes)

    def request(self, layer: int, misses: list, hits: list, released: list, used: list) -> Any:
        """Fetch ``misses`` ((expert, tokens) not held in FULL form) of ``layer``; ``hits`` are FULL hits
        served meanwhile, ``released`` experts the executor finished with, ``used`` prefetched experts it
        used ((layer, expert, tokens)). Does not block: returns a pending answer for :meth:`resolve`
        (handles, which the scheduler gives at once), so the executor computes its hits meanwhile."""
        ...

    def prefetch(self, layer: int, picks: list, released: list, used: list) -> Any:
        """Have the scheduler start fetching ``picks`` ((expert, tokens) predicted for ``layer``), with the
        reports gathered since the last call (``released``, ``used`` as for :meth:`request`); does not
        block: returns a pending answer for :meth:`resolve`."""
        ...

    def resolve(self, pending: Any) -> LayerResponse:
        """The scheduler's answer to a :meth:`request` or :meth:`prefetch` (blocks until it is there)."""
        ...

    def release(self, released: list, used: list) -> None:
        """Between steps: experts finished with, used prefetched experts; does not block."""
        ...

    def steps(self, reports: list[tuple]) -> None:
        """Ends of generation steps, in order, each ``(hits, released, used, timing)``: FULL hits served
        without a request, released experts, used prefetched experts, and for a decode step its (seconds,
        rows) (the online re-planning's measure); the scheduler applies them as ``Scheduler.step`` in turn.
        Does not block."""
        ...

    def wait_any(self, handles: list, timeout: float | None = None) -> list:
        """The handles of ``handles`` that are ready: at least one, or none after ``timeout`` seconds."""
        ...

    def get(self, handle: Any) -> Any:
        """The value of a ready handle; raises the stage's error (ChecksumError, ...) unchanged."""
        ...

    def compute(self, node: str, layer: int, expert: int, kind: str, x: Any, w: Any, value: Any) -> Any:
        """Have ``node``'s ExpertHost compute an expert on input rows ``x`` with routing weights ``w``."""
        ...

    def unresponsive(self, nodes: set[str], timeout: float) -> set[str]:
        """Of ``nodes``, those that do not answer a ping within ``timeout`` seconds."""
        ...

    def node_failed(self, node: str) -> None:
        """Take ``node`` out: its experts get new homes (the scheduler re-homes them)."""
        ...

    def is_node_failure(self, e: BaseException) -> bool:
        """Whether ``e`` means a node's work was lost (its process or node died), not a bug or bad data."""
        ...
