"""The chunk checksum is zlib's CRC-32 whichever implementation computes it: stores written with one are
read with the other."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from zipmoe_ray.codec.checksum import IMPLEMENTATION, crc32


@pytest.mark.parametrize("n", [0, 1, 7, 4096, 1 << 20, (1 << 20) + 13])
def test_equals_zlib_on_every_buffer_kind(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    want = zlib.crc32(data.tobytes()) & 0xFFFFFFFF
    assert crc32(data.tobytes()) == want
    assert crc32(bytearray(data.tobytes())) == want
    assert crc32(memoryview(data)) == want
    assert crc32(data) == want
    if n > 8:
        part = data[3 : n - 5]  # a view inside a larger buffer, as chunks of an extent are
        assert crc32(memoryview(part)) == zlib.crc32(part.tobytes()) & 0xFFFFFFFF


def test_continues_from_a_running_value():
    a, b = b"sign and mantissa", b"exponent"
    assert crc32(b, crc32(a)) == zlib.crc32(a + b) & 0xFFFFFFFF


def test_the_fast_implementation_is_in_use_where_it_is_installed():
    pytest.importorskip("isal")
    assert IMPLEMENTATION == "isal"
