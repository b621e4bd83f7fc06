"""The local backend: every stage in this process, on threads (one I/O thread, one thread per decode lane).

Same plain classes as the Ray backend; handles are ``concurrent.futures.Future``s. A lane thread waits for
its task's inputs (a read still running), which is exactly the plan's "a decode starts after its read".
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any

import numpy as np

from ..stages.decompressor import Decompressor
from ..stages.loader import IOLoader
from ..stages.protocol import Later
from .base import Backend, LaneStats

__all__ = ["LocalBackend", "LocalRunner", "LocalTransport"]


def _value(x: Any) -> Any:
    return x.result() if isinstance(x, cf.Future) else x


def _later(x: Any) -> Any:
    """A read still running, handed over unresolved (the lane decompresses the exponents meanwhile)."""
    return Later(x) if isinstance(x, cf.Future) and not x.done() else _value(x)


class LocalRunner:
    """TaskRunner on threads."""

    def __init__(self, loader: IOLoader, decompressors: list[Decompressor]):
        self.loader = loader
        self.decompressors = decompressors
        self.workers = len(decompressors)
        self._io = cf.ThreadPoolExecutor(1, thread_name_prefix="zipmoe-io")
        self._lanes = [
            cf.ThreadPoolExecutor(1, thread_name_prefix=f"zipmoe-lane{i}") for i in range(self.workers)
        ]
        self._buffers: dict = {}  # key -> [buffer, pieces still to submit] (the submitting thread only: the scheduler's, or the executor's generation thread with lanes in the executor)

    @classmethod
    def for_store(cls, store_path: str, read_options, workers: int) -> LocalRunner:
        """An I/O lane and ``workers`` decode lanes on ``store_path`` (the local backend's, and the
        executor's own with lanes in the executor)."""
        return cls(IOLoader(store_path, read_options), [Decompressor(store_path, i) for i in range(workers)])

    def calibrate(self) -> tuple[dict, dict]:
        """The I/O lane's and one decode lane's calibration, measured on this process's cores."""
        return self.loader.calibrate(None, 16 << 20), self.decompressors[0].calibrate(None, 16 << 20)

    def read(self, key, part):
        return self._io.submit(self.loader.read, key[0], key[1], part)

    def read_split(self, key):
        # two reads, E region first: its decode starts while the SM region is read (each its own buffer)
        return self.read(key, "exp"), self.read(key, "raw")

    def decode(self, lane, key, exp, sm, planes_only=False, part=None):
        return self._decode(lane, key, exp, sm, planes_only, part, None)

    def _decode(self, lane, key, exp, sm, planes_only, part, out):
        d = self.decompressors[lane]
        return self._lanes[lane].submit(
            lambda: d.decode(
                key[0], key[1], exp=_value(exp), sm=_later(sm), planes_only=planes_only, part=part, out=out
            )
        )

    def decode_lane(self, lane, jobs):
        """Pieces of one expert (``part``) decode into one buffer shared by the lanes: every piece's handle
        resolves to that buffer, whole once all are done (the client then uses it without a copy)."""
        out = []
        for key, exp, sm, planes_only, part in jobs:
            buf = None
            if part is not None and not planes_only:
                buf = self._shared(key, part[1])
            out.append(self._decode(lane, key, exp, sm, planes_only, part, buf))
        return out

    def _shared(self, key, count: int) -> np.ndarray:
        """The buffer the ``count`` pieces of ``key`` now being submitted decode into (made by the first)."""
        entry = self._buffers.get(key)
        if entry is None:
            rec = self.decompressors[0].store.record(*key)
            entry = self._buffers[key] = [np.empty(rec.numel, dtype=self.decompressors[0].layout.word), count]
        entry[1] -= 1
        if entry[1] == 0:
            del self._buffers[key]  # every piece submitted: the next request for this key gets its own
        return entry[0]

    def derive(self, lane, key, words, part):
        d = self.decompressors[lane]
        return self._lanes[lane].submit(lambda: d.derive(key[0], key[1], _value(words), part))

    def shutdown(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        for lane in self._lanes:
            lane.shutdown(wait=True, cancel_futures=True)


class LocalTransport:
    """The executor's view of the scheduler and of result handles, in one process."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def request(self, layer, misses, hits, released, used):
        # in this process: answered at once (resolve hands the answer back as it is)
        return self.scheduler.request(layer, misses, hits, released, used)

    def prefetch(self, layer, picks, released, used):
        return self.scheduler.prefetch(layer, picks, released, used)  # in this process: answered at once

    def resolve(self, pending):
        return pending

    def release(self, released, used) -> None:
        self.scheduler.release(released, used)

    def steps(self, reports) -> None:
        self.scheduler.steps(reports)

    def wait_any(self, handles: list, timeout: float | None = None) -> list:
        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return [h for h in handles if h in done]

    node_timeout = None  # every expert is computed here: nothing to wait on elsewhere

    def compute(self, node, layer, expert, kind, x, w, value):
        raise NotImplementedError("the local backend runs on one device")

    def unresponsive(self, nodes, timeout: float) -> set:
        return set()

    def node_failed(self, node) -> None:
        raise NotImplementedError("the local backend runs on one device")

    def is_node_failure(self, e: BaseException) -> bool:
        return False

    def get(self, handle) -> np.ndarray:
        return _value(handle)


class LocalBackend(Backend):
    """Every stage in this process: the executor on the caller's thread, reads and decodes on threads."""

    name = "local"
    pieces_in_place = True  # the lanes are threads of this process: pieces share one buffer

    def start_lanes(self) -> None:
        cfg = self.config
        self.runner = LocalRunner.for_store(self.store_dir, cfg.read_options(), cfg.workers)

    def calibrate(self):
        from ..schedule.costs import CostModel

        return CostModel.calibrated(*self.runner.calibrate())

    def start_pipeline(self, sched_config, costs) -> None:
        from ..stages.executor import Executor
        from ..stages.scheduler import Scheduler

        cfg = self.config
        self.scheduler = Scheduler(self.store_dir, sched_config, self.runner, costs)
        self.executor = Executor(
            self.store_dir,
            LocalTransport(self.scheduler),
            cfg.device,
            cfg.dtype,
            cfg.torch_threads,
            cfg.timeline,
            cfg.prefetch,
        )
        self.device = str(self.executor.device)
        self.reset_stats()

    def call(self, stage: str, method: str, *args):
        return getattr({"scheduler": self.scheduler, "executor": self.executor}[stage], method)(*args)

    def send(self, stage: str, method: str, *args) -> None:
        self.call(stage, method, *args)  # in this process: done before the caller goes on

    def stream(self, request):
        yield from self.executor.generate_stream(request)

    def lane_stats(self, sched: dict) -> LaneStats:
        from .cluster_nodes import node_entry

        loader = self.runner.loader.stats()
        decs = [d.stats() for d in self.runner.decompressors]
        homed = len(self.store.index.experts)
        return LaneStats({"local": node_entry("local", loader, decs, None, sched, homed)}, [loader], decs)

    def read_timelines(self) -> list[tuple[str, dict]]:
        return [("local", self.runner.loader.read_timeline())]

    def reset_stats(self) -> None:
        for stage in (self.runner.loader, *self.runner.decompressors, self.scheduler, self.executor):
            stage.reset_stats()

    def close(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.shutdown()
            self.runner = None
