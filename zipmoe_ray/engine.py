"""ZipMoEEngine: bit-exact generation from a store under a memory budget, on the local or Ray backend.

    with ZipMoEEngine("tiny-qwen.zmoe", memory_budget="25%", backend="ray") as engine:
        out = engine.generate("The robot", max_new_tokens=16)
        print(out.text, engine.stats()["tpot_s"])

The engine starts (or attaches to) the four stages, calibrates the cost model on them, and turns prompts
into token ids and back. See docs/architecture.md for the pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import BudgetError, ConfigError, ZipMoEError
from .runtime.config import EngineConfig
from .runtime.sizes import parse_size
from .schedule.costs import CostModel
from .stages.executor import GenerateRequest, GenerateResult, default_device
from .stages.scheduler import SchedulerConfig, expert_sizes, minimum_budget
from .store import open_store

__all__ = ["GenerationOutput", "ZipMoEEngine"]

log = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    token_ids: list[int]  # generated ids only
    text: str
    logits: Any = None  # [steps, vocab] float32 when output_logits=True


class ZipMoEEngine:
    """Serve a store. Blocks while starting (Ray start-up, model load, calibration: seconds).

    Args mirror :class:`~zipmoe_ray.runtime.config.EngineConfig`; ``stages`` wires in actors the caller
    started (see zipmoe_ray.backends.ray_backend.start_* and the README), which the engine then does not
    kill on close. Raises BudgetError (budget too small, with the minimum), ConfigError, StoreError.
    """

    def __init__(
        self,
        store_dir: str | os.PathLike,
        *,
        memory_budget: int | str,
        device: str | None = None,
        num_decompressors: int | None = None,
        backend: str = "ray",
        address: str | None = None,
        stages=None,
        trace_path: str | os.PathLike | None = None,
        plan=None,
        **options,
    ):
        self.config = EngineConfig(
            memory_budget=memory_budget,
            device=device,
            num_decompressors=num_decompressors,
            backend=backend,
            address=address,
            **options,
        )
        self.store_dir = str(store_dir)
        self.store = open_store(self.store_dir)
        self.trace_path = str(trace_path) if trace_path else None
        self._trace_requests = 0
        self.sizes = expert_sizes(self.store)
        self.expert_bytes = sum(s.full for s in self.sizes.values())
        self.budget = parse_size(memory_budget, total=self.expert_bytes)
        need = minimum_budget(self.sizes, self.store.top_k)
        if self.budget < need:
            raise BudgetError(
                f"memory budget {self.budget:,} B ({self.budget / self.expert_bytes:.1%} of the routed-expert bytes) "
                f"is too small: one MoE layer's {self.store.top_k} active experts need {need:,} B of buffers in "
                f"flight ({need / self.expert_bytes:.1%}); give at least --memory-budget {need}"
            )
        self.device = self.config.device or (default_device() if backend == "local" else None)
        rod = self.config.recombine_on_device
        self._sched_config = SchedulerConfig(
            budget=self.budget,
            split=self.config.split_rule(),
            popularity=self.config.popularity,
            decay=self.config.decay,
            recombine_on_device=bool(rod) if rod is not None else (self.device or "cpu") != "cpu",
            keep_full_payload=(self.device or "cpu") == "cpu",
            # Spreading one expert's decode over lanes pays when pieces go straight to an accelerator; for a
            # CPU executor the pieces must be copied together, which measured slower here (docs/architecture.md).
            decode_parts=None if (self.device or "cpu") != "cpu" else 1,
        )
        self._closed = False
        self._ray_started = False
        self._generation_s = 0.0
        self._last: GenerateResult | None = None
        self._tokenizer = None
        self._cancelled: dict[str, set[int]] = {}  # stream_batch rows stopped by cancel(), per batch id
        self._gen_eos: set[int] | None = None
        self._owned: list = []
        self._cluster = None  # backends.cluster.ClusterStages when serving across several nodes
        self._node_info = None  # the node of a one-node Ray run (None: local backend)
        self._here: dict = {}  # Ray options pinning single-node stages to this program's node
        self.plan = None
        self.plan_source = "fixed split" if (self.config.split or self.config.policy != "zipmoe") else ""
        t0 = time.perf_counter()
        try:
            if backend == "local":
                self._start_local_workers()
            else:
                self._start_ray_workers(stages)
            self.costs = self._calibrate() if self.config.calibrate else CostModel.nominal()
            if stages is None:
                self._sched_config = self._planned(self._sched_config, plan)
            if backend == "local":
                self._start_local_rest()
            else:
                self._start_ray_rest(stages)
            self._call(self._scheduler, "set_costs", self.costs)
            self._reset_stats()
        except BaseException:
            self.close()
            raise
        self.start_s = time.perf_counter() - t0

    # -- start-up ------------------------------------------------------------------------------------------
    def _planned(self, cfg: SchedulerConfig, plan) -> SchedulerConfig:
        """The split between forms: an explicit ``split`` or a baseline policy as given; otherwise a plan,
        from ``plan`` (a Plan or its JSON file), else from a trace recorded next to the store
        (``zipmoe-trace.jsonl``), else from a uniform prior, planned with the calibrated costs."""
        from dataclasses import replace

        from .plan.planner import Plan, make_plan
        from .plan.workload import Workload

        if self.config.split is not None or self.config.policy != "zipmoe":
            return cfg
        if plan is not None:
            p = plan if isinstance(plan, Plan) else Plan.load(plan)
            source = "given plan"
        else:
            trace = os.path.join(self.store_dir, "zipmoe-trace.jsonl")
            w = None
            if os.path.isfile(trace):
                from .trace.recorded import load_recorded

                w = Workload.from_recorded(load_recorded(trace), sizes=self.sizes)
                source = f"planned from {trace}"
            if w is None or not w.steps:  # no trace, or one without a step
                layers = self.store.layers()
                w = Workload.uniform(layers, self.store.num_experts, self.store.top_k, self.sizes)
                source = "planned from a uniform prior"
            reserve = minimum_budget(self.sizes, self.store.top_k)
            p = make_plan(
                w,
                self.budget,
                self.costs,
                self.config.workers,
                reserve=reserve,
                on_device=cfg.recombine_on_device,
            )
        unknown = [k for k in p.forms if k not in self.sizes]
        if unknown:
            raise ConfigError(
                f"the plan names experts {unknown[:3]} that this store does not have; plan for this store"
            )
        self.plan = p
        self.plan_source = source
        log.info("cache plan (%s): %s", source, p.counts())
        return replace(cfg, split=p.split_rule(self.sizes), prior=p.access)

    def _start_local_workers(self) -> None:
        from .backends.local import LocalRunner
        from .stages.decompressor import Decompressor
        from .stages.loader import IOLoader

        self._loader = IOLoader(self.store_dir, self.config.read_options(), copy_parts=True)
        self._decompressors = [Decompressor(self.store_dir, i) for i in range(self.config.workers)]
        self._runner = LocalRunner(self._loader, self._decompressors)

    def _start_local_rest(self) -> None:
        from .backends.local import LocalTransport
        from .stages.executor import Executor
        from .stages.scheduler import Scheduler

        self._scheduler = Scheduler(self.store_dir, self._sched_config, self._runner)
        self._executor = Executor(
            self.store_dir,
            LocalTransport(self._scheduler),
            self.device,
            self.config.dtype,
            self.config.torch_threads,
        )
        self.device = self._executor.device

    def _start_ray_workers(self, stages) -> None:
        import sys

        if "ray" not in sys.modules and not self.config.address:
            # an embedded single-node cluster: keep every Ray listener on 127.0.0.1 (read at import time)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        from .backends import ray_backend as rb

        if not ray.is_initialized():
            if self.config.address:
                ray.init(address=self.config.address, log_to_driver=False)
            else:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
                self._ray_started = True
        res = self.config.resources or None
        if stages is None and not res and self._start_cluster_workers():
            return
        if stages is None:
            here = self._here
            self._loader = rb.start_loader(self.store_dir, self.config.read_options(), resources=res, **here)
            self._decompressors = rb.start_decompressors(
                self.store_dir, self.config.workers, resources=res, **here
            )
            self._owned = [self._loader, *self._decompressors]
            self._wait([a.ping.remote() for a in self._owned])
        else:
            self._loader, self._decompressors = stages.loader, stages.decompressors

    def _start_cluster_workers(self) -> bool:
        """On a cluster of several nodes, start every node's stages (see backends/cluster.py); False when
        this program sees one node only."""
        from .backends import cluster

        infos = cluster.discover_nodes(list(self.config.nodes) if self.config.nodes else None)
        if len(infos) < 2:  # one node serves: keep every stage on this program's node
            self._here = cluster.pin(infos[0])
            self._node_info = infos[0]
            return False
        inflight = cluster.inflight_per_node(self.store.top_k, len(infos))
        budgets = cluster.node_budgets(self.budget, infos)
        need = minimum_budget(self.sizes, inflight)
        if min(budgets.values()) < need:
            raise BudgetError(
                f"memory budget {self.budget:,} B split over {len(infos)} nodes leaves {min(budgets.values()):,} B "
                f"per node; each needs at least {need:,} B for {inflight} experts in flight: give at least "
                f"--memory-budget {need * len(infos)}"
            )
        self._cluster = cluster.ClusterStages()
        for info in infos:
            ns = cluster.start_node(
                info,
                self.store_dir,
                self.config.read_options(),
                self.config.num_decompressors,
                self.config.torch_threads,
                self.device,
            )
            self._cluster.nodes[info.name] = ns
            self._owned.extend(ns.actors())
        ids = {}
        for name, ns in self._cluster.nodes.items():  # every node must read a copy of this very store
            try:
                ids[name] = self._wait(ns.loader.store_id.remote())
            except ZipMoEError as e:
                raise type(e)(f"node {name} ({ns.info.address}) cannot serve this store: {e}") from None
        mine = self.store.index.store_id.hex()
        other = sorted(n for n, i in ids.items() if i != mine)
        if other:
            raise ConfigError(
                f"nodes {other} read a different store at {self.store_dir}; every node needs a copy of the same "
                "store at the same path (copy the store directory to each device)"
            )
        self._wait([a.ping.remote() for a in self._cluster.actors()])
        ex = self._cluster.executor_node
        self._loader, self._decompressors = ex.loader, ex.decompressors
        self._node_budgets, self._inflight = budgets, inflight
        log.info(
            "serving across %d nodes: %s", len(infos), ", ".join(f"{i.name} ({i.address})" for i in infos)
        )
        return True

    def _start_cluster_rest(self) -> None:
        from .backends import cluster
        from .backends import ray_backend as rb
        from .stages.cluster_scheduler import NodeSetup

        setups = [
            NodeSetup(
                name,
                self._node_budgets[name],
                rb.RayRunner(ns.loader, ns.decompressors),
                executor=ns.info.driver,
                inflight=self._inflight,
            )
            for name, ns in self._cluster.nodes.items()
        ]
        here = cluster.pin(self._cluster.executor_node.info)
        classes = rb.actor_classes()
        scheduler = (
            classes["ClusterScheduler"].options(**here).remote(self.store_dir, self._sched_config, setups)
        )
        hosts = {name: ns.host for name, ns in self._cluster.nodes.items() if ns.host is not None}
        transport = rb.RayTransport(scheduler, hosts, self.config.node_timeout)
        executor = rb.start_executor(
            self.store_dir,
            scheduler,
            device=self.device,
            dtype=self.config.dtype,
            torch_threads=self.config.torch_threads,
            transport=transport,
            **here,
        )
        self._owned.extend([scheduler, executor])
        ex = self._cluster.executor_node
        self._stages = rb.Stages(ex.loader, ex.decompressors, scheduler, executor)
        self._scheduler, self._executor = scheduler, executor
        self._wait([scheduler.ping.remote(), executor.ping.remote()])
        self.device = self._wait(executor.stats.remote())["device"]
        for name, host in hosts.items():  # remote experts must run the executor's kernels to stay bit-exact
            got = self._wait(host.stats.remote())["device"]
            if got.split(":")[0] != str(self.device).split(":")[0]:
                raise ConfigError(
                    f"node {name} computes experts on {got} but the executor runs on {self.device}: outputs would "
                    "not be bit-identical; give every node the same kind of device (--device), or leave that "
                    "node out (--nodes)"
                )

    def _start_ray_rest(self, stages) -> None:
        from .backends import ray_backend as rb

        if self._cluster is not None:
            self._start_cluster_rest()
            return
        res = self.config.resources or None
        if stages is None:
            loader, decompressors = self._loader, self._decompressors
            scheduler = rb.start_scheduler(
                self.store_dir, self._sched_config, loader, decompressors, **self._here
            )
            executor = rb.start_executor(
                self.store_dir,
                scheduler,
                device=self.device,
                dtype=self.config.dtype,
                torch_threads=self.config.torch_threads,
                resources=res,
                **self._here,
            )
            stages = rb.Stages(loader, decompressors, scheduler, executor)
            self._owned = stages.all()
        self._stages = stages
        self._loader, self._decompressors = stages.loader, stages.decompressors
        self._scheduler, self._executor = stages.scheduler, stages.executor
        self._wait([a.ping.remote() for a in stages.all()])
        self.device = self._wait(self._executor.stats.remote())["device"]

    def _wait(self, refs):
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            raise ray_unwrap(e) from None
        except ray.exceptions.ActorDiedError as e:
            cause = getattr(e, "cause", None) or e
            raise ray_unwrap(cause) if isinstance(cause, Exception) else e from None

    def _call(self, target, method: str, *args):
        if self.config.backend == "local":
            return getattr(target, method)(*args)
        return self._wait(getattr(target, method).remote(*args))

    def _calibrate(self) -> CostModel:
        io = self._call(self._loader, "calibrate", None, 16 << 20)
        dec = self._call(self._decompressors[0], "calibrate", None, 16 << 20)
        costs = CostModel(
            read_bps=io["read_bps"],
            read_latency=io["read_latency"],
            decode_bps=dec["decode_bps"],
            decompress_bps=dec["decompress_bps"],
            source=f"calibrated at start-up ({io['mode']} reads)",
        )
        log.info("calibration: %s", costs)
        return costs

    def _reset_stats(self) -> None:
        targets = [self._loader, *self._decompressors, self._scheduler, self._executor]
        if self._cluster is not None:
            gone = set(self._call(self._scheduler, "failed_nodes"))
            targets = [self._scheduler, self._executor] + [
                a for name, ns in self._cluster.nodes.items() if name not in gone for a in ns.actors()
            ]
        for target in targets:
            self._call(target, "reset_stats")
        self._generation_s = 0.0

    def reset_stats(self) -> None:
        """Zero the counters (hits, bytes read, lane busy time, peak) but keep the cache: for measuring a
        warm run after a warm-up."""
        self._check_open()
        self._reset_stats()

    # -- prompts -------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.store_dir)
            except (OSError, ValueError) as e:
                raise ConfigError(
                    f"{self.store_dir}: no usable tokenizer ({e}); pass token ids instead of text"
                ) from None
        return self._tokenizer

    def _encode(self, prompts) -> tuple[list[list[int]], bool]:
        single = isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        )
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ConfigError("no prompts given")
        ids = []
        for p in batch:
            if isinstance(p, str):
                ids.append(self.tokenizer(p)["input_ids"])
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
                ids.append(list(p))
            else:
                raise ConfigError(f"a prompt must be text or a list of token ids, got {type(p).__name__}")
            if not ids[-1]:
                raise ConfigError("a prompt tokenized to nothing; give at least one token")
        return ids, single

    def _decode(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except ConfigError:
            return ""

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
        them: returns a list). Greedy by default; ``do_sample`` with ``seed`` samples reproducibly. Blocks."""
        self._check_open()
        ids, single = self._encode(prompts)
        req = GenerateRequest(
            ids,
            max_new_tokens,
            do_sample,
            seed,
            temperature,
            top_p,
            top_k,
            output_logits,
            self._next_trace_request(),
        )
        t0 = time.perf_counter()
        res: GenerateResult = self._call(self._executor, "generate", req)
        self._generation_s += time.perf_counter() - t0
        self._last = res
        self._write_trace(res.trace)
        outs = []
        for i, tok in enumerate(res.token_ids):
            logits = None
            if res.logits is not None:
                import torch

                logits = torch.stack([step[i] for step in res.logits])
            outs.append(GenerationOutput(tok, self._decode(tok), logits))
        return outs[0] if single else outs

    def stream(self, prompt, max_new_tokens: int = 32, **kw) -> Iterator[tuple[int, str]]:
        """Yield ``(token_id, text_so_far_delta)`` for one prompt as each token is produced."""
        self._check_open()
        ids, single = self._encode(prompt)
        if not single:
            raise ConfigError("stream() takes one prompt")
        req = GenerateRequest(ids, max_new_tokens, **kw, trace_request=self._next_trace_request())
        t0 = time.perf_counter()
        produced: list[int] = []
        text = ""
        for kind, value in self._stream_events(req):
            if kind == "tokens":
                tok = value[0]
                if produced and produced[-1] in self._eos():
                    continue
                produced.append(tok)
                new_text = self._decode(produced)
                delta, text = new_text[len(text) :], new_text
                yield tok, delta
            elif kind == "result":
                self._last = value
                self._write_trace(value.trace)
        self._generation_s += time.perf_counter() - t0

    def stream_batch(
        self,
        prompts,
        max_new_tokens: int | list[int] = 32,
        *,
        batch_id: str | None = None,
        do_sample: bool = False,
        seed: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
    ) -> Iterator[list[int | None]]:
        """Generate for a batch of prompts (a list of texts or token-id lists), yielding after every step one
        entry per prompt: the token id it just got, or None once it has finished (end of text, its own
        ``max_new_tokens`` reached, or stopped by :meth:`cancel` under ``batch_id``). ``max_new_tokens`` is
        one limit or one per prompt. A row's tokens equal ``generate`` on the same batch with that row stopped
        where it stopped (transformers' per-row stopping: a stopped row is padded); the generation ends when
        every row has finished. Blocks between steps; raises what ``generate`` raises."""
        self._check_open()
        ids, single = self._encode(prompts)
        if single:
            ids = [ids[0]]
        limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else None
        if limits is not None and len(limits) != len(ids):
            raise ConfigError(f"{len(limits)} max_new_tokens for {len(ids)} prompts: give one per prompt")
        req = GenerateRequest(
            ids,
            max(limits) if limits else int(max_new_tokens),
            do_sample,
            seed,
            temperature,
            top_p,
            top_k,
            trace_request=self._next_trace_request(),
            row_limits=limits,
            batch_id=batch_id,
        )
        limits = req.row_limits or [req.max_new_tokens] * len(ids)
        cancelled = self._cancelled.setdefault(batch_id, set()) if batch_id is not None else set()
        eos = self.eos_token_ids
        count = [0] * len(ids)
        finished = [False] * len(ids)
        t0 = time.perf_counter()
        try:
            for kind, value in self._stream_events(req):
                if kind == "tokens":
                    out: list[int | None] = []
                    for row, tok in enumerate(value):
                        if finished[row] or row in cancelled:
                            finished[row] = True
                            out.append(None)
                            continue
                        count[row] += 1
                        finished[row] = tok in eos or count[row] >= limits[row]
                        out.append(tok)
                    yield out
                elif kind == "result":
                    self._last = value
                    self._write_trace(value.trace)
        finally:
            self._generation_s += time.perf_counter() - t0
            if batch_id is not None:
                self._cancelled.pop(batch_id, None)

    def cancel(self, batch_id: str, rows: list[int]) -> None:
        """Stop ``rows`` of the :meth:`stream_batch` generation named ``batch_id``: from now on they yield
        None, and the executor stops them after its current step (they stop using the cache and compute
        once every row of the batch has finished: see docs/serving.md). Callable from another thread; does
        not wait for the generation."""
        self._check_open()
        self._cancelled.setdefault(batch_id, set()).update(rows)
        if self.config.backend == "local":
            self._executor.cancel(batch_id, list(rows))
        else:
            self._executor.cancel.remote(
                batch_id, list(rows)
            )  # fire and forget: ordered after the stream call

    @property
    def eos_token_ids(self) -> set[int]:
        """The token ids that end a sequence (the tokenizer's and the generation config's end of text)."""
        try:
            return self._eos() | self._generation_eos()
        except ConfigError:  # a store without a tokenizer
            return set(self._generation_eos())

    def _generation_eos(self) -> set[int]:
        """The end-of-text ids of the store's generation config (what transformers stops a row on)."""
        if self._gen_eos is None:
            from transformers import GenerationConfig

            try:
                e = GenerationConfig.from_pretrained(self.store_dir).eos_token_id
            except OSError:  # no generation_config.json: the tokenizer's is the one
                e = None
            self._gen_eos = set(e if isinstance(e, list) else [e]) - {None}
        return self._gen_eos

    # -- traces -----------------------------------------------------------------------------------------
    def trace_model(self) -> dict[str, Any]:
        return {
            "model_type": self.store.model_type,
            "layers": self.store.layers(),
            "num_experts": self.store.num_experts,
            "top_k": self.store.top_k,
            "expert_bytes": max(s.full for s in self.sizes.values()),
        }

    def _next_trace_request(self) -> int | None:
        if not self.trace_path:
            return None
        from .trace.recorded import RecordedTrace, load_recorded

        if self._trace_requests == 0:
            RecordedTrace(self.trace_model()).write_header(self.trace_path, self.store_dir)
            existing = load_recorded(self.trace_path).steps
            self._trace_requests = 1 + max((s.request for s in existing), default=-1)
        n = self._trace_requests
        self._trace_requests += 1
        return n

    def _write_trace(self, steps) -> None:
        if self.trace_path and steps:
            from .trace.recorded import RecordedTrace

            RecordedTrace.append(self.trace_path, steps)

    def _eos(self) -> set[int]:
        e = self.tokenizer.eos_token_id
        return {e} if e is not None else set()

    def _stream_events(self, req: GenerateRequest):
        if self.config.backend == "local":
            yield from self._executor.generate_stream(req)
            return
        import ray

        gen = self._executor.generate_stream.options(num_returns="streaming").remote(req)
        for ref in gen:
            try:
                yield ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise ray_unwrap(e) from None

    # -- statistics ----------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters since start-up: latency of the last generation, hits and misses per cache form, bytes read,
        peak cache bytes against the budget, lane utilisation, calibration."""
        self._check_open()
        sched = self._call(self._scheduler, "stats")
        ex = self._call(self._executor, "stats")
        nodes, loaders, decs = self._node_stats(sched)
        loader = {
            "bytes_read": sum(x["bytes_read"] for x in loaders),
            "busy_s": max(x["busy_s"] for x in loaders),
            "read_mode": loaders[0]["read_mode"],
            "read_options": loaders[0]["read_options"],
        }
        wall = self._generation_s or 1e-9
        last = self._last
        misses = sched["misses"]
        return {
            "ttft_s": last.ttft_s if last else None,
            "tpot_s": last.tpot_s if last else None,
            "tokens_per_s": last.tokens_per_s if last else None,
            "budget": self.budget,
            "expert_bytes": self.expert_bytes,
            "peak_cache_bytes": sched["cache"]["peak"],
            "hits": sched["hits"],
            "misses": {"disk": misses},
            "hit_rate": sched["hit_rate"],
            "miss_rate": sched["miss_rate"],
            "bytes_read": loader["bytes_read"],
            "read_mode": loader["read_mode"],
            "read_options": loader["read_options"],
            "lanes": {
                "io_utilisation": min(1.0, loader["busy_s"] / wall),
                "cpu_utilisation": [min(1.0, d["busy_s"] / wall) for d in decs],
                "workers": len(decs),
                "decoded_bytes": sum(d["decoded_bytes"] for d in decs),
                "decode_busy_s": sum(d["busy_s"] for d in decs),
            },
            "split": {
                **sched["plan"],
                "source": self.plan_source,
                "plan": self.plan.counts() if self.plan else None,
            },
            "cache": sched["cache"],
            "scheduler": {
                k: sched[k] for k in ("requests", "waves", "steps", "background_tasks", "planned_makespan_s")
            },
            "executor": ex,
            "non_expert_bytes": ex["non_expert_bytes"],
            "calibration": self.costs.to_dict(),
            "backend": self.config.backend,
            "generation_s": self._generation_s,
            "nodes": nodes,
        }

    def _node_stats(self, sched: dict) -> tuple[dict[str, dict], list[dict], list[dict]]:
        """Per node: tasks run, hits per form, bytes read (one node unless serving across a cluster); and the
        stats of the loaders and decompressors that answered, each asked once."""
        from .backends.cluster import node_entry

        if self._cluster is None:
            info = self._node_info
            name, address = (info.name, info.address) if info else ("local", "local")
            loader = self._call(self._loader, "stats")
            decs = [self._call(d, "stats") for d in self._decompressors]
            return {name: node_entry(address, loader, decs, None, sched, len(self.sizes))}, [loader], decs
        import ray

        out, loaders, all_decs = {}, [], []
        for name, ns in self._cluster.nodes.items():
            down = {"alive": False, "address": ns.info.address, "tasks": None}
            if name not in sched["alive"]:
                out[name] = down
                continue
            refs = [a.stats.remote() for a in ns.actors()]
            try:  # a node that died since the last layer must not hang the report
                got = ray.get(refs, timeout=2 * self.config.node_timeout)
            except ray.exceptions.GetTimeoutError:
                out[name] = {**down, "note": f"not answering within {2 * self.config.node_timeout:g} s"}
                continue
            except ray.exceptions.RayError as e:  # died since, or a bug in stats(): say which
                out[name] = {**down, "note": f"stats failed: {type(e).__name__}: {e}"}
                continue
            n = len(ns.decompressors)
            loaders.append(got[0])
            all_decs.extend(got[1 : 1 + n])
            out[name] = node_entry(
                ns.info.address,
                got[0],
                got[1 : 1 + n],
                got[1 + n] if ns.host is not None else None,
                sched["nodes"][name],
                sched["homes"][name],
            )
        if not loaders:
            raise ZipMoEError(
                "no node of the cluster answers for its stats; check the nodes (README, Edge clusters)"
            )
        return out, loaders, all_decs

    def timeline(self) -> list[tuple]:
        """The executor's MoE-layer timeline since the last reset (needs ZIPMOE_TIMELINE=1 when the engine
        starts): (unix time, kind, layer, expert, extra) with kinds layer, request, response, ready,
        computed, layer_done, step."""
        self._check_open()
        return self._call(self._executor, "timeline")

    # -- lifetime --------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("the engine is closed")

    def close(self) -> None:
        """Stop every stage the engine started and release their memory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.config.backend == "local":
            runner = getattr(self, "_runner", None)
            if runner is not None:
                runner.shutdown()
            return
        try:
            import ray
        except ImportError:
            return
        from .backends.ray_backend import kill_and_wait

        owned, self._owned = self._owned, []
        if not ray.is_initialized():
            return
        if self._ray_started:
            ray.shutdown()  # the embedded cluster goes, and every actor with it
        else:
            kill_and_wait(owned)  # on a shared cluster: gone before close() returns

    def __enter__(self) -> ZipMoEEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def ray_unwrap(e: BaseException) -> BaseException:
    from .backends.ray_backend import unwrap

    u = unwrap(e)
    return u if isinstance(u, ZipMoEError) else e
