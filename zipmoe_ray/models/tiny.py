"""Seeded random-initialised checkpoints for tests, demos and benchmarks (nothing is downloaded).

Presets: ``tiny`` (seconds to build; the default for tests) and the real per-layer shapes of the models
zipmoe-ray targets (DESIGN.md section 5), to be cut down with ``layers``. The trained preset
``smollm2-moe`` is not random: it is built by :mod:`zipmoe_ray.models.upcycle`. Weights are drawn by
the model's own initialiser (normal, std 0.02: realistic exponent statistics) and saved as BF16
safetensors by ``save_pretrained``, i.e. per-expert tensors on disk as on the Hub; ``fused=True`` saves
transformers 5's fused 3D expert tensors instead.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .hf import quiet_transformers
from .presets import SMOLLM2_MOE, preset_config
from .registry import get_arch
from .tokenizer import build_tokenizer

__all__ = ["build_tiny_model"]

log = logging.getLogger(__name__)


def build_tiny_model(
    out_dir: str | os.PathLike,
    arch: str | None = None,
    *,
    preset: str = "tiny",
    layers: int | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
    fused: bool = False,
    max_shard_size: str | None = None,
) -> Path:
    """Write a seeded random-initialised BF16 checkpoint (config, safetensors, tokenizer) to ``out_dir``.

    Deterministic for a given (arch, preset, layers, seed, vocab_size) on a given torch build. Blocks;
    returns the directory. ``max_shard_size`` (e.g. "2MB") writes a sharded checkpoint with an index.
    ``preset="smollm2-moe"`` builds the upcycled trained model instead (``layers`` and ``seed`` apply; see
    zipmoe_ray.models.upcycle; raises CheckpointError when its package is missing).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig

    if preset == SMOLLM2_MOE:
        return _build_smollm2_moe(out_dir, arch, layers, seed, vocab_size, fused, max_shard_size)
    config = preset_config(arch, preset, layers=layers, vocab_size=vocab_size)
    spec = get_arch(config.model_type)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if spec.family == "seq2seq" else AutoModelForCausalLM
    with quiet_transformers():
        model = auto.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(
        pad_token_id=0, eos_token_id=1, **({"decoder_start_token_id": 0} if spec.family == "seq2seq" else {})
    )
    if fused:
        from safetensors.torch import save_file

        model.config.save_pretrained(out)
        model.generation_config.save_pretrained(out)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
        with quiet_transformers():
            model.save_pretrained(out, **kw)
    build_tokenizer(out, min(config.vocab_size, 4096))
    (out / "zipmoe-model-card.json").write_text(
        json.dumps(
            {
                "preset": preset,
                "arch": config.model_type,
                "layers": layers,
                "seed": seed,
                "fused": fused,
                "note": "random-initialised by zipmoe tiny-model; not a trained model",
            },
            indent=2,
        )
    )
    return out


def _build_smollm2_moe(out_dir, arch, layers, seed, vocab_size, fused, max_shard_size) -> Path:
    from ..errors import ConfigError
    from .upcycle import UpcycleConfig, build_smollm2_moe

    if arch not in (None, "mixtral"):
        raise ConfigError(f"preset {SMOLLM2_MOE} is a mixtral model; drop --arch or pass --arch mixtral")
    for flag, value in (
        ("--vocab-size", vocab_size),
        ("--fused", fused),
        ("--max-shard-size", max_shard_size),
    ):
        if value:
            raise ConfigError(f"preset {SMOLLM2_MOE} keeps the trained model's own layout: drop {flag}")
    return build_smollm2_moe(out_dir, UpcycleConfig(layers=layers, seed=seed))
