"""SimRunner: the TaskRunner of the simulator. Tasks take the time the cost model says on a virtual clock.

One I/O lane (reads back to back, at the device's bandwidth plus latency) and W decode lanes (each runs its
tasks in submission order, starting when it is free and its inputs are ready), exactly the semantics the
real runners have; handles carry the time their result is ready. Where the executor computes on the
same cores (a CPU executor: the profile's ``executor_cores``), :meth:`SimRunner.compute` slows its work
while lanes decode beside it.
"""

from __future__ import annotations

import math
from collections import deque

from ..cache.forms import ExpertSizes
from ..schedule import CostModel

__all__ = ["SimHandle", "SimRunner", "delivery_ready"]


class SimHandle:
    """A simulated result: the virtual time it is ready at. A plain slotted class, not a frozen dataclass:
    the simulator makes one per read and per decode piece (millions per run), and a frozen dataclass's
    ``__init__`` costs three times as much. Compares and hashes by ``ready``; treat it as immutable."""

    __slots__ = ("ready",)

    def __init__(self, ready: float):
        self.ready = ready

    def __eq__(self, other) -> bool:
        return type(other) is SimHandle and other.ready == self.ready

    def __hash__(self) -> int:
        return hash((SimHandle, self.ready))

    def __repr__(self) -> str:
        return f"SimHandle(ready={self.ready!r})"


def ready_time(x) -> float:
    """When a simulated result is ready: a handle, or the latest of several (an expert's pieces); None is
    an input that was never produced (ready at once). Anything else is a bug in the caller."""
    if x is None:
        return 0.0
    if isinstance(x, SimHandle):
        return x.ready
    if isinstance(x, (tuple, list)):
        return max((ready_time(y) for y in x), default=0.0)
    raise TypeError(f"not a simulated result: {type(x).__name__}")


def delivery_ready(d) -> float:
    """When a delivery (stages.protocol.Delivery) is usable: its handle's time, or its last piece's."""
    parts = d.parts
    if parts is None:
        h = d.handle
        return h.ready if type(h) is SimHandle else ready_time(h)
    try:
        return max([h.ready for h in parts])  # SimHandles (what the SimRunner makes)
    except AttributeError:
        return ready_time(parts)


class SimRunner:
    def __init__(
        self,
        sizes: dict[tuple[int, int], ExpertSizes],
        costs: CostModel,
        workers: int,
        *,
        on_device: bool = False,
        cores: int = 0,
        executor_cores: int = 0,
    ):
        """``executor_cores`` > 0: the executor computes on that many of the machine's ``cores``, shared with
        the decode lanes; its work then slows while lanes decode beside it (:meth:`compute`)."""
        self.sizes = sizes
        self.costs = costs
        self.workers = workers
        self.on_device = on_device
        self.now = 0.0
        self.io_free = 0.0
        self.lane_free = [0.0] * workers
        self.io_busy = 0.0
        self.cpu_busy = [0.0] * workers
        self.bytes_read = 0
        self.cores, self.executor_cores = cores, executor_cores
        self.contended = executor_cores > 0 and cores > 0
        self._busy: list[deque] = [deque() for _ in range(workers)]  # per lane: (start, end), when contended

    @classmethod
    def on_profile(cls, sizes, profile, costs: CostModel | None = None, executor: bool = True) -> SimRunner:
        """The I/O lane and decode lanes of one device described by ``profile`` (plan.DeviceProfile);
        ``executor``: the device runs the executor (its compute shares the cores the profile says)."""
        return cls(
            sizes,
            costs or profile.costs(),
            profile.decode_workers,
            on_device=profile.recombine_on_device,
            cores=profile.cpu_cores,
            executor_cores=profile.executor_cores if executor else 0,
        )

    def compute(self, t: float, work: float) -> float:
        """When executor work of ``work`` seconds (measured alone) that starts at ``t`` ends. On cores shared
        with the decode lanes, the executor's ``executor_cores`` threads and the k lanes busy at the moment
        share the ``cores`` evenly (processor sharing): its rate is min(1, cores / (executor_cores + k)).
        The lanes keep their own rates (calibrated with the model running beside them, ``calibrate
        --engine``). Calls must come in time order (the executor's clock): lane intervals already over are
        dropped."""
        if not self.contended or work <= 0.0:
            return t + work
        cores, mine = self.cores, self.executor_cores
        while True:
            k, nxt = 0, math.inf
            for q in self._busy:
                while q and q[0][1] <= t:
                    q.popleft()
                if q:
                    a, b = q[0]
                    if a <= t:
                        k += 1
                        nxt = b if b < nxt else nxt
                    elif a < nxt:
                        nxt = a
            rate = 1.0 if mine + k <= cores else cores / (mine + k)
            if (nxt - t) * rate >= work:
                return t + work / rate
            work -= (nxt - t) * rate
            t = nxt

    def read(self, key, part):
        s = self.sizes[key]
        nbytes = {"exp": s.exp, "raw": s.sm, "all": s.extent}[part]
        start = max(self.now, self.io_free)
        dt = self.costs.read_latency + nbytes / self.costs.read_bps
        self.io_free = start + dt
        self.io_busy += dt
        self.bytes_read += nbytes
        return SimHandle(start + dt)

    def read_split(self, key):
        # two reads, E region first, as the real runners do: its decompression overlaps the SM read
        return self.read(key, "exp"), self.read(key, "raw")

    def _lane(self, lane: int, ready: float, dt: float) -> SimHandle:
        start = max(self.lane_free[lane], ready, self.now)
        self.lane_free[lane] = start + dt
        self.cpu_busy[lane] += dt
        if self.contended:
            self._busy[lane].append((start, start + dt))
        return SimHandle(start + dt)

    def decode(self, lane, key, exp, sm, planes_only=False, part=None):
        return self.decode_lane(lane, [(key, exp, sm, planes_only, part)])[0]

    def decode_lane(self, lane, jobs):
        costs, sizes = self.costs, self.sizes
        planes_bps = costs.decompress_bps
        words_bps = planes_bps if self.on_device else costs.decode_bps
        free = self.lane_free[lane]
        if self.now > free:
            free = self.now
        busy, out = 0.0, []
        intervals = self._busy[lane] if self.contended else None
        for key, exp, sm, planes_only, part in jobs:  # as decode(), one after the other: the hot loop
            full = sizes[key].full
            planes = planes_only or self.on_device
            dt = full / (planes_bps if planes else words_bps)
            # recombining words: the exponents are decompressed while the SM region is still on its way
            # (Decompressor.decode with a Later), and only the recombination waits for it
            first = dt if planes else min(dt, full / planes_bps)
            if part is not None:
                dt /= part[1]
                first /= part[1]
            a = exp.ready if type(exp) is SimHandle else ready_time(exp)
            b = sm.ready if type(sm) is SimHandle else ready_time(sm)
            if planes and b > a:
                a = b
            start = free if free > a else a
            mid = start + first  # exponents decompressed
            resume = mid if mid > b else b  # the SM region is in
            free = resume + (dt - first)
            if intervals is not None:
                if resume > mid:
                    intervals.append((start, mid))
                    intervals.append((resume, free))
                else:
                    intervals.append((start, free))
            busy += dt
            out.append(SimHandle(free))
        self.lane_free[lane] = free
        self.cpu_busy[lane] += busy
        return out

    def derive(self, lane, key, words, part):
        s = self.sizes[key]
        return self._lane(lane, ready_time(words), s.full / self.costs.copy_bps)
