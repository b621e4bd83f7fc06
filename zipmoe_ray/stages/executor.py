"""Executor: runs the transformers model with every non-expert weight resident; its MoE layers get their
experts through the ExpertClient. Generation is transformers' own ``generate`` (greedy or sampling), so
stopping, padding and sampling behave exactly as in plain transformers.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, ZipMoEError
from ..models.registry import get_arch
from ..store import open_store
from .client import ExpertClient
from .compute_thread import ComputeThread
from .model_loader import load_model

__all__ = ["Executor", "GenerateRequest", "GenerateResult", "default_device"]

log = logging.getLogger(__name__)


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class GenerateRequest:
    input_ids: list[list[int]]
    max_new_tokens: int = 32
    do_sample: bool = False
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    output_logits: bool = False
    trace_request: int | None = None  # record the routing of this generation under this request number
    # per prompt: stop that row after this many new tokens (each 1..max_new_tokens); None: max_new_tokens
    row_limits: list[int] | None = None
    batch_id: str | None = None  # the name Executor.cancel(batch_id, rows) stops rows of this generation by

    def __post_init__(self):
        if not self.input_ids or any(not ids for ids in self.input_ids):
            raise ConfigError("every prompt needs at least one token")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.row_limits is not None and (
            len(self.row_limits) != len(self.input_ids)
            or any(not 1 <= n <= self.max_new_tokens for n in self.row_limits)
        ):
            raise ConfigError(
                f"row_limits must give one limit in 1..{self.max_new_tokens} per prompt, got {self.row_limits}"
            )


@dataclass
class GenerateResult:
    token_ids: list[list[int]]  # generated ids only, per prompt (up to and including end-of-text)
    ttft_s: float
    tpot_s: float
    tokens_per_s: float
    step_times: list[float]
    logits: list[torch.Tensor] | None = None  # per step, [batch, vocab] (output_logits)
    trace: list | None = None  # TraceStep per forward step (trace_request)
    stats: dict[str, Any] = field(default_factory=dict)


class _StepHook:
    """A stopping criterion, called once per generated token: it timestamps the step, closes the step for
    the cache (popularity aging, releases) and streams the new tokens. It stops no row unless given
    ``row_limits`` (a row stops once it has that many new tokens) or ``cancelled`` (rows to stop now, a set
    another thread may add to); transformers then pads a stopped row, as for any per-row stopping criterion,
    and ends the generation when every row has stopped."""

    def __init__(
        self,
        client: ExpertClient,
        sink: queue.Queue | None = None,
        row_limits: list[int] | None = None,
        cancelled: set[int] | None = None,
    ):
        self.client = client
        self.sink = sink
        self.times: list[float] = []
        self.row_limits = row_limits
        self.cancelled = cancelled
        self.stopped: dict[int, int] = {}  # row -> new tokens it had when this hook stopped it
        self.last: torch.LongTensor | None = None  # the sequences so far (what a failure returns)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        now = time.perf_counter()
        # a decode step's time (the first call ends the prefill): what online re-planning compares
        timing = (now - self.times[-1], int(input_ids.shape[0])) if self.times else None
        self.times.append(now)
        self.last = input_ids
        self.client.end_step(timing)
        if self.sink is not None:
            self.sink.put(("tokens", input_ids[:, -1].tolist()))
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        if self.row_limits is not None or self.cancelled:
            step, cancelled = len(self.times), set(self.cancelled or ())
            for row in range(input_ids.shape[0]):
                if row not in self.stopped and (
                    row in cancelled or (self.row_limits is not None and step >= self.row_limits[row])
                ):
                    self.stopped[row] = step
                done[row] = row in self.stopped
        return done.to(input_ids.device)


class Executor:
    """Plain class; the Ray backend wraps it in an actor, the local backend calls it directly."""

    def __init__(
        self,
        store_path: str,
        transport,
        device: str | None = None,
        dtype: str = "auto",
        torch_threads: int | None = None,
        timeline: bool = False,
        prefetch: bool = True,
        own_thread: bool = False,
    ):
        """``timeline``: record every MoE layer's events (see :meth:`timeline`); ``prefetch``: each MoE
        layer has the next one's predicted experts fetched ahead (stages/client.py); ``own_thread``: load
        the model and run every generation on one thread of the executor's own, whatever thread calls
        (the Ray actor's calls arrive on a pool of threads: see stages/compute_thread.py)."""
        from transformers import GenerationConfig  # noqa: F401  (import early: fail fast if missing)

        self._compute = ComputeThread("zipmoe-executor") if own_thread else None
        self.device = device or default_device()
        self.store = open_store(store_path)
        self.spec = get_arch(self.store.model_type)
        self.client = ExpertClient(transport, self.store, self.device, timeline, prefetch)
        t0 = time.perf_counter()
        self.model, self.moe_layers = self._on_compute(self._load, torch_threads, dtype)
        self.load_s = time.perf_counter() - t0
        gc = self.model.generation_config
        self.pad_id = gc.pad_token_id if gc.pad_token_id is not None else self.model.config.pad_token_id
        if self.pad_id is None:
            eos = gc.eos_token_id
            self.pad_id = eos[0] if isinstance(eos, list) else (eos or 0)
        self.eos = set(gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]) - {None}
        self._lock = threading.Lock()
        self._cancel_lock = threading.Lock()
        self._cancels: dict[str, set[int]] = {}  # batch_id -> rows to stop (see cancel)
        self._ended: deque[str] = deque(maxlen=256)  # batch ids that finished: later cancels are ignored

    def _on_compute(self, fn, *args):
        return self._compute.call(fn, *args) if self._compute is not None else fn(*args)

    def _load(self, torch_threads: int | None, dtype):
        torch.set_num_threads(torch_threads or os.cpu_count() or 1)
        return load_model(self.store, self.client, device=self.device, dtype=dtype)

    # -- generation --------------------------------------------------------------------------------------
    def _inputs(self, batch: list[list[int]]) -> dict[str, torch.Tensor]:
        n = max(len(x) for x in batch)
        left = self.spec.family == "causal"  # decoder-only models pad on the left for generation
        ids, mask = [], []
        for x in batch:
            pad = [self.pad_id] * (n - len(x))
            ids.append(pad + list(x) if left else list(x) + pad)
            mask.append([0] * len(pad) + [1] * len(x) if left else [1] * len(x) + [0] * len(pad))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long, device=self.device),
            "attention_mask": torch.tensor(mask, dtype=torch.long, device=self.device),
        }

    def _run(self, req: GenerateRequest, sink: queue.Queue | None) -> GenerateResult:
        from transformers import StoppingCriteriaList

        inputs = self._inputs(req.input_ids)
        cancelled = None
        if req.batch_id is not None:
            with self._cancel_lock:
                cancelled = self._cancels.setdefault(req.batch_id, set())
        hook = _StepHook(self.client, sink, req.row_limits, cancelled)
        kwargs: dict[str, Any] = {
            "max_new_tokens": req.max_new_tokens,
            "do_sample": req.do_sample,
            "stopping_criteria": StoppingCriteriaList([hook]),
            "return_dict_in_generate": True,
            "output_logits": req.output_logits,
        }
        for k in ("temperature", "top_p", "top_k"):
            if getattr(req, k) is not None:
                kwargs[k] = getattr(req, k)
        with self._lock:
            if req.seed is not None:
                torch.manual_seed(req.seed)
            if req.trace_request is not None:
                self.client.start_trace(req.trace_request, len(req.input_ids))
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    out = self.model.generate(**inputs, **kwargs)
            except ZipMoEError as e:  # e.g. a damaged expert: the tokens so far travel with the error
                start = inputs["input_ids"].shape[1] if self.spec.family == "causal" else 1
                rows = hook.last.tolist() if hook.last is not None else [[] for _ in req.input_ids]
                e.partial_token_ids = [self._trim(r[start:]) for r in rows]
                raise
            finally:
                self.client.finish()
                trace = self.client.stop_trace() if req.trace_request is not None else None
                if req.batch_id is not None:
                    with self._cancel_lock:
                        self._cancels.pop(req.batch_id, None)
                        self._ended.append(req.batch_id)
            t_end = time.perf_counter()
        seqs = out.sequences.tolist()
        start = inputs["input_ids"].shape[1] if self.spec.family == "causal" else 1
        token_ids = [self._trim(s[start:]) for s in seqs]
        for row, n in hook.stopped.items():  # rows the hook stopped end there (transformers padded the rest)
            token_ids[row] = token_ids[row][:n]
        times = hook.times
        ttft = (times[0] - t0) if times else (t_end - t0)
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        ntok = sum(len(t) for t in token_ids)
        return GenerateResult(
            token_ids=token_ids,
            ttft_s=ttft,
            tpot_s=tpot,
            tokens_per_s=ntok / (t_end - t0) if t_end > t0 else 0.0,
            step_times=[t - t0 for t in times],
            logits=[x.float().cpu() for x in out.logits] if req.output_logits else None,
            trace=trace,
        )

    def _trim(self, ids: list[int]) -> list[int]:
        for i, t in enumerate(ids):
            if t in self.eos:
                return ids[: i + 1]
        return ids

    def generate(self, req: GenerateRequest) -> GenerateResult:
        """Generate for a batch of token-id prompts; blocks until done."""
        return self._on_compute(self._run, req, None)

    def cancel(self, batch_id: str, rows: list[int]) -> None:
        """Stop ``rows`` of the generation named ``batch_id`` (GenerateRequest.batch_id) after the step that
        is running: their token ids end there, they are padded as transformers pads any stopped row, and the
        generation ends once every row has stopped. A cancel that arrives before its generation starts
        applies from its first step; one for a generation that already ended is ignored. Does not block."""
        with self._cancel_lock:
            if batch_id not in self._ended:
                self._cancels.setdefault(batch_id, set()).update(rows)

    def generate_stream(self, req: GenerateRequest) -> Iterator[tuple[str, Any]]:
        """Yield ``("tokens", [one id per prompt])`` as each step finishes, then ``("result", GenerateResult)``.
        Errors raised by the generation are re-raised here."""
        sink: queue.Queue = queue.Queue()
        box: dict[str, Any] = {}

        def work():
            try:
                box["result"] = self._run(req, sink)
            except BaseException as e:  # re-raised in the consumer
                box["error"] = e
            finally:
                sink.put(("end", None))

        runner = self._compute or ComputeThread("zipmoe-generate")
        done = runner.submit(work)
        if runner is not self._compute:
            runner.stop()  # a thread for this stream alone: it ends with the generation
        while True:
            kind, value = sink.get()
            if kind == "end":
                break
            yield kind, value
        done.result()
        if "error" in box:
            raise box["error"]
        yield "result", box["result"]

    # -- reporting -----------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        non_expert = sum(p.numel() * p.element_size() for p in self.model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in self.model.buffers())
        return {
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "model_load_s": self.load_s,
            "non_expert_bytes": non_expert + buffers,
            **self.client.report(),
        }

    def reset_stats(self) -> None:
        self.client.reset_stats()
        if self.client.events is not None:
            self.client.events.clear()
        reset_lanes = getattr(self.client.transport, "reset_lane_stats", None)
        if reset_lanes is not None:  # lanes in this process (backends/colocated.py)
            reset_lanes()

    def held_results(self) -> set[int]:
        """Lanes in this process: the scheduler's tokens whose results it holds (diagnostics)."""
        return self.client.transport.held_results()

    def lane_stats(self) -> tuple[dict, list[dict]]:
        """(I/O loader, per decode lane) stats of the lanes that run in this process (``lanes="executor"``)."""
        return self.client.transport.lane_stats()

    def lane_read_timeline(self) -> dict:
        """IOLoader.read_timeline() of the loader that runs in this process (``lanes="executor"``)."""
        return self.client.transport.lane_read_timeline()

    def timeline(self) -> list[tuple]:
        """The recorded MoE-layer events (with ``timeline``): (unix time, kind, layer, expert, extra)."""
        return list(self.client.events or [])

    def ping(self) -> bool:
        return True
