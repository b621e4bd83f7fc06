"""The Backend contract: where the pipeline's stages run, and the only way the engine reaches them.

    ZipMoEEngine ──(prompts, generation, stats)──────────────────────────────────────────────────────┐
        │ Backend: start_lanes → calibrate → start_pipeline;  call / send / stream;  close            │
        ├── LocalBackend    every stage in this process, on threads; handles are Futures             │
        ├── RayBackend      every stage a Ray actor on one node; handles are ObjectRefs              │
        └── ClusterBackend  a loader and decoders per node, an ExpertHost per remote node            │
                                                                                                     │
    the stages (plain classes in zipmoe_ray/stages, the same under every backend):                  │
                                                                                                     │
        Executor ── ExpertClient ──(Transport: request / steps / wait_any / get)─> Scheduler          │
          model, FULL experts          one request per MoE layer                 cache + layer plan  │
                                                                                     │ (TaskRunner) │
                                                        IOLoader (reads) ◄───────────┤              │
                                                        Decompressor × W (decodes) ◄─┘              │
                                                                                                     │
The engine never branches on the backend: ``open_backend`` chooses one from the config; each backend
starts the stages it owns (the engine plans the cache between ``calibrate`` and ``start_pipeline``), runs
calls on the scheduler and the executor, streams generation events, gathers per-node lane statistics,
and stops what it started. The pipelined control path and prefetch live behind the Transport and the
TaskRunner (stages/protocol.py), so they change no backend method.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["STAGES", "Backend", "LaneStats"]

log = logging.getLogger(__name__)

STAGES = ("scheduler", "executor")  # what ``Backend.call`` reaches


@dataclass
class LaneStats:
    """What the lanes of every node report: one entry per node for ``stats()["nodes"]``, and the raw
    stats of the loaders and decompressors that answered."""

    nodes: dict[str, dict] = field(default_factory=dict)
    loaders: list[dict] = field(default_factory=list)
    decompressors: list[dict] = field(default_factory=list)


class Backend(ABC):
    """Runs the stages for one store. Methods block unless they say otherwise; none is thread-safe."""

    name: ClassVar[str]
    nodes: int = 1  # devices serving (more than one only for the cluster backend)
    pieces_in_place: ClassVar[bool] = False  # lanes decode an expert's pieces into one shared buffer

    def __init__(self, store_dir: str, store, config):
        """``store``: the opened store (store.Store); ``config``: the EngineConfig."""
        self.store_dir = store_dir
        self.store = store
        self.config = config
        self.device: str | None = None  # the executor's device, known once the pipeline runs

    # -- start-up, in this order: start_lanes, calibrate, start_pipeline -------------------------------------
    @abstractmethod
    def start_lanes(self) -> None:
        """Start the I/O lane(s) and the decode lanes (what calibration measures)."""

    @abstractmethod
    def calibrate(self):
        """Measure the lanes' read and decode rates (schedule.CostModel)."""

    @abstractmethod
    def start_pipeline(self, sched_config, costs) -> None:
        """Start the scheduler (with ``sched_config``, stages.scheduler.SchedulerConfig) and the executor;
        hand the scheduler ``costs``; zero every counter. Raises ConfigError or StoreError."""

    # -- running ----------------------------------------------------------------------------------------
    @abstractmethod
    def call(self, stage: str, method: str, *args) -> Any:
        """Call ``method`` of the ``stage`` ("scheduler" or "executor") and wait for its result; errors
        raised there (ZipMoEError subclasses) are raised here unchanged."""

    @abstractmethod
    def send(self, stage: str, method: str, *args) -> None:
        """Call ``method`` of the ``stage`` without waiting (ordered after the calls made before it); errors
        are logged there, not raised here."""

    @abstractmethod
    def stream(self, request) -> Iterator[tuple[str, Any]]:
        """The executor's generation events for ``request`` (stages.executor.GenerateRequest), as they
        happen: ``("tokens", [one id per prompt])`` per step, then ``("result", GenerateResult)``."""

    @abstractmethod
    def lane_stats(self, sched: dict) -> LaneStats:
        """Ask every live loader and decompressor for its stats once; ``sched``: the scheduler's stats."""

    @abstractmethod
    def read_timelines(self) -> list[tuple[str, dict]]:
        """(node, IOLoader.read_timeline()) of every live loader: its reads' device intervals."""

    @abstractmethod
    def reset_stats(self) -> None:
        """Zero the counters of every stage (the cache is kept)."""

    @abstractmethod
    def close(self) -> None:
        """Stop every stage this backend started and release their memory (idempotent). Stages the caller
        started and handed in are left running."""
