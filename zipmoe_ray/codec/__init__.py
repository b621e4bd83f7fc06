"""Lossless bit-plane codec for floating-point tensors (pure: no Ray, no store).

    encode(tensor, codec="zstd", level=None, shards=None) -> EncodedTensor
    decode(encoded) -> torch.Tensor   # bit-identical

See planes.py for how each dtype is split and backends.py for the entropy stage. The names are loaded on
first use (see zipmoe_ray._lazy): most modules here import torch, the encoded form and checksums do not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_WHERE = {
    "CODECS": ".backends",
    "get_codec": ".backends",
    "auto_shards": ".encoded",
    "decode": ".core",
    "decode_many": ".core",
    "decode_shards": ".core",
    "decompress_exponents": ".core",
    "decompress_shards": ".core",
    "encode": ".core",
    "recombine": ".core",
    "EncodedTensor": ".encoded",
    "crc32": ".encoded",
    "LAYOUTS": ".planes",
    "PlaneLayout": ".planes",
    "layout_for": ".planes",
    "bound_ratio": ".stats",
    "entropy_bits": ".stats",
    "exponent_histogram": ".stats",
}
__all__ = [
    "CODECS",
    "LAYOUTS",
    "EncodedTensor",
    "PlaneLayout",
    "auto_shards",
    "bound_ratio",
    "crc32",
    "decode",
    "decode_many",
    "decode_shards",
    "decompress_exponents",
    "decompress_shards",
    "encode",
    "entropy_bits",
    "exponent_histogram",
    "get_codec",
    "layout_for",
    "recombine",
]
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

if TYPE_CHECKING:
    from .backends import CODECS, get_codec
    from .core import (
        decode,
        decode_many,
        decode_shards,
        decompress_exponents,
        decompress_shards,
        encode,
        recombine,
    )
    from .encoded import EncodedTensor, auto_shards, crc32
    from .planes import LAYOUTS, PlaneLayout, layout_for
    from .stats import bound_ratio, entropy_bits, exponent_histogram
