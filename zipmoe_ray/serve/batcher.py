"""The batching queue: requests that arrive while a generation runs wait, and the next generation takes as
many of them as fit in ``max_batch`` sequences (oldest first, among those that sample alike).

One thread drives the engine (``ZipMoEEngine.stream_batch``); it turns each step's tokens into text per
sequence (stop sequences included) and hands events to each request's ``sink``:

* ``("delta", choice, text)``: one token of a choice, with the text that became final (may be empty: a
  partial character, or a possible start of a stop sequence, is held back);
* ``("finish", choice, reason, ids, where)``: that choice ended (reason ``stop`` or ``length``) with token
  ``ids``; ``where`` is ``(batch id, row, rows in the batch)`` of the generation it ran in;
* ``("end", None)``: every choice of the request ended; ``("error", message)``: the generation failed.

A cancelled request leaves the queue, or, when running, has its sequences stopped in the engine (see
``ZipMoEEngine.cancel``). Bit-exactness: a sequence's tokens equal plain transformers' on the batch it ran
in (docs/serving.md); with ``max_batch=1`` every request runs alone, as ``ZipMoEEngine.generate`` would.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import BATCH_WAIT_ROUNDS
from .errors import ApiError
from .metrics import ServeMetrics
from .text import RowText

__all__ = ["Batcher", "Job", "Sampling"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How a generation picks tokens; requests are batched only with requests that sample alike."""

    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    @classmethod
    def from_request(cls, temperature, top_p, top_k, seed) -> Sampling:
        t = 1.0 if temperature is None else temperature  # OpenAI's default
        if t == 0:
            return cls()  # greedy: the other fields do not matter
        return cls(True, t, top_p, 0 if top_k == -1 else top_k, seed)

    def kwargs(self) -> dict[str, Any]:
        return {
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
        }


@dataclass(eq=False)
class Job:
    """One request: ``prompts`` and ``max_tokens`` per choice; ``sink`` takes events from the batcher's
    thread (it must not block)."""

    prompts: list[list[int]]
    max_tokens: list[int]
    sampling: Sampling
    sink: Callable[[tuple], None]
    stop: tuple[str, ...] = ()
    arrived: float = field(default_factory=time.perf_counter)
    # set by the batcher
    batch_id: str | None = None
    rows: list[int] = field(default_factory=list)
    cancelled: bool = False
    ended: bool = False


class Batcher:
    """Owns the thread that drives ``engine``; ``submit`` and ``cancel`` are called from any thread."""

    def __init__(
        self,
        engine,
        max_batch: int,
        max_queue: int,
        metrics: ServeMetrics,
        decode: Callable[[list[int]], str],
        start: bool = True,
        wait_s: float = 0.0,
    ):
        self.engine = engine
        self.wait_s = wait_s  # an idle batcher starts once no request has arrived for this long (bounded)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self._decode = decode  # token ids -> text (thread-safe)
        self._eos = engine.eos_token_ids
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._last_batch_s = 1.0
        self._thread = threading.Thread(target=self._loop, name="zipmoe-batcher", daemon=True)
        if start:
            self._thread.start()

    def start(self) -> None:
        """Start generating (for a batcher made with ``start=False``: what was submitted until now forms the
        first batches, deterministically)."""
        self._thread.start()

    # -- called by request handlers ------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; raises ApiError 400 when it has more choices than a batch holds, 429 (with
        Retry-After) when ``max_queue`` requests already wait, 503 once closed. Does not block."""
        if len(job.prompts) > self.max_batch:
            raise ApiError.bad_request(
                f"{len(job.prompts)} choices do not fit in one batch of --max-batch {self.max_batch}", "n"
            )
        with self._cond:
            if self._closed:
                raise ApiError(503, "the server is shutting down", type_="server_error")
            if (self._running or self._queue) and len(self._queue) >= self.max_queue:
                wait = max(1, math.ceil(self._last_batch_s))
                raise ApiError(
                    429,
                    f"{len(self._queue)} requests are waiting (--max-queue {self.max_queue}); retry in {wait} s",
                    type_="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": str(wait)},
                )
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop ``job`` from the queue, or stop its sequences in the running
        generation. Idempotent; does not block on the generation."""
        with self._cond:
            if job.ended or job.cancelled:
                return
            job.cancelled = True
            self.metrics.cancelled.inc()
            if job in self._queue:
                self._queue.remove(job)
                self.metrics.queue_depth.set(len(self._queue))
                job.ended = True
                return
            if job.batch_id is not None:
                self.engine.cancel(job.batch_id, list(job.rows))

    def alive(self) -> bool:
        """Whether the generation thread runs (False once closed)."""
        return self._thread.is_alive() and not self._closed

    def depth(self) -> tuple[int, int]:
        """(requests waiting, requests running)."""
        with self._cond:
            return len(self._queue), len(self._running)

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new requests, cancel the waiting ones, let the running generation end; blocks up to
        ``timeout`` seconds for it."""
        with self._cond:
            self._closed = True
            waiting, self._queue = list(self._queue), deque()
            started = self._thread.ident is not None
            for job in self._running:
                if job.batch_id is not None and not job.ended:
                    self.engine.cancel(job.batch_id, list(job.rows))
            self._cond.notify_all()
        for job in waiting:
            job.ended = True
            job.sink(("error", "the server is shutting down"))
        if started:
            self._thread.join(timeout)

    # -- the generation thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                # requests sent together arrive spread over tens of ms: wait until none has come for
                # wait_s; requests queued behind a generation longer than the bound start at once
                while not self._closed and self._queue and self._queued_rows() < self.max_batch:
                    left = self._gather_deadline() - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:
                    return
                if not self._queue:  # cancelled while waiting
                    continue
                batch = self._take()
                self._running = batch
                self.metrics.queue_depth.set(len(self._queue))
                self.metrics.running.set(len(batch))
            t0 = time.perf_counter()
            try:
                self._run(batch)
            except Exception as e:  # the server goes on: every request of the batch gets the error
                log.exception("generation failed")
                for job in batch:
                    if not job.ended:
                        job.ended = True
                        job.sink(("error", f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self._last_batch_s = time.perf_counter() - t0
                with self._cond:
                    self._running = []
                    self.metrics.running.set(0)

    def _gather_deadline(self) -> float:
        """When an idle batcher stops waiting for more requests: ``wait_s`` after the latest arrival, but
        no later than ``BATCH_WAIT_ROUNDS * wait_s`` after the oldest (a steady trickle does not hold it back)."""
        return min(
            self._queue[-1].arrived + self.wait_s, self._queue[0].arrived + BATCH_WAIT_ROUNDS * self.wait_s
        )

    def _queued_rows(self) -> int:
        return sum(len(j.prompts) for j in self._queue)

    def _take(self) -> list[Job]:
        """The oldest job, then every waiting job that samples alike, in order, while sequences fit."""
        head = self._queue.popleft()
        batch, rows = [head], len(head.prompts)
        for job in list(self._queue):
            if rows >= self.max_batch:
                break
            if job.sampling == head.sampling and rows + len(job.prompts) <= self.max_batch:
                self._queue.remove(job)
                batch.append(job)
                rows += len(job.prompts)
        return batch

    def _run(self, batch: list[Job]) -> None:
        batch_id = uuid.uuid4().hex
        prompts: list[list[int]] = []
        limits: list[int] = []
        owner: list[tuple[Job, int]] = []
        with self._cond:  # a cancel from now on stops the job's rows in the engine
            for job in batch:
                job.batch_id, job.rows = batch_id, []
                for choice, (p, m) in enumerate(zip(job.prompts, job.max_tokens)):
                    job.rows.append(len(prompts))
                    prompts.append(p)
                    limits.append(m)
                    owner.append((job, choice))
            gone = [r for job in batch if job.cancelled for r in job.rows]
        if gone:
            self.engine.cancel(batch_id, gone)
        start = time.perf_counter()
        for job in batch:
            self.metrics.queue_time.observe(start - job.arrived)
            self.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts))
        self.metrics.batch_size.observe(len(prompts))
        texts = [RowText(self._decode, job.stop) for job, _ in owner]
        count = [0] * len(prompts)
        done = [False] * len(prompts)
        first: dict[int, float] = {}  # id(job) -> time of its first token
        for step in self.engine.stream_batch(
            prompts, limits, batch_id=batch_id, **batch[0].sampling.kwargs()
        ):
            now = time.perf_counter()
            stopped = []
            for row, tok in enumerate(step):
                job, choice = owner[row]
                if done[row] or tok is None or job.cancelled:
                    done[row] = True
                    continue
                count[row] += 1
                first.setdefault(id(job), now)
                piece = texts[row].add(tok)
                reason = None
                if texts[row].stopped:
                    reason = "stop"
                    stopped.append(row)
                elif tok in self._eos:
                    reason = "stop"
                elif count[row] >= limits[row]:
                    reason = "length"
                if reason is not None:
                    piece += texts[row].flush()
                job.sink(("delta", choice, piece))
                if reason is not None:
                    done[row] = True
                    job.sink(("finish", choice, reason, texts[row].ids, (batch_id, row, len(prompts))))
            if stopped:
                self.engine.cancel(batch_id, stopped)
            self._end_finished(batch, done, count, first, now)
        for row in range(len(prompts)):  # the engine ended: whatever is left ended by length
            job, choice = owner[row]
            if not done[row] and not job.cancelled:
                done[row] = True
                rest = texts[row].flush()
                if rest:
                    job.sink(("delta", choice, rest))
                job.sink(("finish", choice, "length", texts[row].ids, (batch_id, row, len(prompts))))
        self._end_finished(batch, [True] * len(prompts), count, first, time.perf_counter())

    def _end_finished(self, batch, done, count, first, now) -> None:
        for job in batch:
            if job.ended or not all(done[r] for r in job.rows):
                continue
            with self._cond:
                job.ended = True
            tokens = sum(count[r] for r in job.rows)
            self.metrics.generation_tokens.inc(tokens)
            if id(job) in first:
                self.metrics.ttft.observe(first[id(job)] - job.arrived)
                longest = max(count[r] for r in job.rows)
                if longest > 1:
                    self.metrics.tpot.observe((now - first[id(job)]) / (longest - 1))
            if not job.cancelled:
                job.sink(("end", None))
