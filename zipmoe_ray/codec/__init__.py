"""Lossless bit-plane codec for floating-point tensors (pure: no Ray, no store).

    encode(tensor, codec="zstd", level=None, shards=None) -> EncodedTensor
    decode(encoded) -> torch.Tensor   # bit-identical

See planes.py for how each dtype is split and backends.py for the entropy stage.
"""

from .backends import CODECS, get_codec
from .core import auto_shards, decode, decode_many, decode_shards, decompress_exponents, encode
from .encoded import EncodedTensor, crc32
from .planes import LAYOUTS, PlaneLayout, layout_for
from .stats import bound_ratio, entropy_bits, exponent_histogram

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
    "encode",
    "entropy_bits",
    "exponent_histogram",
    "get_codec",
    "layout_for",
]
