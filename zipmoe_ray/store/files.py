"""The files of a store, checked when it opens: where they resolve, their sizes and headers, their CRC-32s.

Every path in an index passed the schema (relative, no ``..``); here each one is also resolved, symlinks
included, and must stay inside the store directory. Data files must be present, whole and carry this
store's id and their layer in their header; the small files the model and tokenizer are read from
(config, generation config, tokenizer, chat template) must match their CRC-32; and no file transformers
would read may sit in the store without a checksum in the index. The non-expert weights are checked
tensor by tensor (:func:`check_dense`) just before they are loaded, since that reads them whole.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import ChecksumError, StoreCorruptError
from .dense import check_dense_file
from .durable import file_crc32
from .format import DATA_HEADER_SIZE, FORMAT_VERSION, StoreIndex, parse_data_header

__all__ = ["SERVED", "check_data_files", "check_dense", "check_small_files", "check_uncovered", "confined"]

log = logging.getLogger(__name__)

Resolve = Callable[[str], Path]

# Files transformers reads from a model or tokenizer directory: one of these in a store must be covered by
# the index, or it would be served unchecked.
SERVED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "*.safetensors",
    "*.safetensors.index*.json",
    "*.py",
)


def confined(store: Path, root: str, rel: str) -> Path:
    """``store / rel`` when it resolves inside ``root`` (the store's real path); StoreCorruptError if not."""
    p = store / rel
    real = os.path.realpath(p)
    if not real.startswith(root + os.sep):
        raise StoreCorruptError(
            f"{p}: resolves to {real}, outside the store directory {root}; a store only serves files "
            "inside its directory"
        )
    return p


def check_data_files(index: StoreIndex, resolve: Resolve) -> None:
    """Every layer's data file: present, a regular file, its header this store's and this layer's, not
    shorter than the index says."""
    for layer in index.layers:
        p = resolve(layer["file"])
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise StoreCorruptError(
                f"{p}: missing (layer {layer['layer']}); the store is incomplete, re-create it"
            ) from None
        if not p.is_file():
            raise StoreCorruptError(f"{p}: not a regular file (layer {layer['layer']}); re-create the store")
        with open(p, "rb") as f:
            version, store_id, hdr_layer = parse_data_header(f.read(DATA_HEADER_SIZE), str(p))
        if version != FORMAT_VERSION or store_id != index.store_id or hdr_layer != layer["layer"]:
            raise StoreCorruptError(
                f"{p}: belongs to another store or layer (header says layer {hdr_layer}, version {version}); "
                "data files cannot be mixed between stores"
            )
        if size < layer["file_size"]:
            first = next(
                (e for e in index.experts if e.layer == layer["layer"] and e.offset + e.length > size), None
            )
            what = f"; {first.label()} and the experts after it are lost" if first else ""
            raise StoreCorruptError(
                f"{p}: truncated ({size} of {layer['file_size']} bytes){what}; re-create the store"
            )


def check_small_files(index: StoreIndex, resolve: Resolve) -> None:
    """The config, tokenizer and other small files against their CRC-32; the dense files' presence and size
    (their contents are checked by :func:`check_dense`)."""
    for f in index.aux_files:
        p = resolve(f["name"])
        if not p.is_file():
            raise StoreCorruptError(f"{p}: missing; the store is incomplete, re-create it")
        if p.stat().st_size != f["size"] or file_crc32(p) != f["crc32"]:
            raise ChecksumError(
                f"{p}: fails its checksum (the store's copy of {f['name']} was altered or damaged); restore "
                "it or re-create the store"
            )
    idx = index.dense.get("index")
    if idx is not None:
        p = resolve(idx["name"])
        if not p.is_file() or p.stat().st_size != idx["size"] or file_crc32(p) != idx["crc32"]:
            raise ChecksumError(f"{p}: the dense weights' shard map is missing or fails its checksum")
    for f in index.dense["files"]:
        p = resolve(f["name"])
        if not p.is_file() or p.stat().st_size != f["size"]:
            raise StoreCorruptError(
                f"{p}: missing or of the wrong size (the index records {f['size']} bytes); re-create the store"
            )


def check_uncovered(store: Path, index: StoreIndex) -> None:
    """Refuse a file that transformers would read from the store directory but the index does not cover."""
    covered = {f["name"] for f in index.aux_files} | {f["name"] for f in index.dense["files"]}
    if "index" in index.dense:
        covered.add(index.dense["index"]["name"])
    for p in store.iterdir():
        if p.name in covered or not any(fnmatch.fnmatch(p.name, pat) for pat in SERVED):
            continue
        raise StoreCorruptError(
            f"{p}: not part of this store (its index has no checksum for it), and the model or tokenizer "
            "would read it; remove it, or re-create the store"
        )


def check_dense(store: Path, index: StoreIndex, resolve: Resolve) -> None:
    """Every dense weights file against the index, tensor by tensor (see dense.check_dense_file)."""
    files = index.dense["files"]
    for f in files:
        check_dense_file(resolve(f["name"]), f)
    if len(files) > 1 and "index" not in index.dense:
        log.warning(
            "%s: written by an older zipmoe-ray: the dense weights' shard map has no checksum; re-compress "
            "the store to cover it",
            store,
        )
