"""codec: bit-exact round trips for every dtype, size, shard count and special value."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zipmoe_ray.codec import (
    EncodedTensor,
    auto_shards,
    bound_ratio,
    decode,
    decode_many,
    decompress_exponents,
    encode,
    entropy_bits,
    exponent_histogram,
    layout_for,
    planes,
)
from zipmoe_ray.errors import ChecksumError, ConfigError, DTypeError, StoreCorruptError

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True, params=["c", "numpy"])
def planes_implementation(request, monkeypatch):
    """Every test of this module runs with the C bit-plane kernels and with numpy's: same bits."""
    if request.param == "numpy":
        monkeypatch.setattr(planes, "_c", None)
    elif planes._c is None:
        pytest.skip("zipmoe_ray.codec._planes was not built (no C compiler at install)")
    return request.param


INT = {2: torch.int16, 4: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT[t.element_size()])


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 31, 127, 8191, 65537, 1_000_003])
@pytest.mark.parametrize("shards", [None, 1, 3, 8])
def test_round_trip_sizes(dtype, n, shards):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 0.02).to(dtype)
    enc = encode(x, shards=shards)
    assert_bit_equal(decode(enc), x)
    assert enc.shards == (auto_shards(n) if shards is None else min(shards, n))
    assert sum(enc.shard_elems) == n


@pytest.mark.parametrize("dtype", DTYPES)
def test_more_shards_than_elements(dtype):
    x = torch.tensor([1.5, -2.0, 3.25], dtype=dtype)
    enc = encode(x, shards=64)
    assert enc.shards == 3
    assert_bit_equal(decode(enc), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_pattern(dtype):
    """All 65536 bit patterns: NaN payloads, -0.0, subnormals, infinities, everything."""
    pattern = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = pattern.view(dtype)
    for shards in (1, 5):
        y = decode(encode(x, shards=shards))
        assert torch.equal(bits(y), pattern)


def test_float32_special_values():
    specials = [0.0, -0.0, math.inf, -math.inf, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, float("nan")]
    g = torch.Generator().manual_seed(1)
    payload_nans = torch.tensor([0x7FC00001, 0x7F800001, -0x00000001, 0x7FFFFFFF], dtype=torch.int32)
    rand = torch.randint(-(2**31), 2**31 - 1, (100_000,), dtype=torch.int32, generator=g)
    x = torch.cat([torch.tensor(specials, dtype=torch.float32).view(torch.int32), payload_nans, rand])
    y = decode(encode(x.view(torch.float32), shards=4))
    assert torch.equal(bits(y), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes_and_noncontiguous_input(dtype):
    x = (torch.randn(37, 53) * 0.02).to(dtype)
    t = x.t()  # non-contiguous view
    y = decode(encode(t))
    assert y.shape == t.shape
    assert_bit_equal(y, t.contiguous())


def test_decode_into_out_and_threads():
    x = (torch.randn(300_000) * 0.02).to(torch.bfloat16)
    enc = encode(x, shards=6)
    out = torch.empty_like(x)
    for threads in (1, 2, 4):
        out.zero_()
        assert decode(enc, out=out, threads=threads) is out
        assert_bit_equal(out, x)


def test_decode_many_mixed_dtypes():
    xs = [
        (torch.randn(n) * 0.02).to(dt)
        for n, dt in [(5000, torch.bfloat16), (777, torch.float32), (3, torch.float16)]
    ]
    ys = decode_many([(encode(x, shards=2), None) for x in xs], threads=2, verify=True)
    for x, y in zip(xs, ys):
        assert_bit_equal(y, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decompress_only_then_torch_recombination(dtype):
    """The GPU path: the CPU decompresses exponents, merge_torch recombines (here on the CPU)."""
    x = (torch.randn(10_001) * 0.02).to(dtype)
    enc = encode(x, shards=3)
    exp = decompress_exponents(enc, threads=2)
    raw = torch.from_numpy(np.asarray(enc.raw))
    y = layout_for(dtype).merge_torch(torch.from_numpy(exp), raw).view(x.shape)
    assert_bit_equal(y, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_shards_pieces_make_the_whole(dtype):
    """Several workers decoding pieces of one tensor (decode_shards): the words of the pieces, or their
    planes recombined with merge_torch, are the tensor's, bit for bit."""
    from zipmoe_ray.codec.core import decode_shards

    x = (torch.randn(20_003) * 0.02).to(dtype)
    enc = encode(x, shards=5)
    layout = layout_for(dtype)
    words, planes = [], []
    for lo, hi in [(0, 2), (2, 3), (3, 5)]:
        a, w = decode_shards(enc, lo, hi)
        assert a == sum(len(p) for p in words)
        words.append(w)
        a2, exp, raw = decode_shards(enc, lo, hi, planes_only=True)
        assert a2 == a and len(exp) == len(raw) == len(w)
        planes.append(layout.merge_torch(torch.from_numpy(exp.copy()), torch.from_numpy(raw.copy())))
    whole = torch.from_numpy(np.concatenate(words).view(np.int16)).view(dtype)
    assert_bit_equal(whole, x)
    assert_bit_equal(torch.cat(planes).view(x.shape), x)
    with pytest.raises(ConfigError, match="shards"):
        decode_shards(enc, 3, 6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_recombine_after_decompress_shards_and_a_short_raw_plane_refused(dtype):
    """The lanes' disk-miss path: exponents first, the raw plane later; a raw plane of the wrong size is a
    damaged store, refused before anything is recombined from it."""
    from dataclasses import replace

    from zipmoe_ray.codec import decompress_shards, recombine

    x = (torch.randn(20_003) * 0.02).to(dtype)
    enc = encode(x, shards=4)
    layout = layout_for(dtype)
    exp = np.empty(enc.numel, np.uint8)
    words = np.zeros(enc.numel, layout.word)
    for lo, hi in [(0, 1), (1, 4)]:
        a, b = decompress_shards(enc, lo, hi, exp)
        recombine(enc, exp, words, a, b)
    assert np.array_equal(words, layout.words(x))
    short = replace(enc, raw=bytes(np.asarray(enc.raw))[:-1])
    with pytest.raises(StoreCorruptError, match="raw plane holds"):
        recombine(short, exp, words, 0, enc.numel)


@pytest.mark.parametrize("level", [None, -3, 1, 3, 19])
def test_zstd_levels(level):
    x = (torch.randn(20_000) * 0.02).to(torch.bfloat16)
    enc = encode(x, level=level)
    assert enc.level == level
    assert_bit_equal(decode(enc), x)


@pytest.mark.parametrize("level", [None, 0, 9])
def test_lz4(level):
    pytest.importorskip("lz4")
    x = (torch.randn(20_000) * 0.02).to(torch.float16)
    enc = encode(x, codec="lz4", level=level, shards=2)
    assert enc.codec == "lz4"
    assert_bit_equal(decode(enc), x)


def test_ratio_near_bound_on_realistic_weights():
    x = (torch.randn(1408 * 2048) * 0.02).to(torch.bfloat16)
    enc = encode(x)
    h = entropy_bits(exponent_histogram(x))
    bound = bound_ratio("bfloat16", h)
    assert 2.4 < h < 2.7
    assert bound <= enc.ratio <= bound + 0.015
    assert enc.nbytes == enc.exp_nbytes + enc.raw_nbytes == sum(len(s) for s in enc.exp_shards) + x.numel()


def test_non_floating_dtypes_are_refused():
    for dt in (torch.int8, torch.int32, torch.uint8, torch.bool, torch.float64):
        with pytest.raises(DTypeError, match="bfloat16, float16, float32"):
            encode(torch.zeros(4, dtype=dt))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shards": 0}, "shards"),
        ({"shards": -1}, "shards"),
        ({"codec": "gzip"}, "unknown codec"),
        ({"level": 99}, "zstd level"),
        ({"threads": 0}, "threads"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        encode(torch.zeros(4, dtype=torch.bfloat16), **kwargs)


def _damaged(enc: EncodedTensor, shard: bool) -> EncodedTensor:
    import dataclasses

    if shard:
        s = bytearray(enc.exp_shards[0])
        s[len(s) // 2] ^= 0xFF
        return dataclasses.replace(enc, exp_shards=(bytes(s), *enc.exp_shards[1:]))
    r = np.array(enc.raw, copy=True)
    r[0] ^= 1
    return dataclasses.replace(enc, raw=r)


@pytest.mark.parametrize("shard", [True, False])
def test_checksums_catch_damage(shard):
    enc = encode((torch.randn(50_000) * 0.02).to(torch.bfloat16), shards=2)
    bad = _damaged(enc, shard)
    with pytest.raises(ChecksumError, match="shard 0" if shard else "sign\\+mantissa"):
        decode(bad, verify=True)


def test_damaged_frame_without_checksum_check_still_fails_cleanly():
    enc = encode((torch.randn(50_000) * 0.02).to(torch.bfloat16), shards=1)
    import dataclasses

    truncated = dataclasses.replace(enc, exp_shards=(bytes(enc.exp_shards[0])[:-20],))
    with pytest.raises(StoreCorruptError):
        decode(truncated)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    n=st.integers(0, 5000),
    shards=st.one_of(st.none(), st.integers(1, 40)),
    seed=st.integers(0, 2**31 - 1),
    raw_bits=st.booleans(),
)
def test_fuzz_round_trip(dtype, n, shards, seed, raw_bits):
    g = torch.Generator().manual_seed(seed)
    if raw_bits:  # arbitrary bit patterns, NaNs and all
        iv = INT[torch.empty(0, dtype=dtype).element_size()]
        info = torch.iinfo(iv)
        x = torch.randint(info.min, info.max, (n,), dtype=iv, generator=g).view(dtype)
    else:
        x = (torch.randn(n, generator=g) * 10 ** float(torch.randint(-8, 4, (1,), generator=g))).to(dtype)
    assert_bit_equal(decode(encode(x, shards=shards), threads=2), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_c_and_numpy_planes_agree_on_random_bits_and_ranges(dtype, planes_implementation):
    if planes_implementation == "numpy":
        pytest.skip("compares the two")
    layout = layout_for(dtype)
    rng = np.random.default_rng(7)
    n = 300_001
    words = rng.integers(0, np.iinfo(layout.word).max, n, dtype=layout.word, endpoint=True)
    planes_c = (np.empty(n, np.uint8), np.empty(n * layout.raw_width, np.uint8))
    planes_np = (np.empty(n, np.uint8), np.empty(n * layout.raw_width, np.uint8))
    layout.split(words, *planes_c)
    layout.split_numpy(words, *planes_np)
    assert np.array_equal(planes_c[0], planes_np[0]) and np.array_equal(planes_c[1], planes_np[1])
    out_c, out_np = np.zeros_like(words), np.zeros_like(words)
    for a, b in [(0, 1), (1, 4097), (4097, 200_000), (200_000, n)]:  # pieces of one tensor, as lanes merge
        layout.merge(*planes_c, out_c, a, b)
        layout.merge_numpy(*planes_np, out_np, a, b)
    assert np.array_equal(out_c, words) and np.array_equal(out_np, words)


def test_c_planes_refuse_what_they_cannot_do_safely(planes_implementation):
    if planes_implementation == "numpy":
        pytest.skip("the C kernels' own checks")
    exp, raw = np.zeros(8, np.uint8), np.zeros(8, np.uint8)
    out = np.zeros(8, np.uint16)
    with pytest.raises(ValueError, match="outside the output"):
        planes._c.merge(0, exp, raw, out, 0, 9)
    with pytest.raises(ValueError, match="exponent plane is shorter"):
        planes._c.merge(0, exp[:4], raw, out, 0, 8)
    with pytest.raises(ValueError, match="raw plane is shorter"):
        planes._c.merge(2, exp, raw, np.zeros(8, np.uint32), 0, 8)  # float32 needs 3 raw bytes an element
    with pytest.raises(ValueError, match="aligned"):
        planes._c.merge(0, exp, raw, np.zeros(17, np.uint8)[1:], 0, 8)
    with pytest.raises((BufferError, ValueError), match="contiguous"):
        planes._c.merge(0, exp, raw, np.zeros(16, np.uint16)[::2], 0, 8)
    with pytest.raises(ValueError, match="unknown plane layout"):
        planes._c.merge(3, exp, raw, out, 0, 8)
    with pytest.raises(ValueError, match="too short"):
        planes._c.split(2, np.zeros(8, np.uint32), exp, raw)
    both = np.zeros(32, np.uint8)
    planes._c.merge(0, both[:8], raw, both[8:24].view(np.uint16), 0, 8)  # side by side in one buffer: fine
    with pytest.raises(ValueError, match="overlaps"):
        planes._c.merge(0, both[:8], raw, both[:16].view(np.uint16), 0, 8)
    with pytest.raises(ValueError, match="overlap"):
        planes._c.split(0, both[:16].view(np.uint16), both[8:16], raw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_words_fall_back_to_numpy(dtype):
    """A tensor at an odd byte offset (torch.frombuffer of a packed file) still splits and merges."""
    layout = layout_for(dtype)
    n = 1001
    x = (torch.randn(n) * 0.02).to(dtype)
    raw_bytes = bytearray(1 + n * layout.itemsize)
    buf = np.frombuffer(raw_bytes, np.uint8)[1:]
    buf[:] = layout.words(x).view(np.uint8)
    words = buf.view(layout.word)
    assert not words.flags.aligned
    exp, raw = np.empty(n, np.uint8), np.empty(n * layout.raw_width, np.uint8)
    layout.split(words, exp, raw)
    out_bytes = np.zeros(1 + n * layout.itemsize, np.uint8)[1:]
    out = out_bytes.view(layout.word)
    layout.merge(exp, raw, out, 0, n)
    assert np.array_equal(out, layout.words(x))


def test_the_c_planes_are_in_use_in_ci():
    """CI installs with a C compiler: a build that silently fell back to numpy would halve decode speed."""
    if os.environ.get("CI") != "true":
        pytest.skip("only CI promises a compiler")
    assert planes.IMPLEMENTATION == "c"


def test_zipmoe_planes_chooses_the_implementation(monkeypatch):
    """ZIPMOE_PLANES: auto takes the extension where it is built, numpy never, c insists; anything else is a
    ConfigError naming the choices, and so is c on a build without the extension."""
    monkeypatch.setenv("ZIPMOE_PLANES", "numpy")
    assert planes._load_extension() is None
    monkeypatch.setenv("ZIPMOE_PLANES", "fast")
    with pytest.raises(ConfigError, match="auto, c, numpy"):
        planes._load_extension()
    if planes._c is not None:  # built: auto and c both load it
        for choice in ("auto", "C", ""):
            monkeypatch.setenv("ZIPMOE_PLANES", choice)
            assert planes._load_extension() is planes._c
    # what a build without the extension looks like
    monkeypatch.setitem(sys.modules, "zipmoe_ray.codec._planes", None)
    monkeypatch.delattr(sys.modules["zipmoe_ray.codec"], "_planes", raising=False)
    monkeypatch.setenv("ZIPMOE_PLANES", "auto")
    assert planes._load_extension() is None
    monkeypatch.setenv("ZIPMOE_PLANES", "c")
    with pytest.raises(ConfigError, match="not built"):
        planes._load_extension()
