"""The forms an expert can be held in, and what each costs in bytes held, bytes read and staging.

==============  ======================================  =============================================
form            held in memory                          to make it usable
==============  ======================================  =============================================
FULL            recombined BF16 on the compute device   nothing
COMPRESSED      E-chunks + SM-chunk (the extent)        decompress the shards, recombine
SM              SM-chunk only                           read the E region from disk, decompress, recombine
DISK            nothing                                 read the extent, decompress, recombine
==============  ======================================  =============================================

For a store written with ``--codec none`` (the classic-offloading baseline) the extent *is* the BF16
weights: a DISK expert is read and used as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = ["ExpertSizes", "Form", "Key"]

Key = tuple[int, int]  # (layer, expert): how every part of the runtime names an expert


class Form(IntEnum):
    """Cache forms, best (cheapest to use) first."""

    FULL = 0
    COMPRESSED = 1
    SM = 2
    DISK = 3

    @property
    def label(self) -> str:
        return _LABELS[self]  # a tuple lookup: the scheduler counts hits by label on every request


_LABELS = tuple(f.name.lower() for f in Form)


@dataclass(frozen=True)
class ExpertSizes:
    """Byte sizes of one expert in each form (from the store index)."""

    full: int  # decoded BF16 (or FP16/FP32) bytes
    extent: int  # E region + SM region, as stored
    exp: int  # E region: compressed exponent shards
    sm: int  # SM region: raw sign+mantissa planes
    raw_codec: bool = False  # store codec "none": the extent is the full tensor bytes
    shards: int = 1  # exponent shards per tensor (the fewest of the expert's tensors): decode pieces

    def held(self, form: Form) -> int:
        """Bytes of budget an expert occupies while cached in ``form``."""
        return (self.full, self.extent, self.sm, 0)[form]

    def read(self, form: Form) -> int:
        """Bytes read from disk to use an expert cached in ``form``."""
        return (0, 0, self.exp, self.extent)[form]

    def staging(self, form: Form) -> int:
        """Transient bytes (read buffers + decoded output) to make an expert in ``form`` usable."""
        if form == Form.FULL:
            return 0
        if self.raw_codec:  # the read buffer is the usable tensor
            return self.full if form == Form.DISK else 0
        return (0, self.full, self.exp + self.full, self.extent + self.full)[form]
