"""`zipmoe demo`: the main job on the built-in default model, end to end, in seconds."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .. import env

__all__ = ["add_demo_command"]

DEFAULT_ARCH = "qwen2_moe"
DEFAULT_SEED = 0


def add_demo_command(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="build the default tiny model, compress, verify and inspect it",
        description="The main job on the built-in default model (a tiny random-initialised qwen2_moe): "
        "build it into the cache directory ($ZIPMOE_CACHE_DIR), compress it, verify the store bit for bit "
        "against the checkpoint and report the compression.",
    )
    p.add_argument("--cache-dir", help="where to keep the model and store (default: $ZIPMOE_CACHE_DIR/demo)")
    p.add_argument("--fresh", action="store_true", help="rebuild the model and store from scratch")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from ..models.tiny import build_tiny_model
    from ..store import CompressOptions, compress
    from ..store.inspect import inspect_store
    from ..store.verify import verify_store

    root = Path(args.cache_dir or Path(env.get_str("ZIPMOE_CACHE_DIR")).expanduser() / "demo")
    model, store = root / f"tiny-{DEFAULT_ARCH}", root / f"tiny-{DEFAULT_ARCH}.zmoe"
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    if not (model / "config.json").is_file():
        build_tiny_model(model, DEFAULT_ARCH, seed=DEFAULT_SEED)
        print(f"[1/3] built the default model: {model}")
    else:
        print(f"[1/3] using the default model in {model}")
    compress(model, store, CompressOptions(overwrite=True))
    print(f"[2/3] compressed into {store}")
    report = verify_store(store, model)
    print(f"[3/3] verify --against the checkpoint: {report.summary()}")
    r = inspect_store(store)
    print(
        f"experts: {r['expert_bytes_original']:,} B -> {r['expert_bytes_stored']:,} B, ratio {r['ratio']:.4f} "
        f"(Shannon bound {r['bound_ratio']:.4f}); done in {time.perf_counter() - t0:.1f}s"
    )
    return 0 if report.ok else 1
