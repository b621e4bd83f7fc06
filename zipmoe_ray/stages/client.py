"""ExpertClient: the executor's side of the cache.

It holds the FULL form (experts recombined on the compute device), asks the scheduler for everything else
with one request per MoE layer, and hands each expert to the layer as soon as its handle resolves. What it
finished with is reported back with the next request (or at the end of the step) so that staging is
released and popularity updated without extra calls. A step's report waits for the next message the client
sends (a request, a prefetch, the end of the generation) or for :data:`STEP_BATCH` steps, whichever comes
first, and goes out with the other steps waiting: a run of steps in which every expert is held in full sends
one message per batch instead of one per token, and the scheduler has seen every earlier step whenever it
answers a request.

Prefetch (the control path off the critical path): while a layer computes, the model's next router applied
to this layer's input predicts the next layer's experts (``predict``); the client asks the scheduler to
start fetching those it does not hold, without waiting for the answer. When the next layer routes, the
predicted experts it really uses are already on their way: the client takes their handles from that
answer (by then arrived) and asks only for the rest, so a layer whose experts were all predicted makes no
blocking call at all. Uses of prefetched experts ride along with the next request or step; predictions
that were wrong are released like any fetch (the scheduler's ordinary admission rules decide what stays).
The routing and the computation never depend on a prediction.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..cache import Key
from ..models.experts_impl import ExpertWeights
from .prefetch_gate import PrefetchGate
from .protocol import Delivery
from .weights import WeightBuilder

__all__ = ["ExpertClient", "response_waits"]

log = logging.getLogger(__name__)

# Steps reported in one message at most: a message per step is an actor call, and the scheduler's process
# waking beside the two compute threads. All-hit on the Ray backend (Qwen preset, 4 MoE layers, 2-core VM,
# 2026-12-07), what it saves is inside this VM's noise: one message per 16 steps against one per step 87.5
# against 90.4 ms a token (three pairs), this tree against the one before 89.0 against 89.5 (four pairs).
# Kept small: the online re-planning times decode steps from these reports (the same timings, in the same
# order, up to 8 steps later), and a re-plan's demotions start when its batch arrives.
STEP_BATCH = 8
# MoE-layer events a timeline keeps (EngineConfig.timeline; the last ones, about 30 MB): a server or a long
# run started with it does not grow without bound
TIMELINE_EVENTS = 1 << 18


@dataclass
class ClientStats:
    full_hits: int = 0
    fetched: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    waves: int = 0  # requests for experts the staging deferred (one per released expert while some wait)
    wait_s: float = 0.0  # time the layer computation waited for an expert
    remote: dict[str, int] = field(default_factory=dict)  # experts computed on other nodes
    predicted: int = 0  # experts asked for ahead of their layer's routing
    prefetch_used: int = 0  # of those, the ones the layer really routed to
    prefetch_wasted: int = 0  # and the ones it did not
    needed: int = 0  # experts routed to that were not held in FULL form (predicted or not)
    gated: int = 0  # layers predicted, not fetched (scored only): the gate shut (stages/prefetch_gate.py)


@dataclass
class _Awaited:
    """What one call of ExpertClient._consume waits for: result handles (``pending``: handle -> delivery;
    ``remaining``: pieces per expert; ``remote``: handle -> the node computing it), the experts the staging
    deferred, the request for them on its way (``idle``: sent with nothing of the layer in flight), and the
    nodes found failed (``failed``: this round, not yet reported; ``dead``: reported)."""

    deferred: list = field(default_factory=list)
    pending: dict = field(default_factory=dict)
    remaining: dict = field(default_factory=dict)
    remote: dict = field(default_factory=dict)
    refill: Any = None
    idle: bool = False
    failed: set = field(default_factory=set)
    dead: set = field(default_factory=set)


def response_waits(events: list[tuple]) -> list[float]:
    """Seconds the executor was blocked on each scheduler answer in a timeline (``EngineConfig.timeline``):
    from the request, or from the last expert computed after it (a layer's FULL hits are computed while
    its request is answered), to the response."""
    out, since = [], None
    for t, kind, *_ in events:
        if kind == "request" or (kind == "computed" and since is not None):
            since = t
        elif kind == "response" and since is not None:
            out.append(max(0.0, t - since))
            since = None
    return out


class ExpertClient:
    """Implements models.experts_impl.ExpertSource for the executor. Not thread-safe: one generation at a
    time (the executor holds its lock)."""

    def __init__(
        self,
        transport,
        store,
        device: str | torch.device = "cpu",
        timeline: bool = False,
        prefetch: bool = True,
    ):
        self.transport = transport
        # how long a layer waits on another node before asking whether it still lives (clusters only)
        self.node_timeout = getattr(transport, "node_timeout", None)  # only read with remote experts
        self.builder = WeightBuilder(store, device)
        self.device = self.builder.device
        self.prefetching = prefetch
        self.full: dict[Key, ExpertWeights] = {}
        self._full_pending: dict[Key, Delivery] = {}  # kept FULL by the scheduler, arrived unused (prefetch)
        self._hit_notes: list[tuple[int, int, int]] = []
        self._steps: list[tuple] = []  # step reports not sent yet, in order (see STEP_BATCH)
        self._released: list[Key] = []
        self._used: list[tuple[int, int, int]] = []  # prefetched experts used, for the next report
        self._in_use: dict[Key, Any] = {}
        # delivered experts whose staging the scheduler holds until they are released: whatever a failed
        # generation leaves here is released by finish()
        self._owed: set[Key] = set()
        self._prefetch: dict[int, Any] = {}  # layer -> the scheduler's pending answer to a prefetch
        self._unanswered: list[Any] = []  # requests sent whose answers are not taken yet (see finish)
        self._prefetched: dict[Key, Delivery] = {}  # arrived, not yet used or released
        self._guess: tuple[int, list[int], list[int]] | None = None  # the next layer's prediction, unsent
        self.gate = PrefetchGate()
        self._shadow: dict[int, list[int]] = {}  # layer -> gated prediction's picks, scored when it routes
        self.stats = ClientStats()
        self.events: deque | None = deque(maxlen=TIMELINE_EVENTS) if timeline else None
        self.trace: list | None = None  # recorded steps while a traced generation runs
        self._trace_step: dict[int, list[tuple[int, int]]] = {}
        self._trace_pred: dict[int, list[tuple[int, int]]] = {}  # layer -> its prediction this step
        self._trace_meta = (0, 1)  # (request, batch)

    def start_trace(self, request: int, batch: int) -> None:
        self.trace, self._trace_step, self._trace_meta = [], {}, (request, batch)
        self._trace_pred = {}

    def stop_trace(self) -> list:
        out, self.trace = self.trace or [], None
        return out

    def _event(self, kind: str, layer: int, expert: int = -1, extra: Any = None) -> None:
        if self.events is not None:
            self.events.append((time.time(), kind, layer, expert, extra))

    # -- prefetch ------------------------------------------------------------------------------------------
    def _held(self, key: Key) -> bool:
        return key in self.full or key in self._full_pending

    def wants_prediction(self, layer: int) -> bool:
        """Whether the next router should predict ``layer``: prefetch is on and ``layer`` has no prefetch
        on its way. A prediction is made even while the gate is shut (``_ahead``): it is then scored, not
        fetched, which keeps the running precision measured without spending the I/O lane on it."""
        return self.prefetching and layer not in self._prefetch

    def predict(self, layer: int, experts: list[int], tokens: list[int]) -> None:
        """``layer`` is predicted to route to ``experts`` (``tokens`` each). Noted only: the fetches go out
        right after the current layer's own request (``_ahead``), so that they queue behind it on the
        lanes. Does not block."""
        self._guess = (layer, experts, tokens)
        if self.trace is not None:  # recorded whether fetched or gated: the simulator replays the gate
            self._trace_pred[layer] = list(zip(experts, tokens))

    def _ahead(self) -> None:
        """Start fetching the noted prediction's experts that are not held or already on their way."""
        if self._guess is None:
            return
        (layer, experts, tokens), self._guess = self._guess, None
        picks = [
            (e, t)
            for e, t in zip(experts, tokens)
            if not self._held((layer, e)) and (layer, e) not in self._prefetched
        ]
        if not picks:
            return
        if not self.gate.open:  # the gate is shut: score the guess when the layer routes
            self._shadow[layer] = [e for e, _ in picks]
            self.stats.gated += 1
            return
        # used before released: an expert used and finished with since the last report is in both, and the
        # scheduler must count its use before its flight is let go
        self._send_steps()
        released, self._released = self._released, []
        used, self._used = self._used, []
        self._event("prefetch", layer, len(picks))
        self._prefetch[layer] = self.transport.prefetch(layer, picks, released, used)
        self.stats.predicted += len(picks)

    def _arrived(self, layer: int) -> None:
        """Take the scheduler's answer to ``layer``'s prefetch, if one is pending."""
        pending = self._prefetch.pop(layer, None)
        if pending is None:
            return
        resp = self.transport.resolve(pending)
        self._drop(resp.drop_full)
        for d in resp.deliveries:
            self._prefetched[(layer, d.expert)] = d
            self._owed.add((layer, d.expert))

    def _unused(self, layer: int) -> int:
        """Release ``layer``'s prefetched experts that it did not route to; returns how many."""
        wrong = [k for k in self._prefetched if k[0] == layer]
        for key in wrong:
            d = self._prefetched.pop(key)
            self.stats.prefetch_wasted += 1
            if d.keep:  # the scheduler holds it as FULL here: build it when first used
                self._full_pending[key] = d
            self._give_back(key)
        return len(wrong)

    def _give_back(self, key: Key) -> None:
        """Report ``key`` released with the next request or step: its staging goes back to the cache."""
        self._released.append(key)
        self._owed.discard(key)

    def _drop(self, keys) -> None:
        for key in keys:
            key = tuple(key)
            self.full.pop(key, None)
            self._full_pending.pop(key, None)

    # -- the ExpertSource protocol -------------------------------------------------------------------------
    def _full_weights(self, key: Key) -> ExpertWeights:
        w = self.full.get(key)
        if w is None:  # kept FULL from a prefetch it was not used in: built now
            d = self._full_pending.pop(key)
            w = self.full[key] = self._build(
                key[0], d, [self.transport.get(h) for h in d.parts or [d.handle]]
            )
        return w

    def fetch(
        self, layer: int, experts: list[int], tokens: list[int], inputs=None
    ) -> Iterator[tuple[int, ExpertWeights | torch.Tensor]]:
        self._arrived(layer)
        hits = [(e, t) for e, t in zip(experts, tokens) if self._held((layer, e))]
        ahead = [(e, t) for e, t in zip(experts, tokens) if (layer, e) in self._prefetched]
        misses = [
            (e, t)
            for e, t in zip(experts, tokens)
            if not self._held((layer, e)) and (layer, e) not in self._prefetched
        ]
        self.stats.full_hits += len(hits)
        self._event("layer", layer, len(experts), len(hits))
        if self.trace is not None:
            self._trace_step[layer] = list(zip(experts, tokens))
        early = [self._prefetched.pop((layer, e)) for e, _ in ahead]
        self.stats.needed += len(ahead) + len(misses)
        self._used += [(layer, e, t) for e, t in ahead]
        self.stats.prefetch_used += len(ahead)
        wrong = self._unused(layer)
        shadow = self._shadow.pop(layer, ())
        routed = set(experts)
        self.gate.scored(len(ahead) + sum(e in routed for e in shadow), len(ahead) + wrong + len(shadow))
        if not misses:
            self._hit_notes.extend((layer, e, t) for e, t in hits)
            self._ahead()
            for e, _ in hits:
                yield e, self._full_weights((layer, e))
            if early:
                yield from self._consume(layer, early, inputs)
            self._event("layer_done", layer)
            return
        # the request goes out before this layer's FULL hits are computed and is answered while they are:
        # nothing waits on the scheduler's round trip but the misses themselves
        pending = self._request(layer, misses, hits)
        self._ahead()
        for e, _ in hits:
            yield e, self._full_weights((layer, e))
        # then the prefetched experts, which were on their way before the request went out
        redo = (yield from self._consume(layer, early, inputs)) if early else []
        # a re-planned split may have demoted an expert this layer used as a FULL hit: it is dropped now
        resp = self._answer(pending)
        tokens_of = dict(zip(experts, tokens))
        redo += yield from self._consume(layer, resp.deliveries, inputs, resp.deferred)
        while redo:  # a node failed: its experts now have other homes
            resp = self._answer(self._request(layer, [(e, tokens_of[e]) for e in redo], []))
            redo = yield from self._consume(layer, resp.deliveries, inputs, resp.deferred)
        self._event("layer_done", layer)

    def _request(self, layer, misses, hits):
        """Send ``layer``'s request, with the reports gathered since the last one; does not block."""
        self._send_steps()
        released, self._released = self._released, []
        used, self._used = self._used, []
        self.stats.requests += 1
        self._event("request", layer, len(misses))
        pending = self.transport.request(layer, misses, hits, released, used)
        self._unanswered.append(pending)
        return pending

    def _answer(self, pending):
        """The scheduler's answer to a request (blocks until it is there); its FULL drops applied."""
        self._unanswered = [p for p in self._unanswered if p is not pending]
        resp = self.transport.resolve(pending)
        self._event("response", resp.layer)
        self._drop(resp.drop_full)
        self._owed.update((resp.layer, d.expert) for d in resp.deliveries)
        return resp

    def _build(self, layer: int, d: Delivery, values: list) -> ExpertWeights:
        if len(values) == 1 and not d.parts:
            return self.builder.weights(layer, d.kind, values[0])
        if all(v is values[0] for v in values) and isinstance(values[0], np.ndarray):
            return self.builder.weights(layer, d.kind, values[0])  # decoded in place by every lane
        return self.builder.assemble(layer, d.kind, values)

    def _consume(self, layer: int, deliveries: list[Delivery], inputs=None, deferred=()):
        """Yield each delivered expert when ready; returns the experts to request again because their node
        failed (its computation errored or did not answer within ``node_timeout``).

        ``deferred`` ((expert, tokens) the staging could not take yet) are asked for again as soon as an
        expert is computed and released, with its release, rather than after the whole wave: the I/O lane
        reads the next one while the executor computes, instead of idling from a wave's last read to the
        next wave's request. At most one such request is on its way; its answer is taken once the next
        expert is computed (at once when nothing else is awaited), and its deliveries join those awaited."""
        w = _Awaited(deferred=list(deferred))
        redo: list[int] = []
        self._await(w, layer, deliveries, inputs, redo)
        while w.pending or w.refill is not None or w.deferred:
            if not w.pending:  # nothing else to compute: the deferred experts' answer is needed now
                if w.refill is None:
                    self._ask_deferred(w, layer)
                self._take_refill(w, layer, inputs, redo)
                continue
            t0 = time.perf_counter()
            ready = self.transport.wait_any(list(w.pending), timeout=self.node_timeout if w.remote else None)
            self.stats.wait_s += time.perf_counter() - t0
            if not ready:  # nothing arrived in node_timeout: ask the nodes still owing results if they live
                owed = {w.remote[h] for h in w.pending if h in w.remote}
                w.failed |= self.transport.unresponsive(owed, self.node_timeout)
            for h in ready:
                d = w.pending.pop(h)
                if h in w.remote:
                    try:
                        out = self.transport.get(h)
                    except Exception as e:  # the node's work may be lost: see is_node_failure
                        if self.transport.is_node_failure(e):
                            w.failed.add(w.remote[h])
                            redo.append(d.expert)
                            continue
                        raise
                    self._event("ready", layer, d.expert, (d.form, w.remote[h]))
                    self.stats.remote[w.remote[h]] = self.stats.remote.get(w.remote[h], 0) + 1
                    self._in_use[(layer, d.expert)] = out  # done() releases the node's staging
                    yield d.expert, out
                    self._released_one(w, layer, inputs, redo)
                    continue
                w.remaining[d.expert] -= 1
                if w.remaining[d.expert]:
                    continue  # other pieces of this expert are still being decoded
                values = [self.transport.get(x) for x in d.parts or [h]]  # raises before anything is used
                self._event("ready", layer, d.expert, d.form)
                weights = self._build(layer, d, values)
                key = (layer, d.expert)
                self.stats.fetched[d.form] = self.stats.fetched.get(d.form, 0) + 1
                if d.keep:
                    self.full[key] = weights
                self._in_use[key] = weights
                yield d.expert, weights
                self._released_one(w, layer, inputs, redo)
            if w.failed:
                for h in [h for h in w.pending if w.remote.get(h) in w.failed]:
                    redo.append(w.pending.pop(h).expert)
                for node in w.failed:
                    log.warning("node %s stopped answering; its experts move to the nodes left", node)
                    self.transport.node_failed(node)
                w.dead |= w.failed
                w.failed = set()
        return redo

    def _await(self, w: _Awaited, layer: int, deliveries: list[Delivery], inputs, redo: list[int]) -> None:
        """Add ``deliveries`` to what ``w`` awaits: their result handles, or, for an expert held on another
        node, its computation there (the hidden states go with it). An expert placed on a node found failed
        meanwhile (an answer given before the scheduler knew) goes to ``redo`` instead."""
        for d in deliveries:
            if d.node is None:
                handles = d.parts or [d.handle]
                w.remaining[d.expert] = len(handles)
                for h in handles:
                    w.pending[h] = d
                continue
            if d.node in w.dead or d.node in w.failed:
                redo.append(d.expert)
                continue
            if d.parts:  # remote nodes decode whole experts (remote_node_config): never pieces
                raise RuntimeError(f"expert {(layer, d.expert)} was delivered in pieces to node {d.node}")
            x, rows = inputs(d.expert)  # send the hidden states to the expert's node
            h = self.transport.compute(d.node, layer, d.expert, d.kind, x.cpu(), rows.cpu(), d.handle)
            w.pending[h], w.remaining[d.expert], w.remote[h] = d, 1, d.node

    def _released_one(self, w: _Awaited, layer: int, inputs, redo: list[int]) -> None:
        """An expert of the layer was computed and released: take the deferred experts' answer if one is on
        its way, then ask for those still deferred (the release rides along)."""
        if w.refill is not None:
            self._take_refill(w, layer, inputs, redo)
        if w.deferred and self._released:
            self._ask_deferred(w, layer)

    def _ask_deferred(self, w: _Awaited, layer: int) -> None:
        w.idle = not w.pending
        w.refill, w.deferred = self._request(layer, w.deferred, []), []
        self.stats.waves += 1

    def _take_refill(self, w: _Awaited, layer: int, inputs, redo: list[int]) -> None:
        resp, w.refill = self._answer(w.refill), None
        self._await(w, layer, resp.deliveries, inputs, redo)
        w.deferred = list(resp.deferred)
        if w.deferred and w.idle and not w.pending:  # asked with nothing in flight: asking again would loop
            raise RuntimeError(
                f"the scheduler deferred experts {[e for e, _ in w.deferred]} of layer {layer} with nothing "
                "of the layer in flight; this is a bug in zipmoe-ray, please report it"
            )

    def done(self, layer: int, expert: int) -> None:
        self._event("computed", layer, expert)
        key = (layer, expert)
        if self._in_use.pop(key, None) is not None:  # fetched by this layer: its staging can go
            self._give_back(key)

    def end_step(self, timing: tuple[float, int] | None = None) -> None:
        """One generation step is over: report FULL hits, used prefetches and released experts, and for a
        decode step its (seconds, rows); age popularity. The report goes out with the client's next message
        or batch of steps (:data:`STEP_BATCH`). Does not block."""
        self._event("step", -1)
        if self.trace is not None:
            from ..trace.recorded import TraceStep

            req, batch = self._trace_meta
            n = len(self.trace)
            kind = "prefill" if n == 0 else "decode"
            self.trace.append(TraceStep(req, n, kind, batch, self._trace_step, self._trace_pred))
            self._trace_step, self._trace_pred = {}, {}
        hits, self._hit_notes = self._hit_notes, []
        released, self._released = self._released, []
        used, self._used = self._used, []
        self._steps.append((hits, released, used, timing))
        if len(self._steps) >= STEP_BATCH:
            self._send_steps()

    def _send_steps(self) -> None:
        """Send the step reports waiting, in one message; does not block."""
        if self._steps:
            reports, self._steps = self._steps, []
            self.transport.steps(reports)

    def finish(self) -> None:
        """The generation is over: release what was prefetched for layers it did not reach and, when it
        failed inside a layer, every expert delivered to it and not yet released (in use, arrived or still
        on its way: a result that lands later is dropped with its handle). Does not block but for answers
        still on their way (prefetches, and requests whose answers the failed layer did not take), and with
        lanes in the executor for the scheduler's last answers (backends/colocated.py)."""
        self._guess = None
        self._shadow.clear()
        try:
            self._send_steps()
        except Exception as e:  # never hides the generation's own error, nor stops the releases below
            log.warning("the generation's last step reports could not be sent: %s", e)
        for layer in list(self._prefetch):
            self._arrived(layer)
        for layer in {k[0] for k in self._prefetched}:
            self._unused(layer)
        # a request whose answer was never taken (the generation failed while computing the layer's hits,
        # or an expert with a request for the layer's deferred experts on its way): its experts are owed too
        while self._unanswered:
            try:
                self._answer(self._unanswered[0])  # taken off the list before it is resolved
            except Exception as e:  # never hides the generation's own error
                log.warning("a request's answer could not be taken: %s", e)
        self._in_use.clear()
        for key in sorted(self._owed):
            self._give_back(key)
        if self._released or self._used:
            released, self._released = self._released, []
            used, self._used = self._used, []
            self.transport.release(released, used)
        settle = getattr(self.transport, "settle", None)
        if settle is not None:
            try:
                settle()
            except Exception as e:  # never hides the generation's own error; the next request meets it
                log.warning("the scheduler's last answers could not be applied: %s", e)

    def report(self) -> dict:
        s = self.stats
        return {
            "full_hits": s.full_hits,
            "fetched_by_form": dict(s.fetched),
            "requests": s.requests,
            "waves": s.waves,
            "executor_wait_s": s.wait_s,
            "remote_computes": dict(s.remote),
            "full_experts_held": len(self.full) + len(self._full_pending),
            "prefetch": {
                "predicted": s.predicted,
                "used": s.prefetch_used,
                "wasted": s.prefetch_wasted,
                "recall": s.prefetch_used / s.needed if s.needed else None,  # of the fetches a layer needed
                "gated": s.gated,
                "running_precision": self.gate.precision,
            }
            if self.prefetching
            else None,
        }

    def reset_stats(self) -> None:
        self.stats = ClientStats()
