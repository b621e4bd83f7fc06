"""Decode lanes inside the executor's process (``EngineConfig.lanes="executor"``, the Ray backend on one node).

With lanes as actors, every expert fetched crosses the object store twice (the loader's read, then the
decoded weights) and the scheduler makes a Ray task submission per read and per decode piece; on a small
CPU board those copies and submissions take the cores the model runs on (measured: the same engine, same
scheduler, on threads in one process is 30-40% faster per token than on actors, docs/architecture.md).

Here the Scheduler stays the central actor that owns the cache state and makes every decision; what moves
is where its tasks run. Its TaskRunner (:class:`TokenRunner`) records each task as a small spec and hands
back a :class:`Token` in place of a handle; the specs ride back to the executor with the scheduler's next
answer (``LayerResponse.tasks``), and the executor's transport (:class:`ColocatedTransport`) runs them, in
the order they were made, on an I/O thread and decode-lane threads of its own (the local backend's
LocalRunner), mapping each token to the Future of its result (:class:`TaskTable`). The Scheduler holds
tokens where it held ObjectRefs (cached compressed extents, SM planes, FULL weights kept for demotion), and
a result lives in the executor exactly as long as the Scheduler holds its token: when the last reference
to a token is dropped in the scheduler, its number is sent back with the next answer and the executor
forgets the result (the object store's reference counting, by hand).

Tasks made between answers (demotions after a release or a re-plan) wait in the scheduler for the next
answer; nothing uses their results before that answer, which is the first to name them.
"""

from __future__ import annotations

import collections
import threading
import weakref
from concurrent.futures import Future
from typing import Any

from ..stages.protocol import Delivery, LayerResponse
from ..stages.scheduler import Scheduler
from .ray_transport import RayTransport

__all__ = [
    "ColocatedScheduler",
    "ColocatedTransport",
    "TaskTable",
    "Token",
    "TokenRunner",
    "start_colocated_scheduler",
]


class Token:
    """A task's result, named by the scheduler before it exists anywhere. Pickles as its number only."""

    __slots__ = ("__weakref__", "id")

    def __init__(self, id: int):
        self.id = id

    def __reduce__(self):
        return (Token, (self.id,))

    def __repr__(self) -> str:
        return f"Token({self.id})"


class TokenRunner:
    """The scheduler's TaskRunner when the lanes run in the executor: records tasks, returns tokens."""

    def __init__(self, workers: int):
        self.workers = workers
        self._next = 0
        self._outbox: list[tuple] = []
        self._forget: list[int] = []  # tokens let go of (by finalizers, at any point: list.append is atomic)
        self.live: set[int] = set()  # tokens not yet let go of
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"workers": self.workers}

    def __setstate__(self, state):
        self.__init__(state["workers"])

    def _token(self) -> Token:
        t = Token(self._next)
        self._next += 1
        self.live.add(t.id)
        weakref.finalize(t, self._gone, t.id)
        return t

    def _gone(self, i: int) -> None:
        self.live.discard(i)
        self._forget.append(i)  # the list in use now (drain swaps it)

    def read(self, key, part):
        t = self._token()
        self._outbox.append(("read", t, key, part))
        return t

    def read_split(self, key):
        return self.read(key, "exp"), self.read(key, "raw")  # E region first, as the lanes expect

    def decode(self, lane, key, exp, sm, planes_only=False, part=None):
        return self.decode_lane(lane, [(key, exp, sm, planes_only, part)])[0]

    def decode_lane(self, lane, jobs):
        tokens = [self._token() for _ in jobs]
        self._outbox.append(("decode_lane", tokens, lane, list(jobs)))
        return tokens

    def derive(self, lane, key, words, part):
        t = self._token()
        self._outbox.append(("derive", t, lane, key, words, part))
        return t

    def drain(self) -> tuple[list[tuple], list[int]]:
        """The tasks made since the last drain, in order, and the tokens the scheduler let go of since."""
        with self._lock:
            out, self._outbox = self._outbox, []
            gone, self._forget = self._forget, []
        return out, gone


class ColocatedScheduler(Scheduler):
    """The Scheduler whose every answer carries the tasks made since the last one (its runner a TokenRunner):
    requests and prefetches in their LayerResponse, step and release (else fire and forget) as a bare
    ``(specs, tokens let go of)``, so that demotions start and dropped results go without waiting for the
    next layer."""

    def request(self, *args, **kwargs) -> LayerResponse:
        resp = super().request(*args, **kwargs)
        resp.tasks = self.runner.drain()
        return resp

    def prefetch(self, *args, **kwargs) -> LayerResponse:
        resp = super().prefetch(*args, **kwargs)
        resp.tasks = self.runner.drain()
        return resp

    def step(self, *args, **kwargs):
        super().step(*args, **kwargs)
        return self.runner.drain()

    def release(self, *args, **kwargs):
        super().release(*args, **kwargs)
        return self.runner.drain()

    def live_tokens(self) -> set[int]:
        """The tokens this scheduler still holds (diagnostics: what the executor may keep)."""
        return set(self.runner.live)


_actor_class: list = []


def start_colocated_scheduler(store_path: str, config, workers: int, costs=None, **ray_options):
    """Start the central Scheduler actor for lanes that run in the executor's process (``workers`` decode
    lanes there), placed like every zipmoe actor (``num_cpus=0``)."""
    if not _actor_class:
        import ray

        _actor_class.append(ray.remote(num_cpus=0)(ColocatedScheduler))
    return _actor_class[0].options(**ray_options).remote(store_path, config, TokenRunner(workers), costs)


class TaskTable:
    """The executor's side: runs the scheduler's task specs on a LocalRunner and maps tokens to Futures."""

    def __init__(self, runner):
        self.runner = runner
        self.results: dict[int, Future] = {}

    def _h(self, x: Any) -> Any:
        return self.results[x.id] if isinstance(x, Token) else x

    def apply(self, resp: LayerResponse) -> LayerResponse:
        """Run ``resp``'s tasks, let go of the results the scheduler dropped, and return ``resp`` with its
        deliveries' tokens replaced by Futures."""
        specs, gone = resp.tasks or ((), ())
        self.run(specs)
        deliveries = [self._delivery(d) for d in resp.deliveries]
        self.forget(gone)
        return LayerResponse(resp.layer, deliveries, resp.drop_full, resp.deferred)

    def forget(self, gone) -> None:
        for i in gone:
            self.results.pop(i, None)

    def run(self, specs) -> None:
        """Submit ``specs`` to the lanes in order (each task starts once its inputs have arrived)."""
        r, h = self.runner, self._h
        for spec in specs:
            op = spec[0]
            if op == "read":
                _, t, key, part = spec
                self.results[t.id] = r.read(key, part)
            elif op == "decode_lane":
                _, tokens, lane, jobs = spec
                jobs = [(key, h(exp), h(sm), planes, part) for key, exp, sm, planes, part in jobs]
                for t, f in zip(tokens, r.decode_lane(lane, jobs)):
                    self.results[t.id] = f
            else:  # derive
                _, t, lane, key, words, part = spec
                self.results[t.id] = r.derive(lane, key, h(words), part)

    def _delivery(self, d: Delivery) -> Delivery:
        parts = [self._h(p) for p in d.parts] if d.parts is not None else None
        return Delivery(d.expert, self._h(d.handle), d.kind, d.keep, d.form, parts, d.node)


class ColocatedTransport(RayTransport):
    """The executor's Transport when its lanes run in its own process: the scheduler actor as before, the
    results Futures of the executor's own threads. Built where the engine starts; the lanes start in the
    executor's process on first use."""

    node_timeout = None  # one node: every expert is computed here

    def __init__(self, scheduler, store_path: str, read_options, workers: int):
        super().__init__(scheduler)
        self.store_path, self.read_options, self.workers = store_path, read_options, workers
        self._table: TaskTable | None = None
        self._order: collections.deque = collections.deque()  # answers asked for, oldest first
        self._answers: dict[Any, LayerResponse] = {}  # applied, not yet resolved

    def __getstate__(self):
        return {
            "scheduler": self.scheduler,
            "hosts": {},
            "node_timeout": None,
            "store_path": self.store_path,
            "read_options": self.read_options,
            "workers": self.workers,
        }

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._table, self._order, self._answers = None, collections.deque(), {}

    @property
    def table(self) -> TaskTable:
        if self._table is None:
            from ..stages.decompressor import Decompressor
            from ..stages.loader import IOLoader
            from .local import LocalRunner

            loader = IOLoader(self.store_path, self.read_options)
            decs = [Decompressor(self.store_path, i) for i in range(self.workers)]
            self._table = TaskTable(LocalRunner(loader, decs))
        return self._table

    def request(self, layer, misses, hits, released, used):
        ref = super().request(layer, misses, hits, released, used)
        self._order.append(ref)
        return ref

    def prefetch(self, layer, picks, released, used):
        ref = super().prefetch(layer, picks, released, used)
        self._order.append(ref)
        return ref

    def step(self, hits, released, used, timing=None) -> None:
        self._order.append(self.scheduler.step.remote(hits, released, used, timing))  # applied later

    def release(self, released, used) -> None:
        self._order.append(self.scheduler.release.remote(released, used))

    def _apply_next(self) -> None:
        ref = self._order.popleft()
        got = super().resolve(ref)
        if isinstance(got, LayerResponse):
            self._answers[ref] = self.table.apply(got)
        else:  # a step's or release's (specs, tokens let go of)
            self.table.run(got[0])
            self.table.forget(got[1])

    def resolve(self, pending):
        # the scheduler answers in the order it was asked, and an answer's tasks may use results made for
        # an earlier one: apply every earlier answer first
        while pending not in self._answers:
            self._apply_next()
        return self._answers.pop(pending)

    def settle(self) -> None:
        """Apply every answer still on its way (the end of a generation: the results its last step let go
        of are dropped now, not with the next generation's first answer)."""
        while self._order:
            self._apply_next()

    def held_results(self) -> set[int]:
        """The tokens whose results this process holds (diagnostics)."""
        return set(self.table.results)

    def wait_any(self, handles: list, timeout: float | None = None) -> list:
        import concurrent.futures as cf

        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return [h for h in handles if h in done]

    def get(self, handle):
        return handle.result() if isinstance(handle, Future) else handle

    def lane_stats(self) -> tuple[dict, list[dict]]:
        """(I/O loader stats, per decode lane stats) of this process's lanes."""
        r = self.table.runner
        return r.loader.stats(), [d.stats() for d in r.decompressors]

    def reset_lane_stats(self) -> None:
        r = self.table.runner
        for s in (r.loader, *r.decompressors):
            s.reset_stats()

    def close(self) -> None:
        if self._table is not None:
            self._table.runner.shutdown()
