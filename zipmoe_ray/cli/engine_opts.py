"""Engine flags shared by `zipmoe generate`, `chat`, `demo` and the benchmarks: one home per default."""

from __future__ import annotations

import argparse

from ..cache.split import FORM_POLICIES
from ..runtime.config import EngineConfig
from ..runtime.sizes import parse_size
from ..store.io import CACHE_MODES

__all__ = ["add_engine_options", "engine_kwargs"]


def _bandwidth(text: str) -> float:
    """'0.5GB' or '500MB' (per second) -> bytes/s."""
    t = text.strip().removesuffix("/s")
    try:
        return float(parse_size(t, what="--ssd-bandwidth"))
    except Exception as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_engine_options(p: argparse.ArgumentParser, *, budget_default: str = "50%") -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--memory-budget",
        default=budget_default,
        help=f"bytes for all expert forms and buffers: 1.5GiB, 800MB, or a share of the routed-expert bytes "
        f"like 25%% (default {budget_default.replace('%', '%%')})",  # argparse %-formats help
    )
    g.add_argument("--backend", choices=["ray", "local"], default="ray")
    g.add_argument("--address", help="attach to a running Ray cluster (HOST:PORT or auto)")
    g.add_argument(
        "--nodes",
        help="with --address: the cluster nodes to serve across, comma-separated names (a node's custom "
        "resource) or addresses (default: every alive node)",
    )
    g.add_argument(
        "--node-timeout",
        type=float,
        default=EngineConfig.node_timeout,
        help="seconds a layer waits on another node before checking it is alive; a node that then does not "
        f"answer a ping within as long is declared failed (default {EngineConfig.node_timeout:g})",
    )
    g.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    g.add_argument("--num-decompressors", type=int, help="decode lanes W (default: one per CPU core)")
    g.add_argument("--policy", choices=list(FORM_POLICIES), default="zipmoe", help="cache forms to use")
    g.add_argument(
        "--read-mode", choices=list(CACHE_MODES), default="bypass", help="page-cache bypass for expert reads"
    )
    g.add_argument("--ssd-bandwidth", type=_bandwidth, help="emulate an SSD of this many bytes/s, e.g. 0.5GB")
    g.add_argument("--ssd-latency", type=float, default=0.0, help="emulated seconds per read (with a cap)")
    g.add_argument("--no-calibrate", action="store_true", help="skip the start-up calibration")


def engine_kwargs(args) -> dict:
    return dict(
        memory_budget=args.memory_budget,
        backend=args.backend,
        address=args.address,
        nodes=tuple(n.strip() for n in args.nodes.split(",") if n.strip()) if args.nodes else None,
        node_timeout=args.node_timeout,
        device=args.device,
        num_decompressors=args.num_decompressors,
        policy=args.policy,
        cache_mode=args.read_mode,
        bandwidth=args.ssd_bandwidth,
        latency=args.ssd_latency,
        calibrate=not args.no_calibrate,
    )
