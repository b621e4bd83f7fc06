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

__all__ = ["LocalRunner", "LocalTransport"]


def _value(x: Any) -> Any:
    return x.result() if isinstance(x, cf.Future) else x


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

    def read(self, key, part):
        return self._io.submit(self.loader.read, key[0], key[1], part)

    def read_split(self, key):
        whole = self._io.submit(self.loader.read_split, key[0], key[1])
        parts = (cf.Future(), cf.Future())

        def done(f):
            try:
                value = f.result()
            except BaseException as e:
                for p in parts:
                    p.set_exception(e)
                return
            for p, v in zip(parts, value):
                p.set_result(v)

        whole.add_done_callback(done)
        return parts

    def decode(self, lane, key, exp, sm, planes_only=False, part=None):
        d = self.decompressors[lane]
        return self._lanes[lane].submit(
            lambda: d.decode(
                key[0], key[1], exp=_value(exp), sm=_value(sm), planes_only=planes_only, part=part
            )
        )

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

    def request(self, layer, misses, hits, released):
        return self.scheduler.request(layer, misses, hits, released)

    def step(self, hits, released) -> None:
        self.scheduler.step(hits, released)

    def wait_any(self, handles: list, timeout: float | None = None) -> list:
        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return [h for h in handles if h in done]

    def compute(self, node, *args):
        raise NotImplementedError("the local backend runs on one device")

    def unresponsive(self, nodes, timeout: float) -> set:
        return set()

    def node_failed(self, node) -> None:
        raise NotImplementedError("the local backend runs on one device")

    @staticmethod
    def is_node_failure(e: BaseException) -> bool:
        return False

    def get(self, handle) -> np.ndarray:
        return _value(handle)
