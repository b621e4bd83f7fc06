"""Decode lanes inside the executor's process (``EngineConfig.lanes="executor"``, the Ray backend on one node).

With lanes as actors, every expert fetched crosses the object store twice (the loader's read, then the
decoded weights) and the scheduler makes a Ray task submission per read and per decode piece; on a small
CPU board those copies and submissions take the cores the model runs on (measured: the same engine, same
scheduler, on threads in one process is about 30% faster per token than on actors, docs/architecture.md).

Here the Scheduler stays the central actor that owns the cache state and makes every decision; what moves
is where its tasks run. Its TaskRunner (:class:`TokenRunner`) records each task as a small spec and hands
back a :class:`Token` in place of a handle; the specs ride back to the executor with the scheduler's next
answer (``LayerResponse.tasks``), and the executor's transport (:class:`ColocatedTransport`) runs them, in
the order they were made, on an I/O thread and decode-lane threads of its own (the local backend's
LocalRunner), mapping each token to the Future of its result (:class:`TaskTable`). The Scheduler holds
tokens where it held ObjectRefs (cached compressed extents, SM planes, FULL weights kept for demotion), and
a result lives in the executor while the Scheduler holds its token: when the last reference to a token
is dropped in the scheduler, its number is sent back with the next answer and the executor
forgets the result (the object store's reference counting, by hand).

Tasks made between a layer's answers (demotions after a release or a re-plan) come back as the answer to
that batch of steps or release, which the executor applies when it next sends steps or takes an answer;
nothing uses their results before an answer that names them, and answers are applied in the order they were
asked for.
"""

from __future__ import annotations

import collections
import pickle
import threading
import weakref
from concurrent.futures import Future
from typing import Any

from ..stages.protocol import Delivery, LayerResponse
from ..stages.scheduler import Scheduler
from .local import LocalRunner, LocalTransport
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
        self._forget: list[int] = []  # tokens let go of, by their finalizers (on the scheduler's thread)
        self.live: set[int] = set()  # tokens not yet let go of

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

    def drain(self) -> tuple[bytes, list[int]]:
        """The tasks made since the last drain, in order (pickled: the tokens only they named are let go of
        here, not after the answer is sent), and the tokens the scheduler let go of since the last drain.
        The executor runs the tasks before it forgets, so a token made and let go of in one drain (a read
        whose result only a decode uses) still gets its task run."""
        out, self._outbox = self._outbox, []
        blob = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
        del out  # finalizers of tokens named only here run now (the scheduler's thread: CPython refcounts)
        gone, self._forget = self._forget, []
        return blob, gone


class ColocatedScheduler(Scheduler):
    """The Scheduler whose every answer carries the tasks made since the last one (its runner a TokenRunner):
    requests and prefetches in their LayerResponse, a batch of steps and a release (else fire and forget) as
    a bare ``(specs, tokens let go of)``, which the executor applies when it next sends steps or takes an
    answer, whichever comes first (a demotion after a re-plan starts then, not at the next miss)."""

    def request(self, *args, **kwargs) -> LayerResponse:
        resp = super().request(*args, **kwargs)
        resp.tasks = self.runner.drain()
        return resp

    def prefetch(self, *args, **kwargs) -> LayerResponse:
        resp = super().prefetch(*args, **kwargs)
        resp.tasks = self.runner.drain()
        return resp

    def steps(self, reports):
        super().steps(reports)
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
    """The executor's side: runs the scheduler's task specs on a LocalRunner and maps tokens to Futures.
    Changed by the generation thread only; ``held`` may be read from any thread."""

    def __init__(self, runner):
        self.runner = runner
        self.results: dict[int, Future] = {}
        self._lock = threading.Lock()

    def _h(self, x: Any) -> Any:
        if not isinstance(x, Token):
            return x
        try:
            return self.results[x.id]
        except KeyError:  # a protocol bug, never a state to run on
            raise RuntimeError(f"a lane task names {x!r}, whose result this executor does not hold") from None

    def held(self) -> set[int]:
        with self._lock:
            return set(self.results)

    def apply(self, resp: LayerResponse) -> LayerResponse:
        """Run ``resp``'s tasks, let go of the results the scheduler dropped, and return ``resp`` with its
        deliveries' tokens replaced by Futures."""
        specs, gone = resp.tasks or (b"", ())
        self.run(specs)
        deliveries = [self._delivery(d) for d in resp.deliveries]
        self.forget(gone)
        return LayerResponse(resp.layer, deliveries, resp.drop_full, resp.deferred)

    def forget(self, gone) -> None:
        with self._lock:
            for i in gone:
                self.results.pop(i, None)

    def run(self, specs: bytes | list) -> None:
        """Submit ``specs`` (as TokenRunner.drain made them) to the lanes in order; each task starts once
        its inputs have arrived."""
        if isinstance(specs, bytes):
            specs = pickle.loads(specs) if specs else []
        r, h = self.runner, self._h
        with self._lock:
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
    results Futures of the executor's own threads. Built where the engine starts; its lanes start when it
    arrives in the executor's process. Used by the executor's generation thread only (its ``held_results``
    and lane statistics excepted)."""

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
        self._order, self._answers = collections.deque(), {}
        self._table = self._start_lanes()  # in the executor's process, before any thread can ask

    def _start_lanes(self) -> TaskTable:
        return TaskTable(LocalRunner.for_store(self.store_path, self.read_options, self.workers))

    @property
    def table(self) -> TaskTable:
        if self._table is None:  # used where it was built (tests)
            self._table = self._start_lanes()
        return self._table

    def request(self, layer, misses, hits, released, used):
        ref = super().request(layer, misses, hits, released, used)
        self._order.append(ref)
        return ref

    def prefetch(self, layer, picks, released, used):
        ref = super().prefetch(layer, picks, released, used)
        self._order.append(ref)
        return ref

    def steps(self, reports) -> None:
        self._apply_arrived()
        self._order.append(self.scheduler.steps.remote(reports))  # applied later

    def release(self, released, used) -> None:
        self._order.append(self.scheduler.release.remote(released, used))

    def _apply_arrived(self) -> None:
        """Apply the answers at the head of the queue that are already here (does not block): in a run of
        steps without a request (every expert held in full), demotions and dropped results would wait."""
        import ray

        while self._order and ray.wait([self._order[0]], timeout=0)[0]:
            self._apply_next()

    def _apply_next(self) -> None:
        ref = self._order.popleft()
        got = super().resolve(ref)
        if isinstance(got, LayerResponse):
            self._answers[ref] = self.table.apply(got)
        else:  # a batch of steps' or a release's (specs, tokens let go of)
            self.table.run(got[0])
            self.table.forget(got[1])

    def resolve(self, pending):
        # the scheduler answers in the order it was asked, and an answer's tasks may use results made for
        # an earlier one: apply every earlier answer first
        while pending not in self._answers:
            self._apply_next()
        return self._answers.pop(pending)

    def settle(self) -> None:
        """The end of a generation: apply every answer still on its way (the results its last step let go
        of are dropped now, not with the next generation's first answer), and release the experts of
        answers nobody took, so that their staging and pins go back to the cache. The client's finish()
        takes every answer it asked for (ExpertClient._unanswered), so this is the backstop for an answer
        whose taking failed part-way."""
        while self._order:
            while self._order:
                self._apply_next()
            if self._answers:
                unclaimed, self._answers = list(self._answers.values()), {}
                self.release([(r.layer, d.expert) for r in unclaimed for d in r.deliveries], [])

    def held_results(self) -> set[int]:
        """The tokens whose results this process holds (diagnostics)."""
        return self.table.held()

    # results are this process's Futures, waited on and read as on the local backend
    wait_any = LocalTransport.wait_any
    get = LocalTransport.get

    def lane_stats(self) -> tuple[dict, list[dict]]:
        """(I/O loader stats, per decode lane stats) of this process's lanes."""
        r = self.table.runner
        return r.loader.stats(), [d.stats() for d in r.decompressors]

    def lane_read_timeline(self) -> dict:
        """IOLoader.read_timeline() of this process's loader."""
        return self.table.runner.loader.read_timeline()

    def reset_lane_stats(self) -> None:
        r = self.table.runner
        for s in (r.loader, *r.decompressors):
            s.reset_stats()
