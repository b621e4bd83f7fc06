"""ZipMoEEngine: bit-exact generation from a store under a memory budget.

    with ZipMoEEngine("tiny-qwen.zmoe", memory_budget="25%", backend="ray") as engine:
        out = engine.generate("The robot", max_new_tokens=16)
        print(out.text, engine.stats()["tpot_s"])

The engine is the generation API: it checks the budget, has a backend (backends/) start the stages,
plans the split between cache forms (plan/choice.py), turns prompts into token ids and back
(runtime/text.py), records traces (trace/recorder.py) and reports (runtime/stats.py). It never branches
on the backend. See docs/architecture.md for the pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from .backends import open_backend
from .cache.layout import ModelLayout
from .errors import ConfigError, ZipMoEError
from .models.registry import get_arch
from .preflight import check_trace_next_to_store, checked_plan, verify_before_start
from .runtime.budget import Budget
from .runtime.config import EngineConfig
from .runtime.request import GenerationOutput, check_sampling
from .runtime.stats import engine_stats
from .runtime.text import PromptText
from .schedule.costs import CostModel
from .stages.executor import GenerateRequest, GenerateResult, default_device
from .store import open_store

__all__ = ["GenerationOutput", "ZipMoEEngine"]

log = logging.getLogger(__name__)


class ZipMoEEngine:
    """Serve a store. Blocks while starting (Ray start-up, model load, calibration: seconds).

    Args mirror :class:`~zipmoe_ray.runtime.config.EngineConfig`; ``stages`` wires in actors the caller
    started (see zipmoe_ray.actors and the README), which the engine then does not kill on close;
    ``trace_path`` records the routing of every generation; ``plan`` is a Plan (or its JSON file) to run
    instead of planning at start-up (refused when made for another store; re-scaled, with a warning, when
    made for another budget). ``verify=True`` checks every byte of the store against its checksums before
    anything starts. Raises BudgetError (budget too small, with the minimum, or above this machine's
    memory), ConfigError, StoreError (StoreCorruptError/ChecksumError naming the damaged file, tensor or
    expert), ClusterError (``address`` unreachable within ``connect_timeout``).
    """

    def __init__(
        self,
        store_dir: str | os.PathLike,
        *,
        memory_budget: int | str,
        stages=None,
        trace_path: str | os.PathLike | None = None,
        plan=None,
        **options,
    ):
        self.config = EngineConfig(memory_budget=memory_budget, **options)
        self.store_dir = str(store_dir)
        self.store = open_store(self.store_dir)
        self.layout = ModelLayout.of_store(self.store)
        self.sizes = self.layout.sizes
        self.expert_bytes = self.layout.expert_bytes
        budget = Budget.parse(memory_budget, self.layout)
        budget.require(self.layout)  # before anything starts
        budget.require_memory(allow=self.config.allow_budget_above_memory)
        self.budget = budget.bytes
        causal = get_arch(self.store.model_type).family == "causal"
        self.text = PromptText.for_store(self.store_dir, self.store.config(), causal)
        self._recorder = None
        if trace_path:
            from .trace.recorder import TraceRecorder

            self._recorder = TraceRecorder.for_store(
                trace_path, self.store_dir, self.store, self.layout, self.budget
            )
        if plan is not None and stages is None:
            plan = checked_plan(plan, self.store, self.store_dir, self.budget)
        if self.config.verify:
            verify_before_start(self.store_dir)
        self._closed = False
        self._cancelled: dict[str, set[int]] = {}  # stream_batch rows stopped by cancel(), per batch id
        self._generation_s = 0.0
        self._last: GenerateResult | None = None
        self.plan = None
        self.plan_source = "fixed split" if (self.config.split or self.config.policy != "zipmoe") else ""
        t0 = time.perf_counter()
        self._backend = open_backend(self.store_dir, self.store, self.config, stages)
        try:
            if self._backend.nodes > 1:
                budget.require(self.layout, self._backend.nodes)
            self._start(stages, plan)
        except BaseException:
            self.close()
            raise
        self.start_s = time.perf_counter() - t0

    def _start(self, stages, plan) -> None:
        from .plan.choice import choose_split, scheduler_config

        cfg, backend = self.config, self._backend
        backend.start_lanes()
        self.costs = backend.calibrate() if cfg.calibrate else CostModel.nominal()
        # the device the executor will use decides how the scheduler hands it experts; stages pinned
        # elsewhere (resources, or the caller's) pick their own
        device = cfg.device or (None if (stages is not None or cfg.resources) else default_device())
        base = scheduler_config(cfg, self.budget, device, backend.pieces_in_place)
        if stages is None:
            if plan is None and cfg.split is None and cfg.policy == "zipmoe":
                check_trace_next_to_store(self.store_dir, self.store)
            choice = choose_split(self.store_dir, self.store, self.layout, base, self.costs, cfg, plan)
            base, self.plan, self.plan_source = choice.config, choice.plan, choice.source
        backend.start_pipeline(base, self.costs)
        self.device = backend.device

    @property
    def backend(self) -> str:
        """The backend serving: local, ray or cluster."""
        return self._backend.name

    def reset_stats(self) -> None:
        """Zero the counters (hits, bytes read, lane busy time, peak) but keep the cache: for measuring a
        warm run after a warm-up."""
        self._check_open()
        self._backend.reset_stats()
        self._generation_s = 0.0

    # -- prompts -------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The store's tokenizer (transformers); raises ConfigError when the store has none."""
        return self.text.tokenizer

    # -- generation ----------------------------------------------------------------------------------------
    def generate(
        self,
        prompts,
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        seed: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        output_logits: bool = False,
    ):
        """Generate for one prompt (text or token ids: returns a GenerationOutput) or a batch (a list of
        them: returns a list). Greedy by default; ``do_sample`` with ``seed`` samples reproducibly. Blocks.

        Raises ConfigError for a bad prompt (an id outside the vocabulary, too long for the model's
        context) or sampling value, before anything runs. An error during the generation (a damaged
        expert: ChecksumError naming it) carries what was generated until then in ``e.partial``."""
        self._check_open()
        check_sampling(
            max_new_tokens, do_sample=do_sample, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k
        )
        ids, single = self.text.encode(prompts)
        self.text.check_length(ids, max_new_tokens)
        req = GenerateRequest(
            ids,
            max_new_tokens,
            do_sample,
            seed,
            temperature,
            top_p,
            top_k,
            output_logits,
            self._trace_request(),
        )
        t0 = time.perf_counter()
        try:
            res: GenerateResult = self._backend.call("executor", "generate", req)
        except ZipMoEError as e:
            if e.partial_token_ids is not None:
                outs = [GenerationOutput(t, self.text.decode(t)) for t in e.partial_token_ids]
                e.partial = outs[0] if single else outs
            raise
        finally:
            self._generation_s += time.perf_counter() - t0
        self._finished(res)
        outs = []
        for i, tok in enumerate(res.token_ids):
            logits = None
            if res.logits is not None:
                import torch

                logits = torch.stack([step[i] for step in res.logits])
            outs.append(GenerationOutput(tok, self.text.decode(tok), logits))
        return outs[0] if single else outs

    def stream(self, prompt, max_new_tokens: int = 32, **kw) -> Iterator[tuple[int, str]]:
        """Yield ``(token_id, text)`` for one prompt as each token is produced: ``text`` is the new text that
        token completes (empty while a character or word is still incomplete), so the pieces joined are
        exactly ``generate(prompt, max_new_tokens, **kw).text``. Raises as :meth:`generate` does; an error
        midway carries the output so far in ``e.partial``."""
        self._check_open()
        from .streaming import stream_one

        yield from stream_one(self, prompt, max_new_tokens, kw)

    def stream_batch(
        self, prompts, max_new_tokens: int | list[int] = 32, *, batch_id: str | None = None, **sampling
    ) -> Iterator[list[int | None]]:
        """Generate for a batch of prompts, yielding after every step one entry per prompt: the token id it
        just got, or None once it has finished (end of text, its own ``max_new_tokens`` (one limit, or one
        per prompt) or stopped by :meth:`cancel` under ``batch_id``). ``sampling``: do_sample, seed,
        temperature, top_p, top_k. A row's tokens equal ``generate`` on the same batch with that row stopped
        where it stopped (streaming.py). Blocks between steps."""
        self._check_open()
        from .streaming import stream_batch

        yield from stream_batch(self, prompts, max_new_tokens, batch_id, sampling)

    def cancel(self, batch_id: str, rows: list[int]) -> None:
        """Stop ``rows`` of the :meth:`stream_batch` generation named ``batch_id``: they yield None from now
        on and the executor stops them after its current step. Callable from another thread; returns at once."""
        self._check_open()
        self._cancelled.setdefault(batch_id, set()).update(rows)
        self._backend.send("executor", "cancel", batch_id, list(rows))

    @property
    def eos_token_ids(self) -> set[int]:
        """The token ids that end a sequence (the tokenizer's and the generation config's end of text)."""
        return self.text.stop_ids()

    def _trace_request(self) -> int | None:
        return self._recorder.next_request() if self._recorder else None

    def _finished(self, res: GenerateResult) -> None:
        self._last = res
        if self._recorder:
            self._recorder.write(res.trace)

    # -- statistics ----------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters since start-up: latency of the last generation, hits and misses per cache form, bytes read,
        peak cache bytes against the budget, lane utilisation, calibration."""
        self._check_open()
        sched = self._backend.call("scheduler", "stats")
        ex = self._backend.call("executor", "stats")
        return engine_stats(
            sched=sched,
            executor=ex,
            lanes=self._backend.lane_stats(sched),
            last=self._last,
            budget=self.budget,
            expert_bytes=self.expert_bytes,
            generation_s=self._generation_s,
            costs=self.costs.to_dict(),
            split_source=self.plan_source,
            plan_counts=self.plan.counts() if self.plan else None,
            backend=self.config.backend,
        )

    def timeline(self) -> list[tuple]:
        """The executor's MoE-layer timeline since the last reset (needs ``timeline=True``): (unix time, kind,
        layer, expert, extra) with kinds layer, request, response, ready, computed, layer_done, step."""
        self._check_open()
        return self._backend.call("executor", "timeline")

    def read_timeline(self) -> list[tuple]:
        """The storage device's reads since the last reset (needs ``timeline=True``; the last
        ``runtime.config.READ_TIMELINE`` per loader, a warning says when older ones fell off): (unix time the
        device started the read, seconds it was busy, bytes, layer, expert, part, node) in start order. With
        an emulated device (``bandwidth``) the interval it booked, else the read's own. Each node stamps its
        reads with its own clock, the one the executor's :meth:`timeline` uses on that node; set beside it, it
        shows where a device idles (benchmarks/timeline.py, ``device_idle``, one node's reads at a time).
        Stages handed in ready-made (``stages=``) keep the read options they were started with."""
        self._check_open()
        out = []
        for node, got in self._backend.read_timelines():
            if got["dropped"]:
                log.warning(
                    "node %s: the oldest %d reads fell off the read timeline (it keeps %d); reset the stats "
                    "closer to the generation to profile",
                    node,
                    got["dropped"],
                    len(got["reads"]),
                )
            for start, seconds, nbytes, tag in got["reads"]:
                layer, expert, part = tag or (-1, -1, "")
                out.append((start, seconds, nbytes, layer, expert, part, node))
        return sorted(out)

    # -- lifetime --------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("the engine is closed")

    def close(self) -> None:
        """Stop every stage the engine started and release their memory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        backend = getattr(self, "_backend", None)
        if backend is not None:
            backend.close()

    def __enter__(self) -> ZipMoEEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
