"""The zipmoe experts implementation: routed experts computed from weights fetched through the cache.

Seams (no monkey-patching):
* decoder-only MoE models (qwen2_moe, qwen3_moe, olmoe, mixtral, deepseek_v2) declare their experts class
  with transformers' ``@use_experts_implementation``; we register ``"zipmoe"`` in
  ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` and load the model with
  ``experts_implementation="zipmoe"``;
* switch_transformers keeps its experts in a ``SwitchTransformersExperts`` ModuleDict with no such
  registry, so the executor replaces that child module of each sparse MLP with :class:`SwitchExperts`, a
  module with the same forward signature (the cleanest supported seam: ordinary module composition).

Bit-exactness. Both mirror the computation transformers would run by default, operation by operation:
* ``grouped_mm`` (the default experts implementation in transformers 5): tokens sorted by expert
  (``torch.sort``), one matmul per expert group (``grouped_mm`` computes each group as that matmul),
  ``self._apply_gate`` and the down projection on that group's rows (row-wise ops, so per group equals
  whole-tensor), routing weights applied, original order restored, top-k summed per token;
* switch: per expert in ascending order, ``F.linear`` -> activation -> ``F.linear`` times the router
  probability, accumulated with ``index_add_`` in ascending expert order.
Experts are computed in the order they arrive (compute overlaps the remaining fetches); only the final
combination has a fixed order, and it is the reference's. tests/test_bit_exact.py checks token ids and
every step's logits against plain transformers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "ExpertSource",
    "ExpertWeights",
    "NextRouter",
    "SwitchExperts",
    "register",
]

EXPERTS_IMPLEMENTATION = "zipmoe"


@dataclass
class ExpertWeights:
    """One expert's weights as views of one buffer: ``first`` is gate_up [2I, H] (or Switch's wi [F, H]),
    ``second`` is down [H, I] (or wo [H, F])."""

    first: torch.Tensor
    second: torch.Tensor


def chunk_gate(act):
    """transformers' default gate (``_default_apply_gate``): the gate half activated, times the up half."""

    def gate(gate_up: torch.Tensor) -> torch.Tensor:
        g, up = gate_up.chunk(2, dim=-1)
        return act(g) * up

    return gate


def gated_rows(
    x: torch.Tensor, w: ExpertWeights, routing: torch.Tensor, gate, post_norm=None
) -> torch.Tensor:
    """A gated expert on its group of rows ``x``, weighted by ``routing`` [n]: what ``grouped_mm`` computes
    for one group (the executor's and the ExpertHost's arithmetic, operation for operation)."""
    proj = torch.mm(x.to(w.first.dtype), w.first.t())
    proj = gate(proj)
    proj = torch.mm(proj.to(w.second.dtype), w.second.t())
    if post_norm is not None:
        proj = post_norm(proj)
    return proj * routing.unsqueeze(-1)


def switch_rows(x: torch.Tensor, w: ExpertWeights, routing: torch.Tensor, act) -> torch.Tensor:
    """A Switch Transformers expert on rows ``x``, weighted by the router probability ``routing`` [n]."""
    h = act(F.linear(x, w.first))
    if h.dtype != w.second.dtype and w.second.dtype != torch.int8:
        h = h.to(w.second.dtype)
    return F.linear(h, w.second) * routing[:, None]


def _computable_elsewhere(module) -> bool:
    """Whether an ExpertHost (which knows only the model's activation) computes this experts module's
    arithmetic: the default chunk gate (or none, for Switch) and no norm after the expert."""
    if getattr(module, "has_post_expert_norm", False):
        return False
    if not getattr(module, "has_gate", False):
        return not hasattr(module, "has_gate")  # Switch: no gate flag at all
    from transformers.integrations import moe

    default = getattr(moe, "_default_apply_gate", None)
    return default is not None and getattr(type(module), "_apply_gate", None) is default


class ExpertSource(Protocol):
    """What a MoE layer asks for its active experts (the executor's ExpertClient)."""

    def fetch(
        self, layer: int, experts: list[int], tokens: list[int], inputs=None
    ) -> Iterator[tuple[int, ExpertWeights | torch.Tensor]]:
        """Yield ``(expert, weights)`` for every requested expert, each as soon as it is usable, or
        ``(expert, output_rows)`` when another device computed the expert on ``inputs(expert)`` (its input
        rows and routing weights): the hidden states travel to the expert instead of the reverse."""
        ...

    def done(self, layer: int, expert: int) -> None:
        """The layer finished computing with ``expert``: its transient buffers may be released."""
        ...

    def wants_prediction(self, layer: int) -> bool:
        """Whether a prediction of MoE layer ``layer``'s experts is worth computing now."""
        ...

    def predict(self, layer: int, experts: list[int], tokens: list[int]) -> None:
        """MoE layer ``layer`` is predicted to route to ``experts``: worth fetching ahead (no effect on any
        result)."""
        ...


class NextRouter:
    """Predicts the next MoE layer's experts: that layer's own router applied to this layer's MoE input
    (the residual stream changes little in one layer). Pure: computes only a prediction."""

    def __init__(self, router: torch.nn.Module, layer: int):
        self.router = router
        self.layer = layer

    def __call__(self, source: ExpertSource, hidden_states: torch.Tensor) -> None:
        if not source.wants_prediction(self.layer):  # prefetch off, or this layer's fetch already on its way
            return
        _, _, index = self.router(hidden_states)  # every TopKRouter returns (logits, weights, indices)
        experts, counts = torch.unique(index.reshape(-1), return_counts=True)
        source.predict(self.layer, experts.tolist(), counts.tolist())


def zipmoe_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    source: ExpertSource = self._zipmoe_source
    layer: int = self._zipmoe_layer
    nxt = getattr(self, "_zipmoe_next", None)
    if nxt is not None:  # ask for the next layer's experts before computing this one's
        nxt(source, hidden_states)
    if getattr(self, "has_bias", False):
        raise NotImplementedError("zipmoe does not serve experts with biases")
    num_top_k = top_k_index.size(-1)
    num_tokens = hidden_states.size(0)
    hidden_dim = hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)  # [S]
    expert_ids = top_k_index.reshape(-1)  # [S]
    expert_ids_g, perm = torch.sort(expert_ids)
    selected_g = hidden_states[perm // num_top_k]  # [S, hidden]
    sample_weights_g = sample_weights[perm]  # [S]
    ids = expert_ids_g.tolist()
    groups: dict[int, tuple[int, int]] = {}
    for pos, e in enumerate(ids):
        a, _ = groups.get(e, (pos, pos))
        groups[e] = (a, pos + 1)
    active = sorted(groups)
    weighted_out = None  # [S, hidden], rows in sorted order

    def inputs(e: int):
        a, b = groups[e]
        return selected_g[a:b], sample_weights_g[a:b]

    for e, w in source.fetch(layer, active, [groups[e][1] - groups[e][0] for e in active], inputs):
        a, b = groups[e]
        if isinstance(w, torch.Tensor):  # computed where the expert is held (see ExpertHost)
            if not _computable_elsewhere(self):
                raise NotImplementedError(
                    f"{type(self).__name__} has its own gate or a post-expert norm, which an ExpertHost does "
                    "not compute: serve this model on one node"
                )
            out = w.to(hidden_states.device)
        else:
            out = gated_rows(
                selected_g[a:b],
                w,
                sample_weights_g[a:b],
                self._apply_gate if self.has_gate else self.act_fn,
                self.post_expert_norm if self.has_post_expert_norm else None,
            )
        if weighted_out is None:
            weighted_out = torch.empty(len(ids), hidden_dim, dtype=out.dtype, device=out.device)
        weighted_out[a:b] = out
        source.done(layer, e)
    if weighted_out is None:
        return torch.zeros_like(hidden_states)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    weighted_out = weighted_out[inv_perm]
    return weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


class SwitchExperts(torch.nn.Module):
    """Drop-in for ``SwitchTransformersExperts`` (same forward signature) fetching weights from a source."""

    def __init__(self, layer: int, num_experts: int, act: torch.nn.Module, source: ExpertSource):
        super().__init__()
        self.num_experts = num_experts
        self.act = act
        self._zipmoe_layer = layer
        self._zipmoe_source = source

    def forward(
        self, hidden_states: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        expert_mask = selected_experts.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        rows = {}
        for idx in expert_hit:
            e = int(idx[0])
            pos, top_x = torch.where(expert_mask[idx].squeeze(0))
            rows[e] = (pos, top_x)
        active = sorted(rows)
        outs = {}

        def inputs(e: int):
            pos, top_x = rows[e]
            return hidden_states[None, top_x].reshape(-1, hidden_states.shape[-1]), routing_weights[
                top_x, pos
            ]

        for e, w in self._zipmoe_source.fetch(
            self._zipmoe_layer, active, [len(rows[e][1]) for e in active], inputs
        ):
            pos, top_x = rows[e]
            if isinstance(w, torch.Tensor):  # computed where the expert is held (see ExpertHost)
                outs[e] = w.to(hidden_states.device)
                self._zipmoe_source.done(self._zipmoe_layer, e)
                continue
            x = hidden_states[None, top_x].reshape(-1, hidden_states.shape[-1])
            outs[e] = switch_rows(x, w, routing_weights[top_x, pos], self.act)
            self._zipmoe_source.done(self._zipmoe_layer, e)
        for e in active:  # the reference's accumulation order
            final.index_add_(0, rows[e][1], outs[e].to(hidden_states.dtype))
        return final


_registered = False


def register() -> None:
    """Register the ``zipmoe`` experts implementation with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, zipmoe_experts_forward)
    _registered = True
