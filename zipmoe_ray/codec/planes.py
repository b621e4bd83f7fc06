"""Bit-plane layouts: how a floating-point tensor is split into a compressible plane and a raw plane.

For every supported dtype the split is exact (pure bit moves), so ``merge(split(x)) == x`` bit for bit,
NaN payloads, -0.0, subnormals and infinities included.

=========  =====================================  ====================================================
dtype      compressed plane (1 byte / element)    raw plane
=========  =====================================  ====================================================
bfloat16   exponent (8 bits)                      sign | mantissa (1 + 7 bits), 1 byte / element
float16    sign | exponent(5) | mantissa top 2    mantissa low 8 bits, 1 byte / element
float32    exponent (8 bits)                      mantissa low 16 bits (2 bytes, first), then
                                                  sign | mantissa top 7 bits (1 byte) per element
=========  =====================================  ====================================================

bfloat16 is the paper's split. float16's 5-bit exponent does not fill a byte, so its high byte (sign,
exponent and two mantissa bits) is the compressed plane and its low byte is raw: the split stays
byte-aligned (no bit packing) and costs the entropy coder only the ~3 incompressible bits it carries.
float32 is bfloat16's split on the high 16 bits plus 16 raw mantissa bits.

``merge`` works on element ranges so that a shard can be decoded and recombined by one thread while its
bytes are still in cache. All functions write into caller-owned buffers and allocate only scratch.

``split`` and ``merge`` run in C (``_planes.c``: one pass per element, the GIL released) where the package
was built with its extension, and in numpy otherwise; both give the same bits (tests/unit/test_codec.py runs
both). ``IMPLEMENTATION`` says which is in use; ``ZIPMOE_PLANES=numpy`` forces numpy and ``ZIPMOE_PLANES=c``
requires the extension (ConfigError without it), see zipmoe_ray/env.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .. import env
from ..errors import ConfigError

__all__ = ["IMPLEMENTATION", "LAYOUTS", "PlaneLayout", "layout_for"]


def _load_extension():
    """The C extension, or None where ZIPMOE_PLANES asks for numpy or the package was built without it."""
    choice = env.get_str("ZIPMOE_PLANES").strip().lower() or "auto"
    if choice not in ("auto", "c", "numpy"):
        raise ConfigError(f"ZIPMOE_PLANES={choice!r} is not one of auto, c, numpy")
    if choice == "numpy":
        return None
    try:
        from . import _planes
    except ImportError:  # built without a C compiler: numpy does the same bit moves
        if choice == "c":
            raise ConfigError(
                "ZIPMOE_PLANES=c but zipmoe_ray.codec._planes is not built: reinstall with a C compiler "
                "(pip install --no-build-isolation -e . or pip install --force-reinstall zipmoe-ray), or "
                "unset ZIPMOE_PLANES to use numpy"
            ) from None
        return None
    return _planes


_c = _load_extension()
IMPLEMENTATION = "c" if _c is not None else "numpy"

_BLOCK = 1 << 17  # elements per merge step: big enough to amortise Python, small enough for L2
_tls = threading.local()


def _scratch(n: int, dtype: np.dtype, slot: int = 0) -> np.ndarray:
    """A thread-local scratch array of ``n`` elements, reused between calls (``slot`` tells apart two
    buffers of the same dtype needed at once)."""
    key = f"scratch_{np.dtype(dtype).str}_{slot}"
    buf = getattr(_tls, key, None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, _BLOCK), dtype=dtype)
        setattr(_tls, key, buf)
    return buf[:n]


@dataclass(frozen=True)
class PlaneLayout:
    """How one floating-point dtype is split into planes (see the module docstring)."""

    name: str
    torch_dtype: torch.dtype
    word: np.dtype  # unsigned integer type of one element's bits
    raw_width: int  # raw-plane bytes per element
    exponent_bits: int
    mantissa_bits: int
    kind: ClassVar[int]  # the C extension's number for this layout (each subclass's)

    @property
    def itemsize(self) -> int:
        return self.word.itemsize

    @property
    def bits(self) -> int:
        return 8 * self.itemsize

    def words(self, tensor: torch.Tensor) -> np.ndarray:
        """The tensor's bits as a flat numpy array of unsigned words, sharing its memory."""
        signed = {1: torch.int8, 2: torch.int16, 4: torch.int32}[self.itemsize]
        return tensor.view(signed).reshape(-1).numpy().view(self.word)

    def split(self, words: np.ndarray, exp_out: np.ndarray, raw_out: np.ndarray) -> None:
        """Fill ``exp_out`` (uint8[n]) and ``raw_out`` (uint8[n * raw_width]) from ``words``."""
        if _c is not None and words.flags.c_contiguous and words.flags.aligned:
            _c.split(self.kind, words, exp_out, raw_out)
        else:
            self.split_numpy(words, exp_out, raw_out)

    def merge(self, exp: np.ndarray, raw: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
        """Write elements ``[start, stop)`` of ``out`` (words) from the full planes ``exp`` and ``raw``."""
        if _c is not None and out.flags.c_contiguous and out.flags.aligned:
            _c.merge(self.kind, exp, raw, out, start, stop)
        else:
            self.merge_numpy(exp, raw, out, start, stop)

    def split_numpy(self, words: np.ndarray, exp_out: np.ndarray, raw_out: np.ndarray) -> None:
        raise NotImplementedError

    def merge_numpy(self, exp: np.ndarray, raw: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
        raise NotImplementedError

    def exponent_field(self, words: np.ndarray) -> np.ndarray:
        """The biased exponent of each element as uint8 (for entropy statistics)."""
        raise NotImplementedError

    def merge_torch(self, exp: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Recombine planes with torch integer ops on any device (GPU recombination path).

        ``exp`` and ``raw`` are uint8 tensors on the same device; returns a flat tensor of this dtype.
        """
        raise NotImplementedError


class _BF16(PlaneLayout):
    kind = 0

    def split_numpy(self, words, exp_out, raw_out):
        n = words.size
        for a in range(0, n, _BLOCK):
            w = words[a : a + _BLOCK]
            t = _scratch(w.size, np.uint16)
            np.right_shift(w, 7, out=t)
            np.copyto(exp_out[a : a + w.size], t, casting="unsafe")  # low byte = exponent
            np.right_shift(w, 8, out=t)
            np.bitwise_and(t, 0x80, out=t)
            u = _scratch(w.size, np.uint16, 1)
            np.bitwise_and(w, 0x7F, out=u)
            np.bitwise_or(t, u, out=t)
            np.copyto(raw_out[a : a + w.size], t, casting="unsafe")

    def merge_numpy(self, exp, raw, out, start, stop):
        o16 = out.view(np.int16)
        sm = raw.view(np.int8)
        for a in range(start, stop, _BLOCK):
            b = min(stop, a + _BLOCK)
            o = o16[a:b]
            np.copyto(o, sm[a:b], casting="unsafe")  # sign-extends: sign lands in bit 15
            np.bitwise_and(o, np.int16(-32641), out=o)  # 0x807F: sign and mantissa
            t = _scratch(b - a, np.int16)
            np.copyto(t, exp[a:b], casting="unsafe")
            np.left_shift(t, 7, out=t)
            np.bitwise_or(o, t, out=o)

    def exponent_field(self, words):
        return (words >> 7).astype(np.uint8)

    def merge_torch(self, exp, raw):
        out = raw.view(torch.int8).to(torch.int16)
        out.bitwise_and_(-32641)
        out.bitwise_or_(exp.to(torch.int16).bitwise_left_shift_(7))
        return out.view(torch.bfloat16)


class _FP16(PlaneLayout):
    kind = 1

    def split_numpy(self, words, exp_out, raw_out):
        n = words.size
        for a in range(0, n, _BLOCK):
            w = words[a : a + _BLOCK]
            t = _scratch(w.size, np.uint16)
            np.right_shift(w, 8, out=t)
            np.copyto(exp_out[a : a + w.size], t, casting="unsafe")
            np.copyto(raw_out[a : a + w.size], w, casting="unsafe")  # truncates to the low byte

    def merge_numpy(self, exp, raw, out, start, stop):
        for a in range(start, stop, _BLOCK):
            b = min(stop, a + _BLOCK)
            o = out[a:b]
            np.copyto(o, exp[a:b], casting="unsafe")
            np.left_shift(o, 8, out=o)
            t = _scratch(b - a, np.uint16)
            np.copyto(t, raw[a:b], casting="unsafe")
            np.bitwise_or(o, t, out=o)

    def exponent_field(self, words):
        return ((words >> 10) & 0x1F).astype(np.uint8)

    def merge_torch(self, exp, raw):
        out = exp.to(torch.int16).bitwise_left_shift_(8)
        out.bitwise_or_(raw.to(torch.int16))
        return out.view(torch.float16)


class _FP32(PlaneLayout):
    kind = 2

    # raw plane: [low 16 mantissa bits as uint16 little-endian, n of them][sign | mantissa top 7, n bytes]
    def split_numpy(self, words, exp_out, raw_out):
        n = words.size
        lo16 = raw_out[: 2 * n].view(np.uint16)
        hi = raw_out[2 * n :]
        for a in range(0, n, _BLOCK):
            w = words[a : a + _BLOCK]
            m = w.size
            t = _scratch(m, np.uint32)
            np.right_shift(w, 23, out=t)
            np.copyto(exp_out[a : a + m], t, casting="unsafe")  # low byte = exponent
            np.copyto(lo16[a : a + m], w, casting="unsafe")
            np.right_shift(w, 24, out=t)
            np.bitwise_and(t, 0x80, out=t)
            u = _scratch(m, np.uint32, 1)
            np.right_shift(w, 16, out=u)
            np.bitwise_and(u, 0x7F, out=u)
            np.bitwise_or(t, u, out=t)
            np.copyto(hi[a : a + m], t, casting="unsafe")

    def merge_numpy(self, exp, raw, out, start, stop):
        n = out.size
        lo16 = raw[: 2 * n].view(np.uint16)
        hi = raw[2 * n :].view(np.int8)
        o32 = out.view(np.int32)
        for a in range(start, stop, _BLOCK):
            b = min(stop, a + _BLOCK)
            o = o32[a:b]
            np.copyto(o, hi[a:b], casting="unsafe")  # sign-extends
            np.left_shift(o, 16, out=o)
            np.bitwise_and(o, np.int32(-2139160576), out=o)  # 0x807F0000: sign and mantissa top 7
            t = _scratch(b - a, np.int32)
            np.copyto(t, exp[a:b], casting="unsafe")
            np.left_shift(t, 23, out=t)
            np.bitwise_or(o, t, out=o)
            np.copyto(t, lo16[a:b], casting="unsafe")
            np.bitwise_or(o, t, out=o)

    def exponent_field(self, words):
        return (words >> 23).astype(np.uint8)

    def merge_torch(self, exp, raw):
        n = exp.numel()
        lo16 = raw[: 2 * n].view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
        out = raw[2 * n :].view(torch.int8).to(torch.int32).bitwise_left_shift_(16)
        out.bitwise_and_(-2139160576)
        out.bitwise_or_(exp.to(torch.int32).bitwise_left_shift_(23))
        out.bitwise_or_(lo16)
        return out.view(torch.float32)


LAYOUTS: dict[str, PlaneLayout] = {
    "bfloat16": _BF16("bfloat16", torch.bfloat16, np.dtype(np.uint16), 1, 8, 7),
    "float16": _FP16("float16", torch.float16, np.dtype(np.uint16), 1, 5, 10),
    "float32": _FP32("float32", torch.float32, np.dtype(np.uint32), 3, 8, 23),
}
_BY_TORCH = {layout.torch_dtype: layout for layout in LAYOUTS.values()}


def layout_for(dtype: torch.dtype | str) -> PlaneLayout:
    """The plane layout of a dtype; raises DTypeError for anything but bfloat16, float16 and float32."""
    from ..errors import DTypeError

    layout = LAYOUTS.get(dtype) if isinstance(dtype, str) else _BY_TORCH.get(dtype)
    if layout is None:
        name = str(dtype).removeprefix("torch.")
        raise DTypeError(
            f"dtype {name} is not supported: zipmoe compresses floating-point tensors of dtype "
            f"{', '.join(LAYOUTS)} only (quantized or integer checkpoints cannot be split into bit planes)"
        )
    return layout
