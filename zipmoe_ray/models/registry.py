"""Supported architectures: how their routed-expert tensors are named on disk and what the runtime needs.

A checkpoint stores routed experts either per expert (``...experts.7.gate_proj.weight``, what
``save_pretrained`` writes and what the Hub holds) or fused as 3D tensors (``...experts.gate_up_proj``
of shape [E, 2I, H], transformers 5's in-memory layout). Both are recognised here. Shared experts and
dense MLPs are not routed experts and stay with the non-expert weights.

Within an expert, tensors are kept in a canonical role order chosen so that the runtime's fused
``gate_up_proj`` is the first two tensors back to back: decoding an expert into one contiguous buffer
gives ``gate_up = buf[: 2*I*H].view(2*I, H)`` without a copy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ArchitectureError

__all__ = ["ARCHITECTURES", "ArchSpec", "ExpertTensorName", "get_arch", "supported_architectures"]

_PER_EXPERT = re.compile(r"^(?P<module>.+)\.experts\.(?:expert_)?(?P<expert>\d+)\.(?P<leaf>.+)$")
_FUSED = re.compile(r"^(?P<module>.+)\.experts\.(?P<leaf>[A-Za-z_]+)$")
_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(?P<n>\d+)\.")
_SWITCH_BLOCK = re.compile(r"^(?:[\w.]*\.)?(?P<stack>encoder|decoder)\.block\.(?P<n>\d+)\.")

GATED_ROLES = ("gate", "up", "down")
FUSED_ROLES = ("gate_up", "down")
SWITCH_ROLES = ("wi", "wo")


@dataclass(frozen=True)
class ExpertTensorName:
    """A checkpoint tensor recognised as (part of) a routed expert."""

    name: str  # the checkpoint tensor name
    module: str  # the MoE block's module path in the checkpoint, e.g. model.layers.3.mlp
    layer: int
    role: str
    expert: int | None  # None for fused 3D tensors, which hold every expert of the layer


@dataclass(frozen=True)
class ArchSpec:
    """What zipmoe needs to know about one ``model_type``."""

    model_type: str
    family: str  # "causal" or "seq2seq"
    leaf_roles: dict[str, str]  # per-expert leaf name -> role
    fused_roles: dict[str, str] = field(
        default_factory=lambda: {"gate_up_proj": "gate_up", "down_proj": "down"}
    )
    num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")
    top_k_key: str | None = "num_experts_per_tok"
    layer_of: Callable[[str, dict[str, Any]], int | None] = None  # type: ignore[assignment]

    def num_experts(self, config: dict[str, Any]) -> int:
        for key in self.num_experts_keys:
            if config.get(key) is not None:
                return int(config[key])
        raise ArchitectureError(
            f"{self.model_type}: config.json names no expert count (looked for {', '.join(self.num_experts_keys)})"
        )

    def top_k(self, config: dict[str, Any]) -> int:
        return 1 if self.top_k_key is None else int(config[self.top_k_key])

    def role_order(self, roles: set[str]) -> tuple[str, ...]:
        """The canonical order of an expert's tensors, given the roles present."""
        for order in (GATED_ROLES, FUSED_ROLES, SWITCH_ROLES):
            if roles == set(order):
                return order
        raise ArchitectureError(
            f"{self.model_type}: an expert has tensors {sorted(roles)}, expected one of "
            f"{list(GATED_ROLES)}, {list(FUSED_ROLES)} or {list(SWITCH_ROLES)}"
        )

    def classify(self, name: str, config: dict[str, Any]) -> ExpertTensorName | None:
        """Recognise a routed-expert tensor name; None for every other tensor."""
        m = _PER_EXPERT.match(name)
        if m:
            role = self.leaf_roles.get(m["leaf"])
            if role is None:
                raise ArchitectureError(
                    f"{self.model_type}: expert tensor {name!r} has an unexpected name ({m['leaf']!r}); "
                    f"expected one of {sorted(self.leaf_roles)}"
                )
            return ExpertTensorName(
                name, m["module"], self._layer(m["module"], name, config), role, int(m["expert"])
            )
        m = _FUSED.match(name)
        if m and m["leaf"] in self.fused_roles:
            return ExpertTensorName(
                name, m["module"], self._layer(m["module"], name, config), self.fused_roles[m["leaf"]], None
            )
        return None

    def _layer(self, module: str, name: str, config: dict[str, Any]) -> int:
        layer = self.layer_of(module + ".", config)
        if layer is None:
            raise ArchitectureError(
                f"{self.model_type}: cannot tell which layer expert tensor {name!r} belongs to"
            )
        return layer


def _decoder_layer(module: str, config: dict[str, Any]) -> int | None:
    m = _DECODER_LAYER.search(module)
    return int(m["n"]) if m else None


def _switch_layer(module: str, config: dict[str, Any]) -> int | None:
    """Encoder blocks keep their number; decoder block j becomes num_layers + j (unique ids)."""
    m = _SWITCH_BLOCK.search(module)
    if not m:
        return None
    n = int(m["n"])
    return n if m["stack"] == "encoder" else int(config.get("num_layers", 0)) + n


_GATED = {"gate_proj.weight": "gate", "up_proj.weight": "up", "down_proj.weight": "down"}

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("qwen2_moe", "causal", _GATED, layer_of=_decoder_layer),
        ArchSpec("qwen3_moe", "causal", _GATED, layer_of=_decoder_layer),
        ArchSpec("olmoe", "causal", _GATED, layer_of=_decoder_layer),
        ArchSpec(
            "deepseek_v2", "causal", _GATED, num_experts_keys=("n_routed_experts",), layer_of=_decoder_layer
        ),
        ArchSpec(
            "mixtral",
            "causal",
            {"w1.weight": "gate", "w3.weight": "up", "w2.weight": "down"},
            num_experts_keys=("num_local_experts",),
            layer_of=_decoder_layer,
        ),
        ArchSpec(
            "switch_transformers",
            "seq2seq",
            {"wi.weight": "wi", "wo.weight": "wo"},
            fused_roles={},
            top_k_key=None,
            layer_of=_switch_layer,
        ),
    )
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def get_arch(model_type: str | None) -> ArchSpec:
    """The spec of ``model_type``; raises ArchitectureError naming the supported ones."""
    spec = ARCHITECTURES.get(model_type or "")
    if spec is None:
        raise ArchitectureError(
            f"architecture {model_type!r} is not supported; zipmoe-ray supports the MoE model types "
            f"{', '.join(supported_architectures())}"
        )
    return spec
