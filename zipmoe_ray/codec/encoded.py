"""EncodedTensor: one tensor in compressed form (exponent shards + raw plane), with chunk checksums."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ChecksumError
from .checksum import crc32

__all__ = [
    "AUTO_SHARD_BYTES",
    "MAX_AUTO_SHARDS",
    "Buffer",
    "EncodedTensor",
    "auto_shards",
    "buffer_nbytes",
    "crc32",
]

AUTO_SHARD_BYTES = 256 * 1024  # with shards=None, about this many exponent bytes per shard...
MAX_AUTO_SHARDS = 8  # ...and at most this many shards per tensor


def auto_shards(numel: int) -> int:
    """Shard count used when ``shards=None``: one per ~256 KiB of exponent bytes, 1 to 8."""
    if numel <= 0:
        return 0
    return max(1, min(MAX_AUTO_SHARDS, -(-numel // AUTO_SHARD_BYTES)))


Buffer = bytes | bytearray | memoryview | np.ndarray


def buffer_nbytes(buf: Buffer) -> int:
    return buf.nbytes if isinstance(buf, (memoryview, np.ndarray)) else len(buf)


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor split into planes: ``exp_shards`` (K compressed chunks of the compressed plane, covering
    consecutive element ranges of sizes ``shard_elems``) and ``raw`` (the raw plane, stored as is).

    Buffers may be views into a larger buffer (for example an expert extent read from disk): the
    EncodedTensor does not own them and never copies them.
    """

    dtype: str
    shape: tuple[int, ...]
    codec: str
    level: int | None
    exp_shards: tuple[Buffer, ...]
    shard_elems: tuple[int, ...]
    raw: Buffer
    exp_crc32: tuple[int, ...]
    raw_crc32: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def original_nbytes(self) -> int:
        from .planes import layout_for

        return self.numel * layout_for(self.dtype).itemsize

    @property
    def exp_nbytes(self) -> int:
        return sum(buffer_nbytes(s) for s in self.exp_shards)

    @property
    def raw_nbytes(self) -> int:
        return buffer_nbytes(self.raw)

    @property
    def nbytes(self) -> int:
        """Stored size: compressed shards plus the raw plane."""
        return self.exp_nbytes + self.raw_nbytes

    @property
    def ratio(self) -> float:
        """Stored bytes / original bytes (1.0 for an empty tensor)."""
        return self.nbytes / self.original_nbytes if self.numel else 1.0

    @property
    def shards(self) -> int:
        return len(self.exp_shards)

    def verify(self, what: str = "tensor") -> None:
        """Check every chunk's CRC-32; raises ChecksumError naming ``what`` and the chunk."""
        self.verify_shards(0, self.shards, what)
        self.verify_raw(what)

    def verify_shards(self, lo: int, hi: int, what: str = "tensor") -> None:
        """Check exponent shards ``[lo, hi)`` only (a piece of the tensor, or before the raw plane is in)."""
        for i in range(lo, hi):
            got, want = crc32(self.exp_shards[i]), self.exp_crc32[i]
            if got != want:
                raise ChecksumError(
                    f"{what}: exponent shard {i}/{self.shards} fails its checksum "
                    f"(crc32 {got:08x}, expected {want:08x}); the data is damaged"
                )

    def verify_raw(self, what: str = "tensor") -> None:
        """Check the raw plane's chunk only."""
        got = crc32(self.raw)
        if got != self.raw_crc32:
            raise ChecksumError(
                f"{what}: sign+mantissa chunk fails its checksum (crc32 {got:08x}, expected "
                f"{self.raw_crc32:08x}); the data is damaged"
            )
