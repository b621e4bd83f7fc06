"""Turning decoded expert bytes into the weights a MoE layer computes with (the executor's side).

An expert arrives as one flat buffer (unsigned words, gate, up and down back to back: the fused gate_up
projection is then a view), as planes to recombine on the accelerator, as the raw bytes of an uncompressed
store, or in pieces decoded by several lanes. No bytes are copied on a CPU executor but for pieces that
arrive as separate objects.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..codec import layout_for
from ..models.experts_impl import ExpertWeights

__all__ = ["WeightBuilder"]


@dataclass
class _LayerShape:
    shapes: list[tuple[int, ...]]
    roles: list[str]
    numel: int
    split: int  # elements of the first weight (gate_up or wi)


class WeightBuilder:
    """Builds ExpertWeights for the experts of ``store`` on ``device``."""

    def __init__(self, store, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        dtypes = {t.dtype for r in store.index.experts for t in r.tensors}
        self.layout = layout_for(dtypes.pop())
        self.shapes: dict[int, _LayerShape] = {}
        for r in store.index.experts:
            if r.layer in self.shapes:
                continue
            shapes = [t.shape for t in r.tensors]
            roles = [t.role for t in r.tensors]
            split = sum(t.numel for t in r.tensors[:-1])
            self.shapes[r.layer] = _LayerShape(shapes, roles, r.numel, split)

    def weights(self, layer: int, kind: str, value: np.ndarray) -> ExpertWeights:
        shape = self.shapes[layer]
        with warnings.catch_warnings():  # object-store arrays are read-only; the weights are only read
            warnings.simplefilter("ignore", UserWarning)
            if kind == "planes":
                n = shape.numel
                exp = torch.from_numpy(value[:n]).to(self.device)
                raw = torch.from_numpy(value[n:]).to(self.device)
                flat = torch.empty(n, dtype=self.layout.torch_dtype, device=self.device)
                pos = rpos = 0
                for s in shape.shapes:
                    k = int(np.prod(s))
                    r = k * self.layout.raw_width
                    flat[pos : pos + k] = self.layout.merge_torch(exp[pos : pos + k], raw[rpos : rpos + r])
                    pos, rpos = pos + k, rpos + r
            else:
                words = np.asarray(value)
                if kind == "raw":
                    words = words[: shape.numel * self.layout.itemsize].view(self.layout.word)
                signed = {2: torch.int16, 4: torch.int32}[self.layout.itemsize]
                flat = torch.from_numpy(words.view(np.dtype(f"i{self.layout.itemsize}"))).view(signed)
                flat = flat.view(self.layout.torch_dtype)
                if self.device.type != "cpu":
                    flat = flat.to(self.device, non_blocking=False)
        first_shape, second_shape = self._fused_shapes(shape)
        return ExpertWeights(flat[: shape.split].view(first_shape), flat[shape.split :].view(second_shape))

    @staticmethod
    def _fused_shapes(shape: _LayerShape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if shape.roles == ["gate", "up", "down"]:
            g = shape.shapes[0]
            return (2 * g[0], *g[1:]), shape.shapes[2]
        return shape.shapes[0], shape.shapes[1]

    def assemble(self, layer: int, kind: str, pieces: list[list[tuple]]) -> ExpertWeights:
        """One expert's weights from the pieces decoded by several lanes (see Decompressor.decode): each
        piece is copied into place (on an accelerator, that copy is the transfer)."""
        shape = self.shapes[layer]
        flat = torch.empty(shape.numel, dtype=self.layout.torch_dtype, device=self.device)
        signed = {2: torch.int16, 4: torch.int32}[self.layout.itemsize]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for piece in pieces:
                for entry in piece:
                    off = entry[0]
                    if kind == "planes":
                        exp = torch.from_numpy(entry[1]).to(self.device)
                        raw = torch.from_numpy(entry[2]).to(self.device)
                        flat[off : off + exp.numel()] = self.layout.merge_torch(exp, raw)
                    else:
                        words = np.asarray(entry[1])
                        src = torch.from_numpy(words.view(np.dtype(f"i{self.layout.itemsize}"))).view(signed)
                        flat[off : off + src.numel()] = src.view(self.layout.torch_dtype).to(self.device)
        first_shape, second_shape = self._fused_shapes(shape)
        return ExpertWeights(flat[: shape.split].view(first_shape), flat[shape.split :].view(second_shape))
