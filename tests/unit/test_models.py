"""Tiny-model factory, presets and the architecture registry."""

from __future__ import annotations

import hashlib

import pytest
import torch

from zipmoe_ray.errors import ArchitectureError, ConfigError
from zipmoe_ray.models.presets import PRESETS, preset_config
from zipmoe_ray.models.registry import get_arch
from zipmoe_ray.models.tiny import build_tiny_model

from ..conftest import ARCHS


def digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_bits_other_seed_other_bits(tmp_path):
    a = build_tiny_model(tmp_path / "a", "olmoe", seed=7)
    b = build_tiny_model(tmp_path / "b", "olmoe", seed=7)
    c = build_tiny_model(tmp_path / "c", "olmoe", seed=8)
    assert digest(a) == digest(b) != digest(c)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_load_and_generate_offline(tiny_models, arch):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = tiny_models[arch]
    tok = AutoTokenizer.from_pretrained(path)
    family = get_arch(arch).family
    auto = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = tok("The robot asked whether anyone needed help.", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[-1] >= 2
    assert isinstance(tok.decode(out[0]), str)
    # routers are initialised (not all-zero), so routing is not a tie broken by expert order
    routers = [
        p for n, p in model.named_parameters() if n.endswith(("gate.weight", "router.classifier.weight"))
    ]
    assert routers and all(p.abs().sum() > 0 for p in routers)


@pytest.mark.parametrize(
    "preset, expert_mb",
    [
        ("qwen1.5-moe", 17.3),
        ("deepseek-v2-lite", 17.3),
        ("olmoe", 12.6),
        ("qwen3-moe", 9.4),
        ("mixtral", 352.3),
    ],
)
def test_presets_have_the_real_expert_shapes(preset, expert_mb):
    cfg = preset_config(None, preset, layers=2)
    h = cfg.hidden_size
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    assert 3 * h * inter * 2 / 1e6 == pytest.approx(expert_mb, abs=0.1)


def test_switch_preset_shape():
    cfg = preset_config(None, "switch-large-128", layers=4)
    assert (cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.num_layers, cfg.num_sparse_encoder_layers) == (
        1024, 4096, 128, 4, 2,
    )  # fmt: skip


def test_layers_counts_moe_layers_and_keeps_dense_ones():
    cfg = preset_config(None, "deepseek-v2-lite", layers=3)
    assert cfg.num_hidden_layers == 4 and cfg.first_k_dense_replace == 1
    assert set(PRESETS) >= {
        "qwen1.5-moe",
        "deepseek-v2-lite",
        "olmoe",
        "qwen3-moe",
        "mixtral",
        "switch-large-128",
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arch": None, "preset": "tiny"}, "needs --arch"),
        ({"arch": "olmoe", "preset": "nope"}, "unknown preset"),
        ({"arch": "olmoe", "preset": "tiny", "layers": 0}, "at least 1"),
        ({"arch": "olmoe", "preset": "tiny", "vocab_size": 10}, "vocab-size"),
    ],
)
def test_bad_factory_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        preset_config(kwargs.pop("arch"), **kwargs)


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(ArchitectureError, match="qwen2_moe"):
        get_arch("gpt2")


def test_registry_recognises_expert_names():
    q = get_arch("qwen2_moe")
    cfg = {"num_experts": 60}
    hit = q.classify("model.layers.12.mlp.experts.59.down_proj.weight", cfg)
    assert (hit.layer, hit.expert, hit.role) == (12, 59, "down")
    assert q.classify("model.layers.12.mlp.shared_expert.down_proj.weight", cfg) is None
    assert q.classify("model.layers.12.mlp.experts.gate_up_proj", cfg).expert is None
    d = get_arch("deepseek_v2")
    assert d.classify("model.layers.3.mlp.shared_experts.up_proj.weight", {}) is None
    m = get_arch("mixtral")
    assert m.classify("model.layers.0.block_sparse_moe.experts.1.w3.weight", {}).role == "up"
    s = get_arch("switch_transformers")
    hit = s.classify("decoder.block.3.layer.2.mlp.experts.expert_7.wo.weight", {"num_layers": 24})
    assert (hit.layer, hit.expert, hit.role) == (27, 7, "wo")
    with pytest.raises(ArchitectureError, match="unexpected name"):
        q.classify("model.layers.1.mlp.experts.3.weird.weight", cfg)


def test_expert_host_arithmetic_is_refused_where_it_differs():
    """An ExpertHost computes the default chunk gate only: a model with its own gate, no gate, or a norm after
    the expert must be refused remote results, not combined with wrong ones."""
    import torch
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    from zipmoe_ray.models.experts_impl import ExpertWeights, _computable_elsewhere, chunk_gate, gated_rows

    def module(cls, **flags):
        m = object.__new__(cls)
        m.__dict__.update({"has_gate": True, "has_post_expert_norm": False, **flags})
        return m

    class OwnGate(Qwen2MoeExperts):
        def _apply_gate(self, gate_up):
            return gate_up[..., : gate_up.shape[-1] // 2]

    assert _computable_elsewhere(module(Qwen2MoeExperts))
    assert not _computable_elsewhere(module(OwnGate))
    assert not _computable_elsewhere(module(Qwen2MoeExperts, has_gate=False))
    assert not _computable_elsewhere(module(Qwen2MoeExperts, has_post_expert_norm=True))
    # and the shared gate is transformers' default, bit for bit
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g, dtype=torch.bfloat16)
    w = ExpertWeights(torch.randn(12, 8, generator=g, dtype=torch.bfloat16),
                      torch.randn(8, 6, generator=g, dtype=torch.bfloat16))  # fmt: skip
    r = torch.rand(5, generator=g, dtype=torch.bfloat16)
    m = module(Qwen2MoeExperts, act_fn=torch.nn.functional.silu)
    assert torch.equal(
        gated_rows(x, w, r, chunk_gate(torch.nn.functional.silu)), gated_rows(x, w, r, m._apply_gate)
    )
