"""`zipmoe verify`: every checksum, every padding byte, every decode; optionally bit equality with the
checkpoint the store was made from."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from ..codec import layout_for
from ..codec.encoded import crc32
from ..errors import StoreMismatchError, ZipMoEError
from .checkpoint import Checkpoint
from .dense import check_dense_file
from .durable import file_crc32
from .files import check_uncovered
from .reader import Store, open_store
from .writer import Progress, _NoProgress

__all__ = ["VerifyReport", "verify_store"]

log = logging.getLogger(__name__)

MAX_FAILURES = 50


@dataclass
class VerifyReport:
    store: str
    against: str | None = None
    experts: int = 0
    tensors: int = 0
    chunks: int = 0
    bytes: int = 0
    compared_tensors: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, message: str) -> None:
        if len(self.failures) < MAX_FAILURES:
            self.failures.append(message)
        elif len(self.failures) == MAX_FAILURES:
            self.failures.append("... more failures not listed")

    def summary(self) -> str:
        if self.ok:
            what = f"; bit-identical to {self.against}" if self.against else ""
            return (
                f"OK: {self.experts} experts, {self.tensors} tensors, {self.chunks} chunks checksummed "
                f"({self.bytes / 1e6:.1f} MB){what}"
            )
        return (
            f"FAILED: {len([f for f in self.failures if not f.startswith('...')])} problem(s) in {self.store}"
        )


def _bits(t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    return t.contiguous().view(
        {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    )


def verify_store(
    store_dir: str | os.PathLike,
    against: str | os.PathLike | None = None,
    progress: Progress | None = None,
    *,
    decode: bool = True,
) -> VerifyReport:
    """Check a store; returns a report whose ``failures`` name the layer, expert and tensor of each problem.

    Without ``against``: the index, every data file header, every chunk's CRC-32, zero padding, that every
    tensor decodes and that its decoded bits have the CRC-32 recorded from the original tensor, the dense
    weights tensor by tensor and the CRC-32 of the auxiliary files. ``decode=False`` checks every byte's
    checksum but decodes nothing (what ``--verify`` runs before serving). With ``against`` (the checkpoint
    directory): also its fingerprint and every tensor, expert and dense, bit for bit. Blocks (reads the
    whole store). Raises only for a store that cannot be opened at all (StoreError and subclasses) or a
    checkpoint that cannot be read.
    """
    progress = progress or _NoProgress()
    store: Store = open_store(store_dir, check_files=False)
    report = VerifyReport(str(store.path), str(against) if against else None)
    ckpt = None
    if against is not None:
        ckpt = Checkpoint(against)
        want = store.index.source["fingerprint"]
        if ckpt.fingerprint != want:
            raise StoreMismatchError(
                f"{store.path} was not made from {ckpt.path}: the checkpoint's fingerprint is "
                f"{ckpt.fingerprint[:16]}..., the store records {want[:16]}... (made from "
                f"{store.index.source.get('path')}); verify against the checkpoint it was compressed from"
            )
    records = sorted(store.index.experts, key=lambda r: (r.file, r.offset))
    progress.start(sum(r.original_bytes for r in records), sum(len(r.tensors) for r in records))
    for rec in records:
        report.experts += 1
        span = rec.padded_length
        try:
            buf = store.reader.read(rec.file, rec.offset, rec.length)
            pad = (
                store.reader.read(rec.file, rec.offset + rec.length, span - rec.length)
                if span > rec.length
                else None
            )
        except ZipMoEError as e:
            report.fail(f"{rec.label()}: {e}")
            continue
        report.bytes += rec.length
        if pad is not None and pad.any():
            report.fail(f"{rec.label()}: alignment padding after the extent is not zero (bytes were altered)")
        encs = store.encoded_tensors(rec.layer, rec.expert, buf)
        bad = False
        for t, enc in zip(rec.tensors, encs):
            report.tensors += 1
            report.chunks += enc.shards + 1
            try:
                enc.verify(rec.label(t.name))
            except ZipMoEError as e:
                report.fail(str(e))
                bad = True
        if bad or not decode:
            progress.advance(rec.original_bytes, len(rec.tensors))
            continue
        try:
            tensors = store.decode_extent(rec.layer, rec.expert, buf, verify=False)
        except ZipMoEError as e:
            report.fail(f"{rec.label()}: does not decode: {e}")
            progress.advance(rec.original_bytes, len(rec.tensors))
            continue
        for t in rec.tensors:
            x = tensors[t.name]
            if crc32(layout_for(t.dtype).words(x)) != t.source_crc32:
                report.fail(
                    f"{rec.label(t.name)}: decoded bits differ from the original tensor's recorded CRC-32"
                )
            if ckpt is not None:
                source = t.name.split("[")[0]
                index = int(t.name.split("[")[1].rstrip("]")) if "[" in t.name else None
                try:
                    ref = ckpt.tensor(source, index)
                except ZipMoEError as e:
                    report.fail(f"{rec.label(t.name)}: {e}")
                    continue
                report.compared_tensors += 1
                if (
                    ref.dtype != x.dtype
                    or tuple(ref.shape) != tuple(x.shape)
                    or not torch.equal(_bits(ref), _bits(x))
                ):
                    report.fail(f"{rec.label(t.name)}: differs from the checkpoint")
        progress.advance(rec.original_bytes, len(rec.tensors))
    for f in store.index.dense["files"]:
        try:
            check_dense_file(store.file_path(f["name"]), f)
        except ZipMoEError as e:
            report.fail(f"dense weights {f['name']}: {e}" if not str(e).startswith("dense") else str(e))
    aux = list(store.index.aux_files)
    if "index" in store.index.dense:
        aux.append(store.index.dense["index"])
    try:
        check_uncovered(store.path, store.index)
    except ZipMoEError as e:
        report.fail(str(e))
    for kind, files in (("file", aux),):
        for f in files:
            try:
                p = store.file_path(f["name"])
            except ZipMoEError as e:
                report.fail(str(e))
                continue
            if not p.is_file():
                report.fail(f"{kind} {f['name']}: missing")
            elif p.stat().st_size != f["size"]:
                report.fail(
                    f"{kind} {f['name']}: {p.stat().st_size} bytes, expected {f['size']} (truncated or altered)"
                )
            elif file_crc32(p) != f["crc32"]:
                report.fail(f"{kind} {f['name']}: fails its checksum (altered or damaged)")
    if ckpt is not None and not any(f.startswith("dense") for f in report.failures):
        _compare_dense(store, ckpt, report)
    store.close()
    return report


def _compare_dense(store: Store, ckpt: Checkpoint, report: VerifyReport) -> None:
    from safetensors import safe_open

    seen = set()
    for p in store.dense_files():
        with safe_open(str(p), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                seen.add(name)
                x = f.get_tensor(name)
                ref = ckpt.tensor(name)
                report.compared_tensors += 1
                if (
                    ref.dtype != x.dtype
                    or tuple(ref.shape) != tuple(x.shape)
                    or not torch.equal(_bits(ref), _bits(x))
                ):
                    report.fail(f"dense tensor {name}: differs from the checkpoint")
    missing = set(ckpt.dense_names) - seen
    for name in sorted(missing)[:10]:
        report.fail(f"dense tensor {name}: in the checkpoint but not in the store")
