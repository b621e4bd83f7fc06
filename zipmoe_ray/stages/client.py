"""ExpertClient: the executor's side of the cache.

It holds the FULL form (experts recombined on the compute device), asks the scheduler for everything else
with one request per MoE layer, and hands each expert to the layer as soon as its handle resolves. What it
finished with is reported back with the next request (or at the end of the step) so that staging is
released and popularity updated without extra calls.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..cache import Key
from ..codec import layout_for
from ..models.experts_impl import ExpertWeights
from .protocol import Delivery

__all__ = ["ExpertClient"]

log = logging.getLogger(__name__)


@dataclass
class _LayerShape:
    shapes: list[tuple[int, ...]]
    roles: list[str]
    numel: int
    split: int  # elements of the first weight (gate_up or wi)


@dataclass
class ClientStats:
    full_hits: int = 0
    fetched: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    waves: int = 0
    wait_s: float = 0.0  # time the layer computation waited for an expert
    remote: dict[str, int] = field(default_factory=dict)  # experts computed on other nodes


class ExpertClient:
    """Implements models.experts_impl.ExpertSource for the executor."""

    def __init__(self, transport, store, device: str | torch.device = "cpu", timeline: bool = False):
        self.transport = transport
        # how long a layer waits on another node before asking whether it still lives (clusters only)
        self.node_timeout = getattr(transport, "node_timeout", None)  # only read with remote experts
        self.device = torch.device(device)
        dtypes = {t.dtype for r in store.index.experts for t in r.tensors}
        self.layout = layout_for(dtypes.pop())
        self.shapes: dict[int, _LayerShape] = {}
        for r in store.index.experts:
            if r.layer in self.shapes:
                continue
            shapes = [t.shape for t in r.tensors]
            roles = [t.role for t in r.tensors]
            split = sum(t.numel for t in r.tensors[:-1])
            self.shapes[r.layer] = _LayerShape(shapes, roles, r.numel, split)
        self.full: dict[Key, ExpertWeights] = {}
        self._hit_notes: list[tuple[int, int, int]] = []
        self._released: list[Key] = []
        self._in_use: dict[Key, Any] = {}
        self.stats = ClientStats()
        self._lock = threading.Lock()
        self.events: list[tuple] | None = [] if timeline else None  # EngineConfig.timeline
        self.trace: list | None = None  # recorded steps while a traced generation runs
        self._trace_step: dict[int, list[tuple[int, int]]] = {}
        self._trace_meta = (0, 1)  # (request, batch)

    def start_trace(self, request: int, batch: int) -> None:
        self.trace, self._trace_step, self._trace_meta = [], {}, (request, batch)

    def stop_trace(self) -> list:
        out, self.trace = self.trace or [], None
        return out

    def _event(self, kind: str, layer: int, expert: int = -1, extra: Any = None) -> None:
        if self.events is not None:
            self.events.append((time.time(), kind, layer, expert, extra))

    # -- building weights ----------------------------------------------------------------------------
    def _weights(self, layer: int, kind: str, value: np.ndarray) -> ExpertWeights:
        shape = self.shapes[layer]
        with warnings.catch_warnings():  # object-store arrays are read-only; the weights are only read
            warnings.simplefilter("ignore", UserWarning)
            if kind == "planes":
                n = shape.numel
                exp = torch.from_numpy(value[:n]).to(self.device)
                raw = torch.from_numpy(value[n:]).to(self.device)
                flat = torch.empty(n, dtype=self.layout.torch_dtype, device=self.device)
                pos = rpos = 0
                for s in shape.shapes:
                    k = int(np.prod(s))
                    r = k * self.layout.raw_width
                    flat[pos : pos + k] = self.layout.merge_torch(exp[pos : pos + k], raw[rpos : rpos + r])
                    pos, rpos = pos + k, rpos + r
            else:
                words = np.asarray(value)
                if kind == "raw":
                    words = words[: shape.numel * self.layout.itemsize].view(self.layout.word)
                signed = {2: torch.int16, 4: torch.int32}[self.layout.itemsize]
                flat = torch.from_numpy(words.view(np.dtype(f"i{self.layout.itemsize}"))).view(signed)
                flat = flat.view(self.layout.torch_dtype)
                if self.device.type != "cpu":
                    flat = flat.to(self.device, non_blocking=False)
        first_shape, second_shape = self._fused_shapes(shape)
        return ExpertWeights(flat[: shape.split].view(first_shape), flat[shape.split :].view(second_shape))

    @staticmethod
    def _fused_shapes(shape: _LayerShape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if shape.roles == ["gate", "up", "down"]:
            g = shape.shapes[0]
            return (2 * g[0], *g[1:]), shape.shapes[2]
        return shape.shapes[0], shape.shapes[1]

    # -- the ExpertSource protocol -------------------------------------------------------------------------
    def fetch(
        self, layer: int, experts: list[int], tokens: list[int], inputs=None
    ) -> Iterator[tuple[int, ExpertWeights | torch.Tensor]]:
        hits = [(e, t) for e, t in zip(experts, tokens) if (layer, e) in self.full]
        misses = [(e, t) for e, t in zip(experts, tokens) if (layer, e) not in self.full]
        self.stats.full_hits += len(hits)
        self._event("layer", layer, len(experts), len(hits))
        if self.trace is not None:
            self._trace_step[layer] = list(zip(experts, tokens))
        if not misses:
            self._hit_notes.extend((layer, e, t) for e, t in hits)
            for e, _ in hits:
                yield e, self.full[(layer, e)]
            self._event("layer_done", layer)
            return
        resp = self._request(layer, misses, hits)
        for e, _ in hits:
            w = self.full.get((layer, e))
            if w is not None:
                yield e, w
        tokens_of = dict(zip(experts, tokens))
        while True:
            redo = yield from self._consume(layer, resp, inputs)
            if redo:  # a node failed: its experts now have other homes; the deferred ones still wait
                resp = self._request(layer, [(e, tokens_of[e]) for e in redo] + list(resp.deferred), [])
                continue
            if not resp.deferred:
                break
            resp = self._request(layer, resp.deferred, [])
            self.stats.waves += 1
        self._event("layer_done", layer)

    def _request(self, layer, misses, hits):
        released, self._released = self._released, []
        self.stats.requests += 1
        self._event("request", layer, len(misses))
        resp = self.transport.request(layer, misses, hits, released)
        self._event("response", layer)
        for key in resp.drop_full:
            self.full.pop(tuple(key), None)
        return resp

    def _consume(self, layer: int, resp, inputs=None):
        """Yield each delivered expert when ready; returns the experts to request again because their node
        failed (its computation errored or did not answer within ``node_timeout``)."""
        pending: dict[Any, Delivery] = {}
        remaining: dict[int, int] = {}
        remote: dict[Any, str] = {}
        for d in resp.deliveries:
            if d.node is not None:  # send the hidden states to the expert's node
                x, w = inputs(d.expert)
                if d.parts:  # remote nodes decode whole experts (remote_node_config): never pieces
                    raise RuntimeError(f"expert {(layer, d.expert)} was delivered in pieces to node {d.node}")
                h = self.transport.compute(d.node, layer, d.expert, d.kind, x.cpu(), w.cpu(), d.handle)
                pending[h], remaining[d.expert], remote[h] = d, 1, d.node
                continue
            handles = d.parts or [d.handle]
            remaining[d.expert] = len(handles)
            for h in handles:
                pending[h] = d
        failed: set[str] = set()
        redo: list[int] = []
        while pending:
            t0 = time.perf_counter()
            ready = self.transport.wait_any(list(pending), timeout=self.node_timeout if remote else None)
            self.stats.wait_s += time.perf_counter() - t0
            if not ready:  # nothing arrived in node_timeout: ask the nodes still owing results if they live
                owed = {remote[h] for h in pending if h in remote}
                failed |= self.transport.unresponsive(owed, self.node_timeout)
            for h in ready:
                d = pending.pop(h)
                if h in remote:
                    try:
                        out = self.transport.get(h)
                    except Exception as e:  # the node's work may be lost: see is_node_failure
                        if self.transport.is_node_failure(e):
                            failed.add(remote[h])
                            redo.append(d.expert)
                            continue
                        raise
                    self._event("ready", layer, d.expert, (d.form, remote[h]))
                    self.stats.remote[remote[h]] = self.stats.remote.get(remote[h], 0) + 1
                    self._in_use[(layer, d.expert)] = out  # done() releases the node's staging
                    yield d.expert, out
                    continue
                remaining[d.expert] -= 1
                if remaining[d.expert]:
                    continue  # other pieces of this expert are still being decoded
                if d.parts:
                    values = [self.transport.get(x) for x in d.parts]  # raises before anything is used
                    self._event("ready", layer, d.expert, d.form)
                    if all(v is values[0] for v in values) and isinstance(values[0], np.ndarray):
                        w = self._weights(layer, d.kind, values[0])  # decoded in place by every lane
                    else:
                        w = self._assemble(layer, d.kind, values)
                else:
                    value = self.transport.get(h)
                    self._event("ready", layer, d.expert, d.form)
                    w = self._weights(layer, d.kind, value)
                key = (layer, d.expert)
                self.stats.fetched[d.form] = self.stats.fetched.get(d.form, 0) + 1
                if d.keep:
                    self.full[key] = w
                self._in_use[key] = w
                yield d.expert, w
            if failed:
                for h in [h for h in pending if remote.get(h) in failed]:
                    redo.append(pending.pop(h).expert)
                for node in failed:
                    log.warning("node %s stopped answering; its experts move to the nodes left", node)
                    self.transport.node_failed(node)
                failed = set()
        return redo

    def _assemble(self, layer: int, kind: str, pieces: list[list[tuple]]) -> ExpertWeights:
        """One expert's weights from the pieces decoded by several lanes (see Decompressor.decode)."""
        shape = self.shapes[layer]
        flat = torch.empty(shape.numel, dtype=self.layout.torch_dtype, device=self.device)
        signed = {2: torch.int16, 4: torch.int32}[self.layout.itemsize]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for piece in pieces:
                for entry in piece:
                    off = entry[0]
                    if kind == "planes":
                        exp = torch.from_numpy(entry[1]).to(self.device)
                        raw = torch.from_numpy(entry[2]).to(self.device)
                        flat[off : off + exp.numel()] = self.layout.merge_torch(exp, raw)
                    else:
                        words = np.asarray(entry[1])
                        src = torch.from_numpy(words.view(np.dtype(f"i{self.layout.itemsize}"))).view(signed)
                        flat[off : off + src.numel()] = src.view(self.layout.torch_dtype).to(self.device)
        first_shape, second_shape = self._fused_shapes(shape)
        return ExpertWeights(flat[: shape.split].view(first_shape), flat[shape.split :].view(second_shape))

    def done(self, layer: int, expert: int) -> None:
        self._event("computed", layer, expert)
        key = (layer, expert)
        if self._in_use.pop(key, None) is not None:  # fetched by this layer: its staging can go
            self._released.append(key)

    def end_step(self) -> None:
        """One generation step is over: report FULL hits and released experts, age popularity."""
        self._event("step", -1)
        if self.trace is not None:
            from ..trace.recorded import TraceStep

            req, batch = self._trace_meta
            n = len(self.trace)
            self.trace.append(TraceStep(req, n, "prefill" if n == 0 else "decode", batch, self._trace_step))
            self._trace_step = {}
        hits, self._hit_notes = self._hit_notes, []
        released, self._released = self._released, []
        self.transport.step(hits, released)

    def report(self) -> dict:
        return {
            "full_hits": self.stats.full_hits,
            "fetched_by_form": dict(self.stats.fetched),
            "requests": self.stats.requests,
            "waves": self.stats.waves,
            "executor_wait_s": self.stats.wait_s,
            "remote_computes": dict(self.stats.remote),
            "full_experts_held": len(self.full),
        }

    def reset_stats(self) -> None:
        self.stats = ClientStats()
