"""`zipmoe serve`: an OpenAI-compatible HTTP server for a store, on Ray Serve (the `serve` extra)."""

from __future__ import annotations

import signal
import sys
import threading

from .engine_opts import add_engine_options, engine_kwargs

__all__ = ["add_serve_command"]


def add_serve_command(sub) -> None:
    from ..serve.config import BATCH_WAIT_ROUNDS, ServeConfig

    d = ServeConfig.__dataclass_fields__
    p = sub.add_parser(
        "serve",
        help="serve a store over HTTP with the OpenAI API (completions, chat, streaming)",
        description="An OpenAI-compatible server on Ray Serve: requests that arrive while a generation runs "
        "are batched into the next one. Ctrl-C or SIGTERM stops it and everything it started.",
    )
    p.add_argument("store_dir")
    p.add_argument(
        "--host", default=d["host"].default, help="where to listen (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=d["port"].default, help="(default %(default)s)")
    p.add_argument(
        "--api-key", help="clients must send 'Authorization: Bearer KEY' (the openai client's api_key)"
    )
    p.add_argument("--model-name", help="the model id clients use (default: the store directory's name)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=d["max_batch"].default,
        help="most sequences in one generation; 1 runs every request alone (default %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=d["max_queue"].default,
        help="most requests waiting for a generation; more get 429 (default %(default)s)",
    )
    p.add_argument(
        "--batch-wait",
        type=float,
        default=d["batch_wait"].default,
        help="an idle server starts once no request has arrived for this many seconds, at most "
        f"{BATCH_WAIT_ROUNDS}x that after the first (default %(default)s)",
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="start the Ray dashboard (on 127.0.0.1) with the Ray instance zipmoe serve starts (not with --address)",
    )
    p.add_argument(
        "--trace-out",
        help="record the routing of every generation served (zipmoe-trace/1, appended): "
        "what `zipmoe plan` and `zipmoe simulate` take",
    )
    p.add_argument("--plan", help="a plan from `zipmoe plan --out` (default: planned at start-up)")
    add_engine_options(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from ..serve.config import ServeConfig
    from ..serve.launcher import run

    engine = engine_kwargs(args)
    address = engine.pop("address")
    config = ServeConfig(
        store_dir=args.store_dir,
        engine=engine,
        model_name=args.model_name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batch_wait=args.batch_wait,
        api_key=args.api_key,
        host=args.host,
        port=args.port,
        trace_out=args.trace_out,
        plan=args.plan,
    )
    if not config.loopback and config.api_key is None:
        print(
            f"zipmoe serve: warning: listening on {config.host} without --api-key: anyone who can reach this "
            "machine can use the model",
            file=sys.stderr,
        )
    stop = threading.Event()
    old = {s: signal.signal(s, lambda signum, frame: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}

    def ready(url: str) -> None:
        print(f"zipmoe serve: model {config.name!r} at {url} (Ctrl-C to stop)", flush=True)

    try:
        run(config, stop, address=address, dashboard=args.dashboard, on_ready=ready, signals=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print("zipmoe serve: stopped", file=sys.stderr)
    return 0
