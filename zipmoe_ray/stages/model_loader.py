"""Building the executor's model from a store: every non-expert weight resident, no routed-expert memory.

The store holds the non-expert weights as a transformers ``variant`` (``model.zipmoe-dense.safetensors``),
so ``from_pretrained`` loads them with all of transformers' own renaming, tying and buffer initialisation,
exactly as the reference does. The routed-expert parameters it finds missing are allocated uninitialised
(``no_init_weights``: untouched pages cost no memory) and replaced by empty tensors before the model moves
to its device; each MoE layer's experts then read their weights through the ExpertSource.
"""

from __future__ import annotations

import itertools
import logging

import torch

from ..errors import ConfigError, StoreError
from ..models.experts_impl import EXPERTS_IMPLEMENTATION, ExpertSource, NextRouter, SwitchExperts, register
from ..models.hf import quiet_transformers
from ..models.registry import get_arch
from ..store import Store

__all__ = ["load_model"]

log = logging.getLogger(__name__)


def load_model(store: Store, source: ExpertSource, *, device: str = "cpu", dtype: str | torch.dtype = "auto"):
    """Load the store's model with experts served by ``source``; returns (model, {layer: experts module}).

    The non-expert weights are checked against the index tensor by tensor first (nothing damaged is ever
    loaded). Raises ChecksumError naming the file and tensor of damaged weights, StoreError when the
    model's MoE layers do not match the store's."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.initialization import no_init_weights

    store.check_dense()
    register()
    spec = get_arch(store.model_type)
    auto = AutoModelForSeq2SeqLM if spec.family == "seq2seq" else AutoModelForCausalLM
    kwargs = {"variant": store.dense_variant, "dtype": dtype}
    if spec.family == "causal":
        kwargs["experts_implementation"] = EXPERTS_IMPLEMENTATION
    with quiet_transformers(), no_init_weights():
        model = auto.from_pretrained(str(store.path), **kwargs)
    config = store.config()
    modules: dict[int, torch.nn.Module] = {}
    for name, module in list(model.named_modules()):
        if spec.family == "causal" and hasattr(module, "has_gate") and hasattr(module, "down_proj"):
            layer = spec.layer_of(name + ".", config)
            empty = torch.empty(0, dtype=module.down_proj.dtype)
            for pname in ("gate_up_proj", "up_proj", "down_proj"):
                if isinstance(getattr(module, pname, None), torch.nn.Parameter):
                    setattr(module, pname, torch.nn.Parameter(empty.clone(), requires_grad=False))
            module._zipmoe_layer = layer
            module._zipmoe_source = source
            modules[layer] = module
        elif spec.family == "seq2seq" and type(module).__name__ == "SwitchTransformersSparseMLP":
            layer = spec.layer_of(name + ".", config)
            act = module.experts["expert_0"].act
            module.experts = SwitchExperts(layer, module.router.num_experts, act, source)
            modules[layer] = module.experts
    if spec.family == "causal":  # each MoE layer predicts the next one's experts (ExpertClient.predict)
        routers = {
            spec.layer_of(name + ".", config): m
            for name, m in model.named_modules()
            if name.endswith(".gate") and type(m).__name__.endswith("Router") and hasattr(m, "top_k")
        }
        order = sorted(modules)
        for a, b in itertools.pairwise(order):
            if b in routers:
                modules[a]._zipmoe_next = NextRouter(routers[b], b)
    if sorted(modules) != store.layers():
        raise StoreError(
            f"{store.path}: the model has MoE layers {sorted(modules)} but the store holds layers {store.layers()}; "
            "the store and its config.json do not belong together"
        )
    model.eval()
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"cannot move the model to device {device!r}: {e}") from None
    return model, modules
