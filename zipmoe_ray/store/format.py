"""The on-disk store format, version 1 (what users keep on disk for years).

A store directory::

    zipmoe-index.msgpack           the index; written last, atomically: its presence means "complete"
    experts/layer-0003.zmx         one data file per MoE layer: a 4 KiB header, then one extent per expert
    model.zipmoe-dense.safetensors the non-expert weights, unchanged (or shards + an index json)
    config.json, tokenizer*, ...   copied from the checkpoint
    .zipmoe-partial/               only while a compression is running or was interrupted

Index file: a msgpack map ``{"magic": "zipmoe-store", "format_version": 1, "body_crc32": c, "body": b}``
where ``body`` is the msgpack-encoded index (see :class:`StoreIndex`) and ``c`` its CRC-32. The outer map
stays readable when the body's schema changes, so a reader can always name the version it was given.
Every field of the body is checked against schema.py before use (types, ranges, chunks tiling their
extents, extents inside their files, paths inside the store directory).

Checksums cover every file served from: each chunk of each expert (below); each dense weights file by
size and CRC-32, plus (``dense.files[i]``: ``data_start``, ``header_crc32``, ``tensors: {name: [offset,
length, crc32]}``) its header and each tensor, and the shards' weight map (``dense.index``); every other
file copied from the checkpoint (config, generation config, tokenizer, chat template: ``aux_files``) by
size and CRC-32. The per-tensor fields and ``dense.index`` were added within version 1 as optional
fields: a store written before them is still read (its dense files are then checked whole, which
refuses damage but cannot name the tensor; re-compress it for that), so no version bump was needed.

Data file: a 4096-byte header (``MAGIC_DATA``, format version u32, store id 16 bytes, layer i32, zero
padding), then extents. Each expert is one contiguous extent starting on a 4 KiB boundary::

    [E region: tensor0 shard0 .. shardK-1, tensor1 shard0 ..][SM region: tensor0 raw, tensor1 raw, ..][0-pad]

The E region (compressed exponent shards of all tensors) comes first so that the "SM-only" cache form
needs one contiguous read of the extent's head. Every chunk (shard or raw plane) has a CRC-32 in the index;
padding is zero and ``zipmoe verify`` checks that too. Tensors appear in canonical role order (gate, up,
down), so an expert decodes into one buffer whose first two tensors form the fused gate_up projection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..codec.encoded import EncodedTensor, crc32
from ..errors import FormatVersionError, StoreCorruptError
from .schema import ALIGN, DATA_HEADER_SIZE, check_body

__all__ = [
    "ALIGN",
    "DATA_HEADER_SIZE",
    "DENSE_VARIANT",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "MAGIC_DATA",
    "MAGIC_INDEX",
    "PARTIAL_DIR",
    "ChunkRef",
    "ExpertRecord",
    "StoreIndex",
    "TensorRecord",
    "align_up",
    "data_header",
    "dumps_index",
    "loads_index",
    "parse_data_header",
]

FORMAT_VERSION = 1
MAGIC_INDEX = "zipmoe-store"
MAGIC_DATA = b"ZMOEXPRT"
INDEX_NAME = "zipmoe-index.msgpack"
PARTIAL_DIR = ".zipmoe-partial"
DENSE_VARIANT = "zipmoe-dense"  # transformers variant: model.zipmoe-dense.safetensors
_HEADER_STRUCT = struct.Struct("<8sI16si")


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def data_header(store_id: bytes, layer: int) -> bytes:
    head = _HEADER_STRUCT.pack(MAGIC_DATA, FORMAT_VERSION, store_id, layer)
    return head + bytes(DATA_HEADER_SIZE - len(head))


def parse_data_header(buf: bytes, path: str) -> tuple[int, bytes, int]:
    """(format_version, store_id, layer) of a data file header; StoreCorruptError when it is not one."""
    if len(buf) < _HEADER_STRUCT.size:
        raise StoreCorruptError(f"{path}: truncated (no complete header)")
    magic, version, store_id, layer = _HEADER_STRUCT.unpack_from(buf)
    if magic != MAGIC_DATA:
        raise StoreCorruptError(f"{path}: not a zipmoe expert data file (bad magic)")
    if len(buf) >= DATA_HEADER_SIZE and any(buf[_HEADER_STRUCT.size : DATA_HEADER_SIZE]):
        raise StoreCorruptError(f"{path}: the header's padding is not zero (its bytes were altered)")
    return version, store_id, layer


@dataclass(frozen=True)
class ChunkRef:
    """A chunk inside an extent: offset relative to the extent start, length, CRC-32."""

    offset: int
    length: int
    crc32: int

    def pack(self) -> list[int]:
        return [self.offset, self.length, self.crc32]


@dataclass(frozen=True)
class TensorRecord:
    name: str  # checkpoint name (``name[e]`` for a slice of a fused 3D tensor)
    role: str
    dtype: str  # "bfloat16" | "float16" | "float32"
    shape: tuple[int, ...]
    shard_elems: tuple[int, ...]
    shards: tuple[ChunkRef, ...]
    raw: ChunkRef
    entropy: float  # exponent-field entropy, bits per element
    source_crc32: int  # CRC-32 of the original tensor bytes, for verify --against

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def stored_bytes(self) -> int:
        return sum(s.length for s in self.shards) + self.raw.length

    def encoded(self, extent: memoryview | bytes, codec: str, level: int | None) -> EncodedTensor:
        """An EncodedTensor whose buffers are views into ``extent`` (no copy)."""
        mv = memoryview(extent)
        return EncodedTensor(
            dtype=self.dtype,
            shape=self.shape,
            codec=codec,
            level=level,
            exp_shards=tuple(mv[s.offset : s.offset + s.length] for s in self.shards),
            shard_elems=self.shard_elems,
            raw=mv[self.raw.offset : self.raw.offset + self.raw.length],
            exp_crc32=tuple(s.crc32 for s in self.shards),
            raw_crc32=self.raw.crc32,
        )

    def encoded_parts(
        self, exp: memoryview | bytes, sm: memoryview | bytes, e_length: int, codec: str, level: int | None
    ) -> EncodedTensor:
        """Like :meth:`encoded` for an extent held as two buffers: its E region and its SM region."""
        e, r = memoryview(exp), memoryview(sm)
        return EncodedTensor(
            dtype=self.dtype,
            shape=self.shape,
            codec=codec,
            level=level,
            exp_shards=tuple(e[s.offset : s.offset + s.length] for s in self.shards),
            shard_elems=self.shard_elems,
            raw=r[self.raw.offset - e_length : self.raw.offset - e_length + self.raw.length],
            exp_crc32=tuple(s.crc32 for s in self.shards),
            raw_crc32=self.raw.crc32,
        )

    def pack(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "shard_elems": list(self.shard_elems),
            "shards": [s.pack() for s in self.shards],
            "raw": self.raw.pack(),
            "entropy": self.entropy,
            "source_crc32": self.source_crc32,
        }

    @classmethod
    def unpack(cls, d: dict[str, Any]) -> TensorRecord:
        return cls(
            name=d["name"],
            role=d["role"],
            dtype=d["dtype"],
            shape=tuple(d["shape"]),
            shard_elems=tuple(d["shard_elems"]),
            shards=tuple(ChunkRef(*s) for s in d["shards"]),
            raw=ChunkRef(*d["raw"]),
            entropy=float(d["entropy"]),
            source_crc32=int(d["source_crc32"]),
        )


@dataclass(frozen=True)
class ExpertRecord:
    """Where one expert lives: its data file, extent and tensors."""

    layer: int
    expert: int
    file: str  # relative to the store directory
    offset: int  # absolute, 4 KiB aligned
    length: int  # bytes of chunks (unpadded)
    e_length: int  # bytes of the E region at the head of the extent
    tensors: tuple[TensorRecord, ...]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def original_bytes(self) -> int:
        from ..codec.planes import layout_for

        return sum(t.numel * layout_for(t.dtype).itemsize for t in self.tensors)

    @property
    def sm_length(self) -> int:
        return self.length - self.e_length

    @property
    def padded_length(self) -> int:
        return align_up(self.length)

    def label(self, tensor: str | None = None) -> str:
        s = f"layer {self.layer}, expert {self.expert}"
        return f"{s}, tensor {tensor}" if tensor else s

    def pack(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "expert": self.expert,
            "file": self.file,
            "offset": self.offset,
            "length": self.length,
            "e_length": self.e_length,
            "tensors": [t.pack() for t in self.tensors],
        }

    @classmethod
    def unpack(cls, d: dict[str, Any]) -> ExpertRecord:
        return cls(
            layer=d["layer"],
            expert=d["expert"],
            file=d["file"],
            offset=d["offset"],
            length=d["length"],
            e_length=d["e_length"],
            tensors=tuple(TensorRecord.unpack(t) for t in d["tensors"]),
        )


@dataclass
class StoreIndex:
    """The decoded index body."""

    store_id: bytes
    source: dict[str, Any]  # fingerprint, model_type, path, num_experts, top_k
    codec: dict[str, Any]  # name, level, shards (None = auto)
    layers: list[dict[str, Any]]  # layer, module, file, file_size, num_experts
    experts: list[ExpertRecord]
    dense: dict[str, Any]  # files: [{name, size, crc32}], num_tensors, bytes
    aux_files: list[dict[str, Any]]  # [{name, size, crc32}]
    created_by: str = ""
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def pack(self) -> dict[str, Any]:
        return {
            "store_id": self.store_id,
            "source": self.source,
            "codec": self.codec,
            "alignment": ALIGN,
            "layers": self.layers,
            "experts": [e.pack() for e in self.experts],
            "dense": self.dense,
            "aux_files": self.aux_files,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "extra": self.extra,
        }

    @classmethod
    def unpack(cls, d: dict[str, Any]) -> StoreIndex:
        return cls(
            store_id=d["store_id"],
            source=d["source"],
            codec=d["codec"],
            layers=d["layers"],
            experts=[ExpertRecord.unpack(e) for e in d["experts"]],
            dense=d["dense"],
            aux_files=d["aux_files"],
            created_by=d.get("created_by", ""),
            created_at=d.get("created_at", ""),
            extra=d.get("extra", {}),
        )


def dumps_index(index: StoreIndex) -> bytes:
    body = msgpack.packb(index.pack(), use_bin_type=True)
    return msgpack.packb(
        {"magic": MAGIC_INDEX, "format_version": FORMAT_VERSION, "body_crc32": crc32(body), "body": body},
        use_bin_type=True,
    )


def loads_index(data: bytes, path: str) -> StoreIndex:
    """Decode an index file; raises StoreCorruptError or FormatVersionError with what to do."""
    try:
        outer = msgpack.unpackb(data, raw=False)
    except Exception:
        raise StoreCorruptError(f"{path}: the store index is damaged or truncated (not msgpack)") from None
    if not isinstance(outer, dict) or outer.get("magic") != MAGIC_INDEX:
        raise StoreCorruptError(f"{path}: not a zipmoe store index (bad magic)")
    version = outer.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{path}: store format version {version} is newer than this zipmoe-ray reads "
                f"(version {FORMAT_VERSION}); upgrade zipmoe-ray"
            )
        raise FormatVersionError(
            f"{path}: store format version {version!r} is not supported by this zipmoe-ray (version "
            f"{FORMAT_VERSION}); re-create the store with `zipmoe compress`"
        )
    body = outer.get("body")
    if not isinstance(body, bytes) or crc32(body) != outer.get("body_crc32"):
        raise StoreCorruptError(f"{path}: the store index fails its checksum; re-create the store")
    try:
        d = msgpack.unpackb(body, raw=False)
    except Exception:
        raise StoreCorruptError(f"{path}: the store index body is not msgpack; re-create the store") from None
    check_body(d, path)  # every field's type and range, every path confined: nothing unchecked is used
    try:
        return StoreIndex.unpack(d)
    except Exception as e:  # pragma: no cover - check_body admits only what unpack can build
        raise StoreCorruptError(f"{path}: the store index is malformed ({e})") from None
