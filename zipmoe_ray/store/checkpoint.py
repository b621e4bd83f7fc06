"""Reading a Hugging Face safetensors checkpoint: its files, tensor headers, routed experts and fingerprint.

Headers are parsed directly (8-byte length + JSON) so that discovering a 30 GB checkpoint reads a few
kilobytes; tensor data is read lazily through safetensors' memory-mapped ``safe_open``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import ArchitectureError, CheckpointError, DTypeError
from ..models.registry import ArchSpec, get_arch

__all__ = ["WEIGHT_SUFFIXES", "Checkpoint", "CheckpointExpert", "TensorSource"]

log = logging.getLogger(__name__)

# Files that hold weights and are not copied verbatim into a store.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


_FLOAT = ("BF16", "F16", "F32", "F64")


@dataclass(frozen=True)
class TensorSource:
    """One tensor of an expert as it appears in the checkpoint."""

    name: str  # key reported to users: the checkpoint name, or ``name[e]`` for a fused 3D tensor
    source: str  # checkpoint tensor name
    index: int | None  # expert index into a fused tensor, None for per-expert tensors
    role: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _ST_DTYPES.get(self.dtype)


@dataclass(frozen=True)
class CheckpointExpert:
    """All checkpoint tensors of one routed expert, in canonical role order."""

    layer: int
    expert: int
    module: str
    tensors: tuple[TensorSource, ...]

    @property
    def numel(self) -> int:
        total = 0
        for t in self.tensors:
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total


def _read_header(path: Path) -> tuple[dict[str, Any], bytes]:
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file (shorter than its 8-byte header length)"
                )
            (n,) = struct.unpack("<Q", raw_len)
            if n > 100 * 1024 * 1024:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} is implausible)")
            header = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        parsed = json.loads(header)
    except ValueError:
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return parsed, header


class Checkpoint:
    """A Hugging Face checkpoint directory with config.json and safetensors weights (one file or shards).

    Raises CheckpointError with what is missing and what to do for anything else, and ArchitectureError
    for model types zipmoe-ray does not support.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise CheckpointError(
                f"{self.path}: no such directory; give the directory of a Hugging Face checkpoint"
            )
        if not self.path.is_dir():
            raise CheckpointError(
                f"{self.path}: not a directory; give the directory of a Hugging Face checkpoint"
            )
        cfg_path = self.path / "config.json"
        st_files = sorted(self.path.glob("*.safetensors"))
        if not cfg_path.is_file():
            raise CheckpointError(
                f"{self.path}: not a Hugging Face checkpoint (no config.json); expected config.json and "
                "model.safetensors (or model-0000X-of-0000N.safetensors with model.safetensors.index.json)"
            )
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
        self.model_type = self.config.get("model_type")
        self.spec: ArchSpec = get_arch(self.model_type)
        if not st_files:
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            hint = (
                f" (found {', '.join(bins[:3])}: convert it to safetensors first, e.g. load it with transformers "
                "and save_pretrained(..., safe_serialization=True))"
                if bins
                else ""
            )
            raise CheckpointError(f"{self.path}: no *.safetensors weight files{hint}")
        index_path = self.path / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"{self.path}: the index lists shard(s) {', '.join(missing[:3])} that are missing; "
                    "download the whole checkpoint"
                )
            self.files = [self.path / n for n in names]
        else:
            self.files = st_files
        self._headers: dict[Path, bytes] = {}
        self.tensors: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        for f in self.files:
            header, raw = _read_header(f)
            self._headers[f] = raw
            end = 0
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if name in self.tensors:
                    raise CheckpointError(f"{self.path}: tensor {name!r} appears in two files")
                try:
                    self.tensors[name] = (f, str(meta["dtype"]), tuple(int(d) for d in meta["shape"]))
                    end = max(end, int(meta["data_offsets"][1]))
                except (KeyError, TypeError, ValueError, IndexError):
                    raise CheckpointError(
                        f"{f}: not a safetensors file (tensor {name!r} has a bad header entry)"
                    ) from None
            size = f.stat().st_size
            if size < 8 + len(raw) + end:
                raise CheckpointError(
                    f"{f}: truncated ({size} bytes, its header describes {8 + len(raw) + end}); download or "
                    "copy the checkpoint again"
                )
        self._handles: dict[Path, Any] = {}

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 over config.json, every weight file's name, size and header (every tensor's name, dtype,
        shape and offsets) and three 64 KiB samples of its data (start, middle, end), so that two
        checkpoints of the same shape (another seed, a fine-tune) differ. Reads ~200 KB per file."""
        h = hashlib.sha256()
        h.update((self.path / "config.json").read_bytes())
        sample = 64 * 1024
        for f in self.files:
            size = f.stat().st_size
            h.update(f.name.encode())
            h.update(str(size).encode())
            h.update(self._headers[f])
            start = 8 + len(self._headers[f])
            with open(f, "rb") as fh:
                for off in sorted({start, max(start, (start + size) // 2), max(start, size - sample)}):
                    fh.seek(off)
                    h.update(fh.read(sample))
        return h.hexdigest()

    @cached_property
    def experts(self) -> list[CheckpointExpert]:
        """Every routed expert, sorted by (layer, expert). Raises DTypeError for non-floating experts and
        ArchitectureError when none are found or their tensors do not fit the architecture."""
        num_experts = self.spec.num_experts(self.config)
        groups: dict[tuple[int, int], list[TensorSource]] = defaultdict(list)
        modules: dict[int, str] = {}
        for name, (_, dtype, shape) in self.tensors.items():
            hit = self.spec.classify(name, self.config)
            if hit is None:
                continue
            if dtype not in ("BF16", "F16", "F32"):
                raise DTypeError(
                    f"expert tensor {name} has dtype {dtype}: zipmoe compresses bfloat16, float16 and float32 "
                    "experts only (quantized checkpoints are not supported; use the original BF16 release)"
                )
            modules.setdefault(hit.layer, hit.module)
            if hit.expert is not None:
                groups[(hit.layer, hit.expert)].append(TensorSource(name, name, None, hit.role, dtype, shape))
            else:
                if len(shape) != 3 or shape[0] != num_experts:
                    raise ArchitectureError(
                        f"fused expert tensor {name} has shape {list(shape)}; expected [num_experts={num_experts}, ...]"
                    )
                for e in range(shape[0]):
                    groups[(hit.layer, e)].append(
                        TensorSource(f"{name}[{e}]", name, e, hit.role, dtype, shape[1:])
                    )
        if not groups:
            raise ArchitectureError(
                f"{self.path}: config says {self.model_type} but no routed-expert tensors were found "
                "(expected names like ...experts.0.gate_proj.weight or ...experts.gate_up_proj)"
            )
        out = []
        for (layer, expert), tensors in sorted(groups.items()):
            order = self.spec.role_order({t.role for t in tensors})
            by_role = {t.role: t for t in tensors}
            if len(by_role) != len(tensors):
                raise ArchitectureError(
                    f"layer {layer}, expert {expert}: two checkpoint tensors have the same role"
                )
            out.append(CheckpointExpert(layer, expert, modules[layer], tuple(by_role[r] for r in order)))
        layers = sorted({e.layer for e in out})
        for layer in layers:
            have = sorted(e.expert for e in out if e.layer == layer)
            if have != list(range(num_experts)):
                raise CheckpointError(
                    f"layer {layer} has experts {have[:5]}... ({len(have)} of {num_experts}); the checkpoint is incomplete"
                )
        return out

    def check_servable(self) -> None:
        """Refuse what compress could store but the runtime could not serve bit-exactly: routed experts
        of more than one dtype, and integer (quantized) non-expert weights. Raises DTypeError."""
        dtypes = sorted({t.dtype for e in self.experts for t in e.tensors})
        if len(dtypes) > 1:
            raise DTypeError(
                f"{self.path}: the routed experts mix dtypes {', '.join(dtypes)}; zipmoe serves experts of one "
                "dtype (convert the checkpoint to one, e.g. save it again in bfloat16)"
            )
        for name in self.dense_names:
            dtype = self.tensors[name][1]
            if dtype not in _FLOAT and name.rsplit(".", 1)[-1] in ("weight", "bias"):
                raise DTypeError(
                    f"non-expert weight {name} has dtype {dtype}: zipmoe serves floating-point checkpoints "
                    "only (quantized checkpoints are not supported; use the original BF16 release)"
                )

    @cached_property
    def expert_tensor_names(self) -> set[str]:
        return {t.source for e in self.experts for t in e.tensors}

    @property
    def dense_names(self) -> list[str]:
        """Every tensor that is not part of a routed expert, in file order."""
        return [n for n in self.tensors if n not in self.expert_tensor_names]

    def aux_files(self) -> list[Path]:
        """Config, tokenizer and other small files that travel with the weights (everything but weights)."""
        return sorted(
            p
            for p in self.path.iterdir()
            if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name not in _WEIGHT_INDEXES
        )

    def _handle(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            try:
                h = self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: cannot open as safetensors ({e})") from None
        return h

    def tensor(self, source: str, index: int | None = None) -> torch.Tensor:
        """Load one tensor (or one expert slice of a fused tensor) from the checkpoint."""
        if source not in self.tensors:
            raise CheckpointError(f"{self.path}: has no tensor {source!r}")
        f = self.tensors[source][0]
        try:
            if index is None:
                return self._handle(f).get_tensor(source)
            return self._handle(f).get_slice(source)[index]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"{f}: cannot read tensor {source!r} ({e}); the file may be truncated"
            ) from None

    def close(self) -> None:
        self._handles.clear()
