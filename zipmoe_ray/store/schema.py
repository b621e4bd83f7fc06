"""The schema of a store index body: every field's type and range, checked before any of it is used.

A store index passes its CRC when it was written by zipmoe; a crafted or buggy one can pass it too. So
``loads_index`` checks every field here before building a StoreIndex: types, ranges, that every chunk lies
inside its extent and the chunks tile the extent exactly (every byte is under a checksum), that every
extent lies inside its layer's data file, and that every path names a file inside the store directory
(relative, no ``..``, no absolute path). A violation raises StoreCorruptError naming the field; nothing
here touches the disk (Store checks the files' real sizes and resolved paths when it opens them).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from ..codec.backends import CODECS
from ..errors import StoreCorruptError

__all__ = ["check_body", "safe_relpath"]

_U32 = 1 << 32
_BIG = 1 << 50  # bytes: larger than any file this format describes
_MAX_EXPERTS = 1 << 16
_MAX_LAYERS = 1 << 16
ALIGN = 4096  # format.ALIGN and format.DATA_HEADER_SIZE (format.py imports this module, not the reverse)
DATA_HEADER_SIZE = 4096


class _Bad(Exception):
    """A schema violation; turned into StoreCorruptError by :func:`check_body`."""


def _int(v: Any, where: str, lo: int = 0, hi: int = _BIG) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise _Bad(f"{where} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _Bad(f"{where} = {v} is out of range [{lo}, {hi}]")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise _Bad(f"{where} must be a string, got {type(v).__name__}")
    return v


def _list(v: Any, where: str) -> list:
    if not isinstance(v, list):
        raise _Bad(f"{where} must be a list, got {type(v).__name__}")
    return v


def _map(v: Any, where: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(v, dict):
        raise _Bad(f"{where} must be a map, got {type(v).__name__}")
    missing = [k for k in keys if k not in v]
    if missing:
        raise _Bad(f"{where} lacks {', '.join(missing)}")
    return v


def safe_relpath(v: Any, where: str) -> str:
    """``v`` when it is a relative path that stays inside the directory it is relative to; raises
    StoreCorruptError otherwise (absolute, ``..``, empty parts, backslashes, NUL)."""
    try:
        return _relpath(v, where)
    except _Bad as e:
        raise StoreCorruptError(f"the store index is malformed ({e}); re-create the store") from None


def _relpath(v: Any, where: str) -> str:
    s = _str(v, where)
    parts = s.split("/")
    if (
        not s
        or s.startswith("/")
        or "\\" in s
        or "\x00" in s
        or any(p in ("", ".", "..") for p in parts)
        or len(s) > 4096
    ):
        raise _Bad(f"{where} {s!r} is not a path inside the store directory")
    return s


def _chunk(v: Any, where: str) -> tuple[int, int, int]:
    v = _list(v, where)
    if len(v) != 3:
        raise _Bad(f"{where} must be [offset, length, crc32]")
    return (
        _int(v[0], f"{where} offset"),
        _int(v[1], f"{where} length"),
        _int(v[2], f"{where} crc32", 0, _U32 - 1),
    )


def _tensor(t: Any, where: str, codec: str) -> tuple[int, list[tuple[int, int]], tuple[int, int]]:
    """Checks one tensor record; returns (numel, exponent chunks (offset, length), raw chunk)."""
    t = _map(
        t,
        where,
        ("name", "role", "dtype", "shape", "shard_elems", "shards", "raw", "entropy", "source_crc32"),
    )
    where = f"{where} ({_str(t['name'], f'{where} name')[:200]})"
    _str(t["role"], f"{where} role")
    dtype = _str(t["dtype"], f"{where} dtype")
    from ..codec.planes import LAYOUTS  # here: it imports torch, which only reading a store needs

    if dtype not in LAYOUTS:
        raise _Bad(f"{where} dtype {dtype!r} is not one of {', '.join(LAYOUTS)}")
    shape = _list(t["shape"], f"{where} shape")
    if not 1 <= len(shape) <= 8:
        raise _Bad(f"{where} shape has {len(shape)} dimensions")
    numel = 1
    for d in shape:
        numel *= _int(d, f"{where} shape", 1, _BIG)
    if numel > _BIG:
        raise _Bad(f"{where} shape {shape} is implausibly large")
    elems = [
        _int(n, f"{where} shard_elems", 1, numel) for n in _list(t["shard_elems"], f"{where} shard_elems")
    ]
    shards = [_chunk(s, f"{where} shard {i}") for i, s in enumerate(_list(t["shards"], f"{where} shards"))]
    raw = _chunk(t["raw"], f"{where} raw")
    layout = LAYOUTS[dtype]
    if codec == "none":
        if shards or elems:
            raise _Bad(f"{where}: codec none stores no exponent shards")
        want_raw = numel * layout.itemsize
    else:
        if not shards or len(shards) != len(elems) or sum(elems) != numel:
            raise _Bad(
                f"{where}: {len(shards)} shards of {sum(elems)} elements do not cover {numel} elements"
            )
        want_raw = numel * layout.raw_width
    if raw[1] != want_raw:
        raise _Bad(
            f"{where}: raw chunk of {raw[1]} bytes, a {dtype} tensor of {numel} elements has {want_raw}"
        )
    entropy = t["entropy"]
    if not isinstance(entropy, (int, float)) or isinstance(entropy, bool) or not math.isfinite(entropy):
        raise _Bad(f"{where} entropy must be a finite number")
    _int(t["source_crc32"], f"{where} source_crc32", 0, _U32 - 1)
    return numel, [(s[0], s[1]) for s in shards], (raw[0], raw[1])


def _expert(e: Any, i: int, layers: dict[int, dict], num_experts: int, codec: str) -> tuple[int, int]:
    where = f"expert record {i}"
    e = _map(e, where, ("layer", "expert", "file", "offset", "length", "e_length", "tensors"))
    layer = _int(e["layer"], f"{where} layer", 0, _MAX_LAYERS)
    expert = _int(e["expert"], f"{where} expert", 0, num_experts - 1)
    where = f"layer {layer}, expert {expert}"
    if layer not in layers:
        raise _Bad(f"{where}: the index has no layer {layer}")
    info = layers[layer]
    if _relpath(e["file"], f"{where} file") != info["file"]:
        raise _Bad(f"{where}: file {e['file']!r} is not its layer's data file {info['file']!r}")
    offset = _int(e["offset"], f"{where} offset", DATA_HEADER_SIZE)
    length = _int(e["length"], f"{where} length", 1)
    e_length = _int(e["e_length"], f"{where} e_length", 0, length)
    if offset % ALIGN:
        raise _Bad(f"{where}: offset {offset} is not {ALIGN}-byte aligned")
    end = offset + -(-length // ALIGN) * ALIGN
    if end > info["file_size"]:
        raise _Bad(
            f"{where}: extent {offset}..{end} runs past the end of {info['file']} ({info['file_size']} bytes)"
        )
    tensors = _list(e["tensors"], f"{where} tensors")
    if not 1 <= len(tensors) <= 16:
        raise _Bad(f"{where}: {len(tensors)} tensors")
    exp_chunks, raw_chunks = [], []
    for j, t in enumerate(tensors):
        _, shards, raw = _tensor(t, f"{where}, tensor {j}", codec)
        exp_chunks += shards
        raw_chunks.append(raw)
    # the chunks tile the extent: exponent shards over [0, e_length), raw planes over [e_length, length)
    pos = 0
    for off, n in exp_chunks + raw_chunks:
        if off != pos:
            raise _Bad(f"{where}: chunk at {off} does not follow the previous one (ends at {pos})")
        pos += n
    if sum(n for _, n in exp_chunks) != e_length or pos != length:
        raise _Bad(
            f"{where}: chunks cover {pos} bytes ({sum(n for _, n in exp_chunks)} exponent), the extent {length} ({e_length})"
        )
    return offset, end


def _file_entry(f: Any, where: str, data: bool = False) -> None:
    f = _map(f, where, ("name", "size", "crc32"))
    name = _relpath(f["name"], f"{where} name")
    if "/" in name:
        raise _Bad(f"{where} name {name!r} must be a file at the top of the store")
    size = _int(f["size"], f"{where} size")
    _int(f["crc32"], f"{where} crc32", 0, _U32 - 1)
    if data and "tensors" in f:
        start = _int(f.get("data_start"), f"{where} data_start", 8, size)
        _int(f.get("header_crc32"), f"{where} header_crc32", 0, _U32 - 1)
        tensors = _map(f["tensors"], f"{where} tensors", ())
        chunks = sorted(
            (_chunk(ref, f"{where} tensor {_str(tname, f'{where} tensor name')[:200]}"), tname)
            for tname, ref in tensors.items()
        )
        pos = start
        for (off, n, _), tname in chunks:
            if off != pos:
                raise _Bad(f"{where} tensor {tname[:200]}: at {off}, the previous data ends at {pos}")
            pos += n
        if pos != size:
            raise _Bad(f"{where}: tensors end at {pos}, the file has {size} bytes")


def check_body(d: Any, path: str) -> None:
    """Check a decoded index body against the schema; raises StoreCorruptError naming the bad field."""
    try:
        _check(d)
    except _Bad as e:
        raise StoreCorruptError(f"{path}: the store index is malformed ({e}); re-create the store") from None


def _check(d: Any) -> None:
    d = _map(d, "the index", ("store_id", "source", "codec", "layers", "experts", "dense", "aux_files"))
    if not isinstance(d["store_id"], bytes) or len(d["store_id"]) != 16:
        raise _Bad("store_id must be 16 bytes")
    if d.get("alignment", ALIGN) != ALIGN:
        raise _Bad(f"alignment {d.get('alignment')!r} is not {ALIGN}")
    for k in ("created_by", "created_at"):
        if k in d:
            _str(d[k], k)
    if "extra" in d:
        _map(d["extra"], "extra", ())
    src = _map(d["source"], "source", ("fingerprint", "model_type", "num_experts", "top_k"))
    _str(src["fingerprint"], "source fingerprint")
    _str(src["model_type"], "source model_type")
    if "path" in src:
        _str(src["path"], "source path")
    num_experts = _int(src["num_experts"], "source num_experts", 1, _MAX_EXPERTS)
    _int(src["top_k"], "source top_k", 1, num_experts)
    codec = _map(d["codec"], "codec", ("codec", "level", "shards"))
    name = _str(codec["codec"], "codec name")
    if name not in CODECS:
        raise _Bad(f"codec {name!r} is not one of {', '.join(CODECS)}")
    if codec["level"] is not None:
        _int(codec["level"], "codec level", -(1 << 20), 100)
    if codec["shards"] is not None:
        _int(codec["shards"], "codec shards", 1, 1 << 16)
    layers: dict[int, dict] = {}
    files: set[str] = set()
    for i, info in enumerate(_list(d["layers"], "layers")):
        info = _map(info, f"layer record {i}", ("layer", "module", "file", "file_size", "num_experts"))
        layer = _int(info["layer"], f"layer record {i} layer", 0, _MAX_LAYERS)
        _str(info["module"], f"layer {layer} module")
        file = _relpath(info["file"], f"layer {layer} file")
        size = _int(info["file_size"], f"layer {layer} file_size", DATA_HEADER_SIZE)
        if size % ALIGN:
            raise _Bad(f"layer {layer} file_size {size} is not {ALIGN}-byte aligned")
        if _int(info["num_experts"], f"layer {layer} num_experts", 1, _MAX_EXPERTS) != num_experts:
            raise _Bad(f"layer {layer} has {info['num_experts']} experts, the model {num_experts}")
        if layer in layers or file in files:
            raise _Bad(f"layer {layer} (or its file {file!r}) appears twice")
        layers[layer] = info
        files.add(file)
    if not layers:
        raise _Bad("no MoE layers")
    seen: set[tuple[int, int]] = set()
    extents: dict[int, list[tuple[int, int]]] = {}
    experts = _list(d["experts"], "experts")
    for i, e in enumerate(experts):
        start, end = _expert(e, i, layers, num_experts, name)
        key = (e["layer"], e["expert"])
        if key in seen:
            raise _Bad(f"layer {key[0]}, expert {key[1]} appears twice")
        seen.add(key)
        extents.setdefault(key[0], []).append((start, end))
    if len(seen) != len(layers) * num_experts:
        raise _Bad(f"{len(seen)} expert records for {len(layers)} layers of {num_experts} experts")
    for layer, spans in extents.items():
        spans.sort()
        for (_, a_end), (b_start, _) in itertools.pairwise(spans):
            if b_start < a_end:
                raise _Bad(f"layer {layer}: two extents overlap at {b_start}")
    dense = _map(d["dense"], "dense", ("files", "num_tensors", "bytes"))
    dfiles = _list(dense["files"], "dense files")
    if not dfiles:
        raise _Bad("dense lists no files")
    names: set[str] = set()
    for i, f in enumerate(dfiles):
        _file_entry(f, f"dense file {i}", data=True)
        names.add(f["name"])
    if "index" in dense:
        _file_entry(dense["index"], "dense index")
        names.add(dense["index"]["name"])
    _int(dense["num_tensors"], "dense num_tensors")
    _int(dense["bytes"], "dense bytes")
    for i, f in enumerate(_list(d["aux_files"], "aux_files")):
        _file_entry(f, f"aux file {i}")
        if f["name"] in names:
            raise _Bad(f"aux file {f['name']!r} appears twice")
        names.add(f["name"])
