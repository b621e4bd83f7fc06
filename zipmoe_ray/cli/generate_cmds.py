"""CLI commands of the serving stage: generate and chat."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from ..errors import ConfigError, ZipMoEError
from .engine_opts import add_engine_options, engine_kwargs

__all__ = ["add_generate_commands", "stats_for_json"]


def _ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids wants comma-separated integers, got {text!r}"
        ) from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def add_generate_commands(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a store, bit-identical to the original model",
        description="Generate with the zipmoe engine. Repeat --prompt (or --prompt-ids) for a batch.",
    )
    p.add_argument("store_dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument(
        "--prompt-ids", action="append", type=_ids, help="prompt token ids: 1,2,3 (repeat for a batch)"
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--json", action="store_true", help="print outputs and stats as JSON")
    p.add_argument("--trace-out", help="record the routing of this generation (zipmoe-trace/1, appended)")
    p.add_argument("--plan", help="a plan from `zipmoe plan --out` (default: planned at start-up)")
    add_engine_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        help="interactive chat with streaming output",
        description="Chat with a model from a store, through its chat template; tokens stream as they are "
        "generated. The conversation is kept; /reset starts a new one; Ctrl-D (end of input) or /exit leaves.",
    )
    p.add_argument("store_dir")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--system", help="a system message")
    add_engine_options(p)
    p.set_defaults(func=cmd_chat)


def stats_for_json(s: dict) -> dict:
    """The engine stats with what the CLI promises at the top level."""
    return s


def _checked_prompts(args, prompts) -> list[list[int]]:
    """The prompts as token ids, checked (vocabulary, context, sampling values, output paths) before any
    engine starts: a mistake costs a second, not an engine start-up."""
    from ..models.registry import get_arch
    from ..runtime.request import check_sampling
    from ..runtime.text import PromptText
    from ..store import open_store
    from ..store.durable import check_writable

    sampling = {k: getattr(args, k, None) for k in ("seed", "temperature", "top_p", "top_k")}
    check_sampling(args.max_new_tokens, do_sample=getattr(args, "do_sample", False), **sampling)
    if getattr(args, "trace_out", None):
        check_writable(args.trace_out, "trace (--trace-out)")
    store = open_store(args.store_dir)
    try:
        causal = get_arch(store.model_type).family == "causal"
        text = PromptText.for_store(args.store_dir, store.config(), causal)
    finally:
        store.close()
    if prompts is None:
        return []
    ids, _ = text.encode(list(prompts))
    text.check_length(ids, args.max_new_tokens)
    return ids


def _print_partial(args, e: ZipMoEError) -> None:
    """What a failed generation had produced, printed rather than lost (the error follows on stderr)."""
    outs = e.partial if isinstance(e.partial, list) else [e.partial]
    if args.json:
        doc = {"outputs": [{"token_ids": o.token_ids, "text": o.text} for o in outs], "error": str(e)}
        print(json.dumps(doc, indent=2))
        return
    for o in outs:
        print(o.text)
    n = max(len(o.token_ids) for o in outs)
    print(f"[the generation failed after {n} token(s); above is what it produced]", file=sys.stderr)


def cmd_generate(args) -> int:
    from ..engine import ZipMoEEngine

    prompts = _checked_prompts(args, args.prompt if args.prompt else args.prompt_ids)
    sampling = {k: getattr(args, k) for k in ("seed", "temperature", "top_p", "top_k")}
    with ZipMoEEngine(
        args.store_dir, trace_path=args.trace_out, plan=args.plan, **engine_kwargs(args)
    ) as engine:
        try:
            outs = engine.generate(prompts, args.max_new_tokens, do_sample=args.do_sample, **sampling)
        except ZipMoEError as e:
            if e.partial is not None:
                _print_partial(args, e)
            raise
        stats = engine.stats()
        timeline = (
            {"events": engine.timeline(), "reads": engine.read_timeline()} if engine.config.timeline else None
        )
    if args.json:
        doc = {
            "outputs": [{"token_ids": o.token_ids, "text": o.text} for o in outs],
            "stats": stats_for_json(stats),
        }
        if timeline is not None:  # --timeline: what the engine recorded (README, Generating)
            doc["timeline"] = timeline
        print(json.dumps(doc, indent=2, default=str))
        return 0
    for o in outs:
        print(o.text)
    if timeline is not None:
        print(
            f"[timeline: {len(timeline['events'])} MoE-layer events and {len(timeline['reads'])} reads recorded; "
            "--json prints them]",
            file=sys.stderr,
        )
    h = stats["hits"]
    print(
        f"[ttft {stats['ttft_s'] * 1e3:.1f} ms, tpot {stats['tpot_s'] * 1e3:.1f} ms, "
        f"{stats['tokens_per_s']:.1f} tok/s; hits full/compressed/sm {h['full']}/{h['compressed']}/{h['sm']}, "
        f"disk misses {stats['misses']['disk']}; read {stats['bytes_read'] / 1e6:.1f} MB; peak cache "
        f"{stats['peak_cache_bytes'] / 1e6:.1f} of {stats['budget'] / 1e6:.1f} MB]",
        file=sys.stderr,
    )
    return 0


def _chat_prompt(tok, history: list[dict]) -> list[int]:
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant: "
    return tok(text)["input_ids"]


CHAT_HELP = "type a message; /reset starts a new conversation; Ctrl-D (or /exit) leaves"


def _read_line(interactive: bool) -> str | None:
    """The next user line, or None at the end of input (Ctrl-D). Blocks."""
    if not interactive:
        line = sys.stdin.readline()
        return line if line else None
    while True:
        try:
            return input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return None
        except KeyboardInterrupt:  # like a shell: Ctrl-C drops the line, Ctrl-D leaves
            print(f"\n({CHAT_HELP})", file=sys.stderr)


def _fit(tok, base: list[dict], turns: list[dict], limit: int) -> list[int]:
    """The prompt ids of the conversation, dropping the oldest exchanges while it is longer than ``limit``."""
    while True:
        ids = _chat_prompt(tok, base + turns)
        if len(ids) <= limit or len(turns) <= 1:
            return ids
        turns[:] = turns[2:]
        print(
            "(the conversation got too long for the model: its oldest exchange is forgotten)", file=sys.stderr
        )


def cmd_chat(args) -> int:
    from ..engine import ZipMoEEngine

    interactive = sys.stdin.isatty()
    _checked_prompts(args, None)
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        print(f"zipmoe chat: starting the engine on {args.store_dir} ...", file=sys.stderr, flush=True)
    with ZipMoEEngine(args.store_dir, **engine_kwargs(args)) as engine:
        tok = engine.tokenizer
        config = engine.store.config()
        limit = int(config.get("max_position_embeddings") or 4096) - args.max_new_tokens
        base: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
        turns: list[dict] = []
        if interactive:
            print(
                f"zipmoe chat: {engine.store.model_type}, {engine.store.num_experts} experts per layer, "
                f"top-{engine.store.top_k}, budget {args.memory_budget}; {CHAT_HELP}",
                file=sys.stderr,
            )
        while True:
            line = _read_line(interactive)
            if line is None or line.strip() in ("/exit", "/quit"):
                break
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                turns = []
                print("(new conversation)", file=sys.stderr)
                continue
            if text.startswith("/"):
                print(f"(unknown command {text.split()[0]}: {CHAT_HELP})", file=sys.stderr)
                continue
            turns.append({"role": "user", "content": text})
            ids = _fit(tok, base, turns, limit)
            if not ids:
                raise ConfigError("the chat prompt tokenized to nothing")
            reply = []
            try:
                for _, piece in engine.stream(list(ids), args.max_new_tokens):
                    reply.append(piece)
                    print(piece, end="", flush=True)
            except ZipMoEError:
                print(flush=True)  # the reply so far stays on screen; the error follows on stderr
                raise
            print()
            turns.append({"role": "assistant", "content": "".join(reply).strip()})
        s = engine.stats()
        if s["tpot_s"]:
            print(f"[last reply: tpot {s['tpot_s'] * 1e3:.1f} ms]", file=sys.stderr)
    return 0
