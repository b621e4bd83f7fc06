"""Reading a store: ``open_store(path)`` and the :class:`Store` object.

Opening checks the index (magic, format version, checksum, then every field against the schema: types,
ranges, offsets inside their files, paths confined to the store), every data file (present, inside the
store directory, not truncated, header naming this store and layer), and the CRC-32 of every small file
the model and tokenizer are read from (config, tokenizer, generation config), so a damaged or mismatched
store fails at open, not halfway through a generation. The non-expert weights are checked tensor by
tensor by :meth:`Store.check_dense` before the executor loads them, and every expert chunk against its
CRC-32 before it is decoded (``verify=False`` skips that only for callers that checked already).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..codec import decode_many, layout_for
from ..codec.encoded import EncodedTensor
from ..errors import ChecksumError, StoreCorruptError, StoreError
from .files import check_data_files, check_dense, check_small_files, check_uncovered, confined
from .format import (
    DENSE_VARIANT,
    INDEX_NAME,
    PARTIAL_DIR,
    ExpertRecord,
    StoreIndex,
    align_up,
    loads_index,
)
from .io import BandwidthLimiter, ExtentReader, ReadOptions, aligned_empty

__all__ = ["Store", "open_store"]

log = logging.getLogger(__name__)

PARTS = ("all", "exp", "raw")


def open_store(
    path: str | os.PathLike,
    *,
    read_options: ReadOptions | None = None,
    limiter: BandwidthLimiter | None = None,
    check_files: bool = True,
) -> Store:
    """Open a store directory written by ``zipmoe compress``.

    ``read_options`` chooses page-cache bypass and an emulated bandwidth cap (see io.ReadOptions); readers
    given the same ``limiter`` share one emulated device. Raises StoreError (incomplete or not a store),
    FormatVersionError, StoreCorruptError (damaged or malformed index, truncated or foreign data file, a
    path outside the store, a file the model would read that the index does not cover), ChecksumError
    (a damaged config or tokenizer file; with ``check_files=False`` those are left to the caller).

    Example:
        >>> store = open_store("tiny-qwen.zmoe")  # doctest: +SKIP
        >>> tensors = store.read_expert(*store.experts()[0])  # doctest: +SKIP
    """
    return Store(path, read_options=read_options, limiter=limiter, check_files=check_files)


class Store:
    """A complete store. Cheap to pickle: it reopens its files in the receiving process."""

    def __init__(
        self,
        path,
        *,
        read_options: ReadOptions | None = None,
        limiter: BandwidthLimiter | None = None,
        check_files: bool = True,
    ):
        """``check_files=False`` skips the CRC-32 of config, tokenizer and other small files and the check
        for uncovered ones (``zipmoe verify`` reports those itself instead of refusing to open)."""
        self.path = Path(path).expanduser()
        self.read_options = read_options or ReadOptions()
        self._limiter = limiter
        index_path = self.path / INDEX_NAME
        if not self.path.is_dir():
            raise StoreError(
                f"{self.path}: no such store directory; create one with `zipmoe compress MODEL_DIR STORE_DIR`"
            )
        if not index_path.is_file():
            if (self.path / PARTIAL_DIR).exists():
                raise StoreError(
                    f"{self.path}: the compression into this store was interrupted and never finished; "
                    "run the same `zipmoe compress` command again to resume it"
                )
            raise StoreError(
                f"{self.path}: not a zipmoe store (no {INDEX_NAME}); create one with `zipmoe compress`"
            )
        self.index: StoreIndex = loads_index(index_path.read_bytes(), str(index_path))
        self._records = {(e.layer, e.expert): e for e in self.index.experts}
        self._root = os.path.realpath(self.path)
        check_data_files(self.index, self.file_path)
        if check_files:
            check_small_files(self.index, self.file_path)
            check_uncovered(self.path, self.index)
        self.reader = ExtentReader(str(self.path), self.read_options, limiter)

    # -- pickling: the reader holds file descriptors, so it is rebuilt on the other side
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "read_options": self.read_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], read_options=state["read_options"])

    def file_path(self, rel: str) -> Path:
        """The path of a file the index names, after checking that it resolves (symlinks too) inside the
        store directory; raises StoreCorruptError otherwise."""
        return confined(self.path, self._root, rel)

    def check_dense(self) -> None:
        """Check the non-expert weights against the index, tensor by tensor, before anything loads them.
        Blocks (reads them once: the page cache then serves the load). Raises ChecksumError naming the file
        and tensor, StoreCorruptError for a missing or truncated file."""
        check_dense(self.path, self.index, self.file_path)

    # -- what is in the store
    @property
    def model_type(self) -> str:
        return self.index.source["model_type"]

    @property
    def num_experts(self) -> int:
        return int(self.index.source["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.index.source["top_k"])

    @property
    def codec(self) -> str:
        return self.index.codec["codec"]

    @property
    def level(self) -> int | None:
        return self.index.codec["level"]

    def config(self) -> dict[str, Any]:
        try:
            return json.loads(self.file_path("config.json").read_text())
        except (OSError, ValueError) as e:
            raise StoreCorruptError(f"{self.path}: config.json cannot be read ({e})") from None

    def experts(self) -> list[tuple[int, int]]:
        """Every ``(layer, expert)`` key, sorted."""
        return sorted(self._records)

    def layers(self) -> list[int]:
        """The MoE layer ids, sorted (decoder layer numbers; for Switch, decoder blocks follow encoder ones)."""
        return [layer["layer"] for layer in self.index.layers]

    def layer_info(self, layer: int) -> dict[str, Any]:
        for info in self.index.layers:
            if info["layer"] == layer:
                return info
        raise KeyError(f"store has no MoE layer {layer}; layers are {self.layers()}")

    def record(self, layer: int, expert: int) -> ExpertRecord:
        try:
            return self._records[(layer, expert)]
        except KeyError:
            raise KeyError(
                f"store has no expert ({layer}, {expert}); it has layers {self.layers()} with "
                f"{self.num_experts} experts each"
            ) from None

    @property
    def expert_bytes_original(self) -> int:
        return sum(e.original_bytes for e in self.index.experts)

    @property
    def expert_bytes_stored(self) -> int:
        return sum(e.length for e in self.index.experts)

    def dense_files(self) -> list[Path]:
        return [self.file_path(f["name"]) for f in self.index.dense["files"]]

    @property
    def dense_variant(self) -> str:
        """The transformers ``variant`` under which the non-expert weights are saved."""
        return DENSE_VARIANT

    # -- reading bytes
    def extent_span(self, layer: int, expert: int, part: str = "all") -> tuple[int, int]:
        """(offset within the extent, length) of ``part``: the whole extent, its E region or SM region."""
        rec = self.record(layer, expert)
        if part == "all":
            return 0, rec.length
        if part == "exp":
            return 0, rec.e_length
        if part == "raw":
            return rec.e_length, rec.sm_length
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")

    def read_extent(
        self, layer: int, expert: int, part: str = "all", out: np.ndarray | None = None
    ) -> np.ndarray:
        """The stored bytes of an expert (``part``: all, exp = compressed exponent shards, raw = sign+mantissa
        planes) as a uint8 array: one contiguous read. ``out`` may supply the buffer (see ExtentReader.read).
        Not checksummed here: chunks are checked when decoded (or with :meth:`verify_chunks`)."""
        rec = self.record(layer, expert)
        rel, length = self.extent_span(layer, expert, part)
        if part == "raw" and self.reader.options.read_mode in ("direct", "bypass"):
            # O_DIRECT reads start on a 4 KiB boundary: read from the aligned start below the SM region.
            start = rec.offset + rel
            base = start - start % 4096
            buf = self.reader.read(rec.file, base, start - base + length, out, (layer, expert, part))
            return buf[start - base :]
        return self.reader.read(rec.file, rec.offset + rel, length, out, (layer, expert, part))

    def alloc_extent(self, layer: int, expert: int, part: str = "all") -> np.ndarray:
        """An aligned buffer big enough for :meth:`read_extent` of ``part`` (reusable by the caller)."""
        _, length = self.extent_span(layer, expert, part)
        return aligned_empty(align_up(length) + 4096)

    def encoded_tensors(
        self, layer: int, expert: int, extent: np.ndarray | memoryview | bytes, part: str = "all"
    ) -> list[EncodedTensor]:
        """EncodedTensors viewing ``extent`` (as returned by read_extent(part='all')).

        For an SM-only cache form pass the raw region as ``extent`` with ``part='raw'`` together with the
        exponent region via :meth:`join_parts`."""
        rec = self.record(layer, expert)
        if part != "all":
            raise ValueError("encoded_tensors needs the whole extent; combine parts with join_parts first")
        mv = memoryview(extent)
        if len(mv) < rec.length:
            raise StoreCorruptError(
                f"{rec.label()}: extent buffer holds {len(mv)} bytes, expected {rec.length}"
            )
        return [t.encoded(mv, self.codec, self.level) for t in rec.tensors]

    def encoded_from_parts(
        self, layer: int, expert: int, exp: np.ndarray | memoryview, sm: np.ndarray | memoryview
    ) -> list[EncodedTensor]:
        """EncodedTensors viewing an extent held as its E region and SM region (the SM-only form plus the
        exponent region just read): no copy."""
        rec = self.record(layer, expert)
        if memoryview(exp).nbytes < rec.e_length or memoryview(sm).nbytes < rec.sm_length:
            raise StoreCorruptError(f"{rec.label()}: region buffers are shorter than the index says")
        return [t.encoded_parts(exp, sm, rec.e_length, self.codec, self.level) for t in rec.tensors]

    def join_parts(self, layer: int, expert: int, exp: np.ndarray, raw: np.ndarray) -> np.ndarray:
        """One extent buffer from separately held E and SM regions (copies; used by the SM-only form)."""
        rec = self.record(layer, expert)
        buf = np.empty(rec.length, dtype=np.uint8)
        buf[: rec.e_length] = exp[: rec.e_length]
        buf[rec.e_length :] = raw[: rec.sm_length]
        return buf

    def verify_chunks(self, layer: int, expert: int, extent: np.ndarray | memoryview | bytes) -> None:
        """Check every chunk's CRC-32 in an extent buffer; raises ChecksumError naming the expert and tensor."""
        rec = self.record(layer, expert)
        for t, enc in zip(rec.tensors, self.encoded_tensors(layer, expert, extent)):
            enc.verify(rec.label(t.name))

    def verify_part(self, layer: int, expert: int, part: str, buf: np.ndarray | memoryview | bytes) -> None:
        """Check the chunks of one region (``exp`` or ``raw``) of an extent held on its own."""
        from ..codec.encoded import crc32

        rec = self.record(layer, expert)
        mv = memoryview(buf)
        base = 0 if part == "exp" else rec.e_length
        for t in rec.tensors:
            refs = t.shards if part == "exp" else (t.raw,)
            for i, ref in enumerate(refs):
                got = crc32(mv[ref.offset - base : ref.offset - base + ref.length])
                if got != ref.crc32:
                    chunk = f"exponent shard {i}" if part == "exp" else "sign+mantissa chunk"
                    raise ChecksumError(
                        f"{rec.label(t.name)}: {chunk} fails its checksum (crc32 {got:08x}, expected "
                        f"{ref.crc32:08x}); the data is damaged"
                    )

    def decode_extent(
        self,
        layer: int,
        expert: int,
        extent: np.ndarray | memoryview | bytes,
        *,
        out: torch.Tensor | None = None,
        threads: int | None = 1,
        verify: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Decode an extent into ``{name: tensor}``; all tensors are views of one contiguous buffer (``out``,
        a flat tensor of the expert's numel, or a new one), in canonical role order."""
        rec = self.record(layer, expert)
        encs = self.encoded_tensors(layer, expert, extent)
        if verify:
            for t, enc in zip(rec.tensors, encs):
                enc.verify(rec.label(t.name))
        dtypes = {t.dtype for t in rec.tensors}
        flat = None
        if len(dtypes) == 1:
            dtype = layout_for(dtypes.pop()).torch_dtype
            if out is None:
                flat = torch.empty(rec.numel, dtype=dtype)
            else:
                if out.dtype != dtype or out.numel() != rec.numel or not out.is_contiguous():
                    raise ValueError(f"out must be a contiguous {dtype} tensor of {rec.numel} elements")
                flat = out.view(-1)
        views, pos = [], 0
        for t in rec.tensors:
            if flat is not None:
                views.append(flat[pos : pos + t.numel].view(t.shape))
            else:
                views.append(torch.empty(t.shape, dtype=layout_for(t.dtype).torch_dtype))
            pos += t.numel
        try:
            decode_many(list(zip(encs, views)), threads=threads)
        except StoreCorruptError as e:
            raise StoreCorruptError(f"{rec.label()}: {e}") from None
        return {t.name: v for t, v in zip(rec.tensors, views)}

    def read_expert(
        self, layer: int, expert: int, *, threads: int | None = 1, verify: bool = True
    ) -> dict[str, torch.Tensor]:
        """Read and decode one expert: ``{checkpoint_tensor_name: tensor}`` bit-identical to the checkpoint
        (a fused 3D checkpoint tensor's slice is named ``name[expert]``). One read; chunks are
        checksummed before decoding (ChecksumError names layer, expert and tensor)."""
        extent = self.read_extent(layer, expert)
        return self.decode_extent(layer, expert, extent, threads=threads, verify=verify)

    def iter_experts(self, keys: Iterable[tuple[int, int]] | None = None, **kw):
        for key in keys if keys is not None else self.experts():
            yield key, self.read_expert(*key, **kw)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Store({str(self.path)!r}, {self.model_type}, {len(self.layers())} MoE layers x "
            f"{self.num_experts} experts, {self.codec})"
        )
