"""Entropy statistics of exponent fields and the Shannon bound on the stored ratio."""

from __future__ import annotations

import numpy as np
import torch

from .planes import PlaneLayout, layout_for

__all__ = ["bound_ratio", "entropy_bits", "exponent_histogram"]


def exponent_histogram(tensor: torch.Tensor) -> np.ndarray:
    """Counts of each biased exponent value (int64[256]) over all elements of ``tensor``."""
    layout = layout_for(tensor.dtype)
    t = tensor.detach().cpu().contiguous()
    return np.bincount(layout.exponent_field(layout.words(t)), minlength=256).astype(np.int64)


def entropy_bits(hist: np.ndarray) -> float:
    """Order-0 Shannon entropy in bits per symbol of a histogram (0.0 when empty)."""
    total = int(hist.sum())
    if total == 0:
        return 0.0
    p = hist[hist > 0].astype(np.float64) / total
    return float(-(p * np.log2(p)).sum())


def bound_ratio(layout: PlaneLayout | str, entropy: float) -> float:
    """The paper's bound on stored/original bytes: (1 + mantissa bits + H) / bits."""
    lay = layout_for(layout) if isinstance(layout, str) else layout
    return (1 + lay.mantissa_bits + entropy) / lay.bits
