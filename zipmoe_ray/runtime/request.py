"""What one generation asks for, checked before anything runs: the number of new tokens and the sampling
settings. The CLI calls this before it starts an engine; the engine again for every request."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["GenerationOutput", "check_sampling"]


@dataclass
class GenerationOutput:
    """What ``ZipMoEEngine.generate`` returns for one prompt."""

    token_ids: list[int]  # generated ids only
    text: str
    logits: Any = None  # [steps, vocab] float32 when output_logits=True


_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.manual_seed accepts


def _number(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def check_sampling(
    max_new_tokens,
    *,
    do_sample: bool = False,
    seed=None,
    temperature=None,
    top_p=None,
    top_k=None,
) -> None:
    """Raise ConfigError naming the setting (as its flag) that is out of range; None means "the model's
    default". ``max_new_tokens`` >= 1; ``temperature`` > 0; ``top_p`` in (0, 1]; ``top_k`` >= 0 (0: off);
    ``seed`` an integer torch accepts."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise ConfigError(f"do_sample must be True or False, got {do_sample!r}")
    if temperature is not None and _number(temperature, "--temperature") <= 0:
        raise ConfigError(
            f"--temperature must be greater than 0, got {temperature!r} (for greedy decoding leave out "
            "--do-sample instead)"
        )
    if top_p is not None and not 0 < _number(top_p, "--top-p") <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ConfigError(f"--top-k must be a non-negative integer (0: no top-k), got {top_k!r}")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not _SEED_MIN <= seed <= _SEED_MAX
    ):
        raise ConfigError(f"--seed must be an integer in [{_SEED_MIN}, {_SEED_MAX}], got {seed!r}")
