"""encode / decode: lossless bit-plane compression of one floating-point tensor.

Decoding runs one task per exponent shard; each task decompresses its shard straight into a slice of a
preallocated exponent buffer and recombines that slice into the caller's output while it is still in
cache. Tasks of several tensors can be decoded together (:func:`decode_many`), which is how the store
decodes a whole expert in one parallel batch.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .. import env
from ..errors import ConfigError, StoreCorruptError
from .backends import get_codec
from .encoded import AUTO_SHARD_BYTES, MAX_AUTO_SHARDS, EncodedTensor, auto_shards, crc32
from .planes import layout_for

__all__ = [
    "AUTO_SHARD_BYTES",
    "MAX_AUTO_SHARDS",
    "auto_shards",
    "decode",
    "decode_many",
    "decode_shards",
    "decompress_exponents",
    "decompress_shards",
    "encode",
]

log = logging.getLogger(__name__)


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix=f"zipmoe-codec{threads}")
        return pool


def default_threads() -> int:
    return env.get_int("ZIPMOE_CODEC_THREADS") or os.cpu_count() or 1


def _check_threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    return threads


def encode(
    tensor: torch.Tensor,
    *,
    codec: str = "zstd",
    level: int | None = None,
    shards: int | None = None,
    threads: int = 1,
) -> EncodedTensor:
    """Split ``tensor`` into bit planes and compress its exponent plane in ``shards`` independent shards.

    Args:
        tensor: a bfloat16, float16 or float32 tensor of any shape (moved to the CPU and made contiguous
            if it is not already). It is only read.
        codec: ``"zstd"`` (default) or ``"lz4"`` (needs the ``lz4`` extra).
        level: codec level; ``None`` picks zstd parameters tuned for exponent planes (see backends).
        shards: number of exponent shards K; ``None`` chooses one per ~256 KiB (at most 8). K is clamped to
            the number of elements, so every shard holds at least one.
        threads: threads compressing shards in parallel (blocks the caller until done).

    Returns an EncodedTensor owning fresh buffers. Raises DTypeError for other dtypes and ConfigError for
    bad arguments.

    Example:
        >>> import torch
        >>> from zipmoe_ray.codec import encode, decode
        >>> x = torch.randn(1000).to(torch.bfloat16)
        >>> torch.equal(decode(encode(x)), x)
        True
    """
    layout = layout_for(tensor.dtype)
    shard_codec = get_codec(codec, level)
    threads = _check_threads(threads)
    numel = tensor.numel()
    if codec == "none":
        t = tensor.detach().cpu().contiguous()
        raw = layout.words(t).view(np.uint8).copy()
        return EncodedTensor(layout.name, tuple(tensor.shape), "none", None, (), (), raw, (), crc32(raw))
    if shards is None:
        k = auto_shards(numel)
    else:
        if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
            raise ConfigError(f"shards must be a positive integer, got {shards!r}")
        k = min(shards, numel)
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    words = layout.words(t)
    exp = np.empty(numel, dtype=np.uint8)
    raw = np.empty(numel * layout.raw_width, dtype=np.uint8)
    layout.split(words, exp, raw)
    bounds = [numel * i // k for i in range(k + 1)] if k else [0]
    pieces = [exp[bounds[i] : bounds[i + 1]] for i in range(k)]
    if threads > 1 and k > 1:
        compressed = list(_pool(threads).map(shard_codec.compress, pieces))
    else:
        compressed = [shard_codec.compress(p) for p in pieces]
    return EncodedTensor(
        dtype=layout.name,
        shape=tuple(tensor.shape),
        codec=shard_codec.name,
        level=level,
        exp_shards=tuple(compressed),
        shard_elems=tuple(bounds[i + 1] - bounds[i] for i in range(k)),
        raw=raw,
        exp_crc32=tuple(crc32(c) for c in compressed),
        raw_crc32=crc32(raw),
    )


def _check_out(enc: EncodedTensor, out: torch.Tensor | None) -> torch.Tensor:
    layout = layout_for(enc.dtype)
    if out is None:
        return torch.empty(enc.shape, dtype=layout.torch_dtype)
    if out.dtype != layout.torch_dtype or tuple(out.shape) != tuple(enc.shape):
        raise ConfigError(
            f"decode out= must be a {enc.dtype} tensor of shape {list(enc.shape)}, got {out.dtype} {list(out.shape)}"
        )
    if out.device.type != "cpu" or not out.is_contiguous():
        raise ConfigError("decode out= must be a contiguous CPU tensor")
    return out


def _raw_plane(enc: EncodedTensor) -> np.ndarray:
    """The uncompressed (sign+mantissa) plane as uint8, without a copy."""
    return enc.raw if isinstance(enc.raw, np.ndarray) else np.frombuffer(enc.raw, dtype=np.uint8)


def _check_raw(enc: EncodedTensor, raw: np.ndarray, layout) -> None:
    """A raw plane of the wrong size is a damaged store: refused before anything is recombined from it."""
    if raw.size != enc.numel * layout.raw_width:
        raise StoreCorruptError(f"raw plane holds {raw.size} bytes, expected {enc.numel * layout.raw_width}")


def _shard_tasks(enc: EncodedTensor, exp: np.ndarray, words: np.ndarray):
    """One closure per shard: decompress into ``exp`` and recombine that range into ``words``."""
    layout = layout_for(enc.dtype)
    codec = get_codec(enc.codec, enc.level)
    raw = _raw_plane(enc)
    if enc.codec == "none":
        if raw.size != enc.numel * layout.itemsize:
            raise StoreCorruptError(
                f"raw tensor holds {raw.size} bytes, expected {enc.numel * layout.itemsize}"
            )
        if words is None:
            return []

        def copy():
            np.copyto(words, raw.view(layout.word))

        return [copy]
    if words is not None:  # decompressing alone needs no raw plane
        _check_raw(enc, raw, layout)
    if sum(enc.shard_elems) != enc.numel:
        raise StoreCorruptError(f"shards cover {sum(enc.shard_elems)} elements, tensor has {enc.numel}")
    tasks = []
    start = 0
    exp_mv = memoryview(exp)
    for shard, n in zip(enc.exp_shards, enc.shard_elems):
        a, b = start, start + n

        def task(shard=shard, a=a, b=b):
            codec.decompress_into(shard, exp_mv[a:b])
            if words is not None:
                layout.merge(exp, raw, words, a, b)

        tasks.append(task)
        start = b
    return tasks


def _run(tasks, threads: int) -> None:
    if threads <= 1 or len(tasks) <= 1:
        for t in tasks:
            t()
        return
    # Spread tasks over `threads` lanes; each lane runs its share in order (one pool item per lane).
    lanes = [tasks[i::threads] for i in range(min(threads, len(tasks)))]
    futures = [_pool(threads).submit(lambda lane=lane: [t() for t in lane]) for lane in lanes]
    for f in futures:
        f.result()


def decode_many(
    items: Sequence[tuple[EncodedTensor, torch.Tensor | None]],
    *,
    threads: int | None = None,
    verify: bool = False,
) -> list[torch.Tensor]:
    """Decode several tensors in one parallel batch of shard tasks (blocks until all are done).

    ``items`` pairs each EncodedTensor with an output tensor to fill (contiguous CPU, matching dtype and
    shape; the caller owns it) or ``None`` to allocate one. With ``verify`` every chunk's CRC-32 is
    checked before anything is decoded (ChecksumError). Returns the output tensors in order.
    """
    threads = _check_threads(threads)
    if verify:
        for i, (enc, _) in enumerate(items):
            enc.verify(f"tensor {i}")
    outs, tasks = [], []
    for enc, out in items:
        out = _check_out(enc, out)
        layout = layout_for(enc.dtype)
        exp = np.empty(enc.numel, dtype=np.uint8)
        tasks += _shard_tasks(enc, exp, layout.words(out))
        outs.append(out)
    _run(tasks, threads)
    return outs


def decode(
    encoded: EncodedTensor,
    *,
    out: torch.Tensor | None = None,
    threads: int | None = None,
    verify: bool = False,
) -> torch.Tensor:
    """Decode an EncodedTensor back to a tensor bit-identical to the one encoded.

    Shards are decompressed in parallel on ``threads`` threads (default: ``ZIPMOE_CODEC_THREADS`` or the
    CPU count), each with its own decompressor, into a preallocated buffer; ``out`` may be given to decode
    in place. Blocks until done. Raises StoreCorruptError on damaged frames, ChecksumError (with
    ``verify``) on a checksum mismatch.
    """
    return decode_many([(encoded, out)], threads=threads, verify=verify)[0]


def decode_shards(
    encoded: EncodedTensor, lo: int, hi: int, *, planes_only: bool = False, out: np.ndarray | None = None
):
    """Decode only exponent shards ``[lo, hi)`` of a tensor (the elements they cover), on this thread.

    Returns ``(first_element, words)`` (unsigned words of those elements), or with ``planes_only``
    ``(first_element, exponent_bytes, raw_bytes)`` for recombination elsewhere (raw planes of one byte per
    element only: bfloat16 and float16). Lets several workers decode pieces of one tensor in parallel;
    with ``out`` (the whole tensor's unsigned words, shared by the workers) each writes its elements in
    place, and ``words`` is a view of ``out``."""
    layout = layout_for(encoded.dtype)
    if encoded.codec == "none" or not 0 <= lo < hi <= encoded.shards:
        raise ConfigError(f"cannot decode shards [{lo}, {hi}) of a tensor with {encoded.shards} shards")
    a, b = shard_range(encoded, lo, hi)
    if planes_only and layout.raw_width != 1:
        raise ConfigError(f"{encoded.dtype}: piecewise plane output needs one raw byte per element")
    exp = np.empty(encoded.numel, dtype=np.uint8)  # only [a, b) is touched
    if out is not None and (out.dtype != layout.word or out.size != encoded.numel):
        raise ConfigError(f"out must be {encoded.numel} {layout.word} words, got {out.size} {out.dtype}")
    words = None if planes_only else (out if out is not None else np.empty(encoded.numel, dtype=layout.word))
    for t in _shard_tasks(encoded, exp, words)[lo:hi]:
        t()
    if planes_only:
        return a, exp[a:b], _raw_plane(encoded)[a:b]
    return a, words[a:b]


def shard_range(encoded: EncodedTensor, lo: int, hi: int) -> tuple[int, int]:
    """The elements ``[a, b)`` that exponent shards ``[lo, hi)`` of a tensor cover."""
    a = sum(encoded.shard_elems[:lo])
    return a, a + sum(encoded.shard_elems[lo:hi])


def decompress_shards(encoded: EncodedTensor, lo: int, hi: int, exp: np.ndarray) -> tuple[int, int]:
    """Decompress exponent shards ``[lo, hi)`` into their elements of ``exp`` (uint8, the whole plane) on
    this thread, without the raw plane (which may still be on its way: ``encoded.raw`` is not read); returns
    the elements ``[a, b)`` written. Recombine them later with :func:`recombine`."""
    if encoded.codec == "none" or not 0 <= lo < hi <= encoded.shards:
        raise ConfigError(f"cannot decode shards [{lo}, {hi}) of a tensor with {encoded.shards} shards")
    if exp.dtype != np.uint8 or exp.size != encoded.numel:
        raise ConfigError(f"exp must be a uint8 array of {encoded.numel} elements")
    for t in _shard_tasks(encoded, exp, None)[lo:hi]:
        t()
    return shard_range(encoded, lo, hi)


def recombine(encoded: EncodedTensor, exp: np.ndarray, words: np.ndarray, a: int, b: int) -> None:
    """Recombine elements ``[a, b)`` of a tensor into ``words`` (its unsigned words) from ``exp`` (its whole
    exponent plane, as decompress_shards wrote it) and its raw plane, once that is in (its size checked:
    StoreCorruptError)."""
    layout = layout_for(encoded.dtype)
    raw = _raw_plane(encoded)
    _check_raw(encoded, raw, layout)
    layout.merge(exp, raw, words, a, b)


def decompress_exponents(
    encoded: EncodedTensor, *, out: np.ndarray | None = None, threads: int | None = None
) -> np.ndarray:
    """Decompress only the compressed plane (uint8, one byte per element), leaving recombination to the
    caller, e.g. on a GPU with ``layout_for(dtype).merge_torch``. This is the CPU's share of the GPU path."""
    threads = _check_threads(threads)
    exp = np.empty(encoded.numel, dtype=np.uint8) if out is None else out
    if exp.dtype != np.uint8 or exp.size != encoded.numel:
        raise ConfigError(f"out must be a uint8 array of {encoded.numel} elements")
    _run(_shard_tasks(encoded, exp, None), threads)
    return exp
