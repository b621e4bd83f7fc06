"""`zipmoe demo`: the main job on the built-in default model, end to end."""

from __future__ import annotations

import time
from pathlib import Path

from .. import env
from ..runtime.config import BACKENDS

__all__ = ["add_demo_command"]

DEFAULT_ARCH = "qwen2_moe"
DEFAULT_SEED = 0
PROMPT = "The robot rolled to the end of the corridor and"


def add_demo_command(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="build the default tiny model, compress it, generate with the Ray backend",
        description="The main job on the built-in default model (a tiny random-initialised qwen2_moe): build it "
        "into the cache directory ($ZIPMOE_CACHE_DIR), compress and verify it, generate with the Ray backend under "
        "a 25%% memory budget, check the tokens against plain transformers and print the text and statistics.",
    )
    p.add_argument("--cache-dir", help="where to keep the model and store (default: $ZIPMOE_CACHE_DIR/demo)")
    p.add_argument("--fresh", action="store_true", help="rebuild the model and store from scratch")
    p.add_argument("--backend", choices=BACKENDS, default="ray")
    p.add_argument("--memory-budget", default="25%")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=cmd_demo)


def _reference(model_dir: Path, ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.hf import quiet_transformers

    with quiet_transformers():
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def cmd_demo(args) -> int:
    import shutil

    from ..engine import ZipMoEEngine
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
        print(f"[1/4] built the default model: {model}")
    else:
        print(f"[1/4] using the default model in {model}")
    compress(model, store, CompressOptions(overwrite=True))
    r = inspect_store(store)
    print(
        f"[2/4] compressed into {store}: experts {r['expert_bytes_original']:,} B -> {r['expert_bytes_stored']:,} B, "
        f"ratio {r['ratio']:.4f} (Shannon bound {r['bound_ratio']:.4f})"
    )
    report = verify_store(store, model)
    print(f"[3/4] verify --against the checkpoint: {report.summary()}")
    if not report.ok:
        return 1
    with ZipMoEEngine(store, memory_budget=args.memory_budget, backend=args.backend) as engine:
        ids = engine.tokenizer(PROMPT)["input_ids"]
        out = engine.generate(ids, args.max_new_tokens)
        s = engine.stats()
    ref = _reference(model, ids, args.max_new_tokens)
    same = "identical to" if ref == out.token_ids else "DIFFERENT FROM"
    print(f"[4/4] generated with the {args.backend} backend under a {args.memory_budget} budget:")
    print(f"      {PROMPT!r} -> {out.text!r}")
    print(f"      token ids {same} plain transformers on the original checkpoint")
    h = s["hits"]
    print(
        f"      ttft {s['ttft_s'] * 1e3:.1f} ms, tpot {s['tpot_s'] * 1e3:.1f} ms; hits full/compressed/sm "
        f"{h['full']}/{h['compressed']}/{h['sm']}, disk misses {s['misses']['disk']}; peak cache "
        f"{s['peak_cache_bytes']:,} of {s['budget']:,} B; done in {time.perf_counter() - t0:.1f}s"
    )
    print("(the default model is random-initialised: its text is not meant to make sense)")
    return 0 if ref == out.token_ids else 1
