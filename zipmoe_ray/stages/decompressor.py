"""Decompressor: one decode lane. Turns an expert's stored bytes back into its weights.

Inputs are the expert's extent (COMPRESSED form or a disk read) or its two regions held apart (the SM
form plus the exponent region just read). Every chunk's CRC-32 is checked before anything is decoded:
a damaged chunk raises ChecksumError naming the layer, expert and tensor, and is never computed with.

Output is one flat array with all the expert's tensors back to back in canonical order (gate, up, down),
so the executor's fused gate_up projection is a view. With ``planes_only`` (recombination on the
accelerator) the output is instead [exponent planes | raw planes] of all tensors, for merge on the device.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

from ..codec import (
    decode_many,
    decode_shards,
    decompress_exponents,
    decompress_shards,
    encode,
    layout_for,
    recombine,
)
from ..codec.encoded import crc32
from ..errors import ChecksumError, ConfigError, StoreCorruptError
from ..store import open_store
from .protocol import Later

__all__ = ["Decompressor"]

log = logging.getLogger(__name__)


def _piece_shards(shards: int, part: tuple[int, int]) -> tuple[int, int]:
    """The exponent shards ``[lo, hi)`` of a tensor that piece ``part`` = (i, n) decodes."""
    i, n = part
    return i * shards // n, (i + 1) * shards // n


class Decompressor:
    """Plain class; the Ray backend wraps it in an actor, the local backend runs one per thread."""

    def __init__(self, store_path: str, lane: int = 0):
        self.store = open_store(store_path)
        self.lane = lane
        self._busy = 0.0
        self._tasks = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._born = time.monotonic()
        dtypes = {t.dtype for r in self.store.index.experts for t in r.tensors}
        if len(dtypes) != 1:
            raise ConfigError(
                f"the runtime needs every expert tensor in one dtype; this store has {sorted(dtypes)}"
            )
        self.layout = layout_for(dtypes.pop())

    def _account(self, t0: float, nbytes: int) -> None:
        with self._lock:
            self._busy += time.monotonic() - t0
            self._tasks += 1
            self._bytes += nbytes

    def _encoded(self, layer, expert, extent, exp, sm):
        if extent is not None:
            return self.store.encoded_tensors(layer, expert, extent)
        if exp is None or sm is None:
            raise ValueError("decode needs an extent, or both its exponent and sign+mantissa regions")
        return self.store.encoded_from_parts(layer, expert, exp, sm)

    def decode(
        self,
        layer: int,
        expert: int,
        extent: np.ndarray | None = None,
        exp: np.ndarray | None = None,
        sm: np.ndarray | None = None,
        planes_only: bool = False,
        part: tuple[int, int] | None = None,
        out: np.ndarray | None = None,
    ):
        """Verify and decode one expert; returns the flat weights as unsigned words (or the planes).

        With ``part=(i, n)``: only the i-th of n pieces of every tensor's exponent shards, returned as a
        list of ``(flat_offset, words)`` (or ``(flat_offset, exponent_bytes, raw_bytes)`` with
        ``planes_only``) for the executor to place; only the chunks of that piece are checksummed and
        decoded, so n workers decode one expert in parallel. With ``out`` (the expert's flat words, shared
        by the workers of one process) a piece is written in place and ``out`` is returned: no copy."""
        t0 = time.monotonic()
        rec = self.store.record(layer, expert)
        if isinstance(sm, Later):
            if extent is None and exp is not None and not planes_only:
                return self._decode_exponents_first(rec, exp, sm, part, out, t0)
            sm = sm.get()
        encs = self._encoded(layer, expert, extent, exp, sm)
        if part is not None:
            pieces = self._decode_part(rec, encs, part, planes_only, t0, out)
            return out if out is not None else pieces
        for t, enc in zip(rec.tensors, encs):
            enc.verify(rec.label(t.name))
        try:
            if planes_only:
                out = np.empty(rec.numel * (1 + self.layout.raw_width), dtype=np.uint8)
                pos, rpos = 0, rec.numel
                for enc in encs:
                    decompress_exponents(enc, out=out[pos : pos + enc.numel], threads=1)
                    out[rpos : rpos + enc.raw_nbytes] = np.frombuffer(enc.raw, dtype=np.uint8)
                    pos += enc.numel
                    rpos += enc.raw_nbytes
            else:
                flat = torch.empty(rec.numel, dtype=self.layout.torch_dtype)
                views, pos = [], 0
                for t in rec.tensors:
                    views.append(flat[pos : pos + t.numel].view(t.shape))
                    pos += t.numel
                decode_many(list(zip(encs, views)), threads=1)
                out = self.layout.words(flat)
        except StoreCorruptError as e:
            raise StoreCorruptError(f"{rec.label()}: {e}") from None
        self._account(t0, rec.original_bytes)
        return out

    def _decode_part(self, rec, encs, part, planes_only, t0, into=None):
        out, pos, nbytes = [], 0, 0
        spans = [_piece_shards(enc.shards, part) for enc in encs]
        for t, enc, (lo, hi) in zip(rec.tensors, encs, spans):  # every chunk this piece reads, first
            if hi > lo:
                enc.verify_shards(lo, hi, rec.label(t.name))
                enc.verify_raw(rec.label(t.name))
        try:
            for t, enc, (lo, hi) in zip(rec.tensors, encs, spans):
                if hi > lo:
                    view = into[pos : pos + t.numel] if into is not None else None
                    first, *data = decode_shards(enc, lo, hi, planes_only=planes_only, out=view)
                    out.append((pos + first, *data))
                    nbytes += (data[0].size) * self.layout.itemsize
                pos += t.numel
        except StoreCorruptError as e:
            raise StoreCorruptError(f"{rec.label()}: {e}") from None
        self._account(t0, nbytes)
        return out

    def _decode_exponents_first(self, rec, exp, later: Later, part, into, t0):
        """``decode`` with the SM region still being read: every exponent shard of the piece is checked and
        decompressed first, then the lane waits for the SM region, checks it and recombines. Nothing is
        written to the output before every chunk it is made from has passed its checksum."""
        i, n = part or (0, 1)
        empty = np.empty(0, np.uint8)
        store, layout = self.store, self.layout
        try:
            work = []  # (tensor, its offset in the flat weights, exponent plane, [a, b) elements decoded)
            pos = 0
            for t in rec.tensors:
                enc = t.encoded_parts(exp, empty, rec.e_length, store.codec, store.level)
                lo, hi = _piece_shards(enc.shards, (i, n))
                if hi > lo:
                    enc.verify_shards(lo, hi, rec.label(t.name))
                    plane = np.empty(t.numel, np.uint8)  # only [a, b) is written
                    work.append((t, pos, plane, decompress_shards(enc, lo, hi, plane)))
                pos += t.numel
            waited = time.monotonic()
            sm = later.get()  # the SM region: the read has finished by now, or the lane waits for it here
            waited = time.monotonic() - waited
            encs = store.encoded_from_parts(rec.layer, rec.expert, exp, sm)
            by_name = {t.name: enc for t, enc in zip(rec.tensors, encs)}
            for t, _, _, _ in work:  # every piece checks the planes it reads (ISA-L: ~0.2 ms per 8 MB)
                by_name[t.name].verify_raw(rec.label(t.name))
            words = into
            if words is None and part is None:
                flat = torch.empty(rec.numel, dtype=layout.torch_dtype)
                words = layout.words(flat)
            pieces, nbytes = [], 0
            for t, pos, plane, (a, b) in work:
                dst = words[pos : pos + t.numel] if words is not None else np.empty(t.numel, layout.word)
                recombine(by_name[t.name], plane, dst, a, b)
                pieces.append((pos + a, dst[a:b]))
                nbytes += (b - a) * layout.itemsize
        except ChecksumError:
            raise  # names the layer, expert, tensor and chunk already
        except StoreCorruptError as e:
            raise StoreCorruptError(f"{rec.label()}: {e}") from None
        self._account(t0 + waited, nbytes)  # busy time: the wait for the read is the I/O lane's, not ours
        return words if (part is None or into is not None) else pieces

    def derive(self, layer: int, expert: int, words: np.ndarray, part: str) -> np.ndarray | None:
        """Rebuild the SM region (``part='raw'``) or the whole extent (``part='all'``) of an expert from its
        decoded weights (a FULL expert demoted without reading the disk). Every chunk is checked against the
        index; returns None when re-encoding does not reproduce the stored bytes (a different zstd build)."""
        t0 = time.monotonic()
        rec = self.store.record(layer, expert)
        flat = torch.from_numpy(np.asarray(words).view(self.layout.word).copy()).view(self.layout.torch_dtype)
        chunks_e, chunks_sm, pos = [], [], 0
        for t in rec.tensors:
            x = flat[pos : pos + t.numel]
            pos += t.numel
            if part == "raw":
                w = self.layout.words(x)
                e_plane = np.empty(t.numel, np.uint8)
                raw = np.empty(t.numel * self.layout.raw_width, np.uint8)
                self.layout.split(w, e_plane, raw)
                if crc32(raw) != t.raw.crc32:
                    return None
                chunks_sm.append(raw)
            else:
                enc = encode(x, codec=self.store.codec, level=self.store.level, shards=len(t.shards) or None)
                if tuple(enc.exp_crc32) != tuple(s.crc32 for s in t.shards) or enc.raw_crc32 != t.raw.crc32:
                    return None
                chunks_e.extend(enc.exp_shards)
                chunks_sm.append(np.asarray(enc.raw))
        parts = chunks_sm if part == "raw" else [*chunks_e, *chunks_sm]
        out = (
            np.concatenate([np.frombuffer(c, dtype=np.uint8) for c in parts])
            if parts
            else np.empty(0, np.uint8)
        )
        self._account(t0, 0)
        return out

    def calibrate(self, keys: list[tuple[int, int]] | None = None, min_bytes: int = 32 << 20) -> dict:
        """Measure this lane's full-decode and decompress-only rates on real extents of the store."""
        from ..schedule.costs import measure_decode

        keys = keys or self.store.experts()[:4]
        full, exp = measure_decode(self.store, keys, min_bytes)
        return {"decode_bps": full, "decompress_bps": exp}

    def stats(self) -> dict:
        with self._lock:
            return {
                "lane": self.lane,
                "tasks": self._tasks,
                "decoded_bytes": self._bytes,
                "busy_s": self._busy,
                "uptime_s": time.monotonic() - self._born,
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._busy, self._tasks, self._bytes, self._born = 0.0, 0, 0, time.monotonic()

    def ping(self) -> bool:
        return True
