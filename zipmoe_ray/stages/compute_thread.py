"""One thread for every torch computation of a process whose calls arrive on many threads (a Ray actor).

Why: torch's CPU kernels run on GNU OpenMP, which keeps one team of worker threads per thread that starts
a parallel region. A threaded Ray actor serves its calls on a pool of threads, and its constructor runs on
yet another, so the executor's model load and its generations each grew a team of their own. Once a
process holds more OpenMP threads than the machine has cores, libgomp stops spinning between parallel
regions (its "throttled" spin count) and its workers sleep and wake on every kernel: on the 2-core CI
machine the executor's all-hit decode ran ~15% slower under Ray than the same code in one process, with
~3,000 context switches a second against ~40. Running the load and every generation on one long-lived
thread keeps one team, as in a plain process. How long that team's idle workers then spin is set for the
executor actor by ``backends/ray_stages.py`` (``EXECUTOR_SPINCOUNT``): libgomp's default spins for
milliseconds, which takes the cores from the decode lanes while the executor waits for experts.

The thread is a daemon: a caller that gives up waiting (an interrupted driver) never blocks the process's
exit on it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["ComputeThread"]

T = TypeVar("T")


class ComputeThread:
    """Runs submitted callables one at a time, in order, on one daemon thread."""

    def __init__(self, name: str = "zipmoe-compute"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # handed to the caller, who re-raises it
                fut.set_exception(e)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the thread; blocks until it returns, and raises what it raised."""
        if threading.current_thread() is self._thread:
            return fn(*args)  # already on it (a nested call would otherwise wait for itself)
        return self.submit(fn, *args).result()

    def stop(self) -> None:
        """Let the thread end once the jobs already submitted are done."""
        self._jobs.put(None)
