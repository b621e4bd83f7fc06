"""`zipmoe inspect`: what a store holds and how close it is to the Shannon bound, from the index alone."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..codec import bound_ratio, layout_for
from .format import DATA_HEADER_SIZE, FORMAT_VERSION
from .reader import open_store

__all__ = ["MODEL_CARD", "inspect_store", "weights_note"]

MODEL_CARD = "zipmoe-model-card.json"  # written by `zipmoe tiny-model`, carried into the store by compress
QUANTIZED_ORIGINS = {"gguf-q4_1": "4-bit GGUF blocks (Q4_1)"}


def weights_note(store_dir: str | os.PathLike) -> str | None:
    """A warning when the store's weights are not native BF16, else None. Read from the model card that
    ``compress`` copied in (the builder of the upcycled SmolLM2 MoE marks its weights as dequantized from
    4-bit blocks): the index's entropy figures cannot tell, since per byte such exponents look native
    (2.6 bits)."""
    path = Path(store_dir) / MODEL_CARD
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    origin = QUANTIZED_ORIGINS.get(card.get("weights_origin", "") if isinstance(card, dict) else "")
    if origin is None:
        return None
    return (
        f"these weights were dequantized from {origin}: each block of 32 holds at most 16 distinct values, a "
        "regularity native BF16 weights lack and that zipmoe's per-byte exponent coding does not use, so the "
        "figures above look native; they are no measure for native BF16 models (README: the built-in model)"
    )


def inspect_store(store_dir: str | os.PathLike, *, detail: bool = False) -> dict[str, Any]:
    """A JSON-ready report: totals (``expert_bytes_original``, ``expert_bytes_stored``, ``ratio`` =
    stored / original, ``bound_ratio`` = (1 + mantissa bits + H) / bits with H each tensor's exponent
    entropy, weighted by size), and one row per (layer, tensor role) aggregated over experts. With
    ``detail``, one row per expert tensor too. ``weights_note``: see :func:`weights_note`. Reads only the
    index and the model card."""
    store = open_store(store_dir)
    idx = store.index
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    agg = defaultdict(
        lambda: {"n": 0, "orig": 0, "stored": 0, "hbits": 0.0, "bound_bits": 0.0, "shards": set()}
    )
    orig = stored = 0
    bound_bytes = 0.0
    hbits = 0.0
    numel = 0
    details = []
    for rec in idx.experts:
        for t in rec.tensors:
            lay = layout_for(t.dtype)
            o = t.numel * lay.itemsize
            s = t.stored_bytes
            b = bound_ratio(lay, t.entropy) * o
            a = agg[(rec.layer, t.role)]
            a["n"] += 1
            a["orig"] += o
            a["stored"] += s
            a["hbits"] += t.entropy * t.numel
            a["bound_bits"] += b
            a["shards"].add(len(t.shards))
            a["numel"] = a.get("numel", 0) + t.numel
            a["dtype"], a["shape"] = t.dtype, list(t.shape)
            orig += o
            stored += s
            bound_bytes += b
            hbits += t.entropy * t.numel
            numel += t.numel
            if detail:
                details.append(
                    {
                        "layer": rec.layer,
                        "expert": rec.expert,
                        "name": t.name,
                        "role": t.role,
                        "dtype": t.dtype,
                        "shape": list(t.shape),
                        "entropy_bits": t.entropy,
                        "bound_ratio": b / o if o else 1.0,
                        "ratio": s / o if o else 1.0,
                        "shards": len(t.shards),
                        "bytes_original": o,
                        "bytes_stored": s,
                    }
                )
    order = {}
    for rec in idx.experts[:1]:
        order = {t.role: i for i, t in enumerate(rec.tensors)}
    for (layer, role), a in sorted(agg.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99), kv[0][1])):
        rows[(layer, role)] = {
            "layer": layer,
            "role": role,
            "dtype": a["dtype"],
            "shape": a["shape"],
            "experts": a["n"],
            "entropy_bits": a["hbits"] / a["numel"] if a["numel"] else 0.0,
            "bound_ratio": a["bound_bits"] / a["orig"] if a["orig"] else 1.0,
            "ratio": a["stored"] / a["orig"] if a["orig"] else 1.0,
            "shards": sorted(a["shards"]),
            "bytes_original": a["orig"],
            "bytes_stored": a["stored"],
        }
    on_disk = sum(layer["file_size"] for layer in idx.layers)
    report = {
        "store": str(store.path),
        "format_version": FORMAT_VERSION,
        "model_type": store.model_type,
        "source": {k: idx.source[k] for k in ("fingerprint", "path", "num_experts", "top_k")},
        "codec": idx.codec["codec"],
        "level": idx.codec["level"],
        "level_describe": idx.codec.get("describe", ""),
        "shards": idx.codec["shards"],
        "num_moe_layers": len(idx.layers),
        "num_experts": len(idx.experts),
        "num_expert_tensors": sum(len(r.tensors) for r in idx.experts),
        "expert_bytes_original": orig,
        "expert_bytes_stored": stored,
        "expert_bytes_on_disk": on_disk,
        "ratio": stored / orig if orig else 1.0,
        "bound_ratio": bound_bytes / orig if orig else 1.0,
        "exponent_entropy_bits": hbits / numel if numel else 0.0,
        "padding_and_headers_bytes": on_disk - stored,
        "data_file_header_bytes": DATA_HEADER_SIZE * len(idx.layers),
        "dense_bytes": idx.dense["bytes"],
        "dense_tensors": idx.dense["num_tensors"],
        "created_by": idx.created_by,
        "created_at": idx.created_at,
        "tensors": list(rows.values()),
        "weights_note": weights_note(store.path),
    }
    if detail:
        report["expert_tensors"] = details
    store.close()
    return report
