"""The ``zipmoe`` command: one subcommand per pipeline stage. Only this package prints."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import env
from .._version import __version__
from ..errors import ZipMoEError
from .demo import add_demo_command
from .generate_cmds import add_generate_commands
from .plan_cmds import add_plan_commands
from .serve_cmd import add_serve_command
from .store_cmds import add_store_commands

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zipmoe",
        description="Bit-exact serving of Mixture-of-Experts LLMs on memory-constrained devices.",
    )
    parser.add_argument("--version", action="version", version=f"zipmoe-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_demo_command(sub)
    add_generate_commands(sub)
    add_store_commands(sub)
    add_plan_commands(sub)
    add_serve_command(sub)
    p = sub.add_parser("env", help="list the ZIPMOE_* environment variables")
    p.set_defaults(func=_cmd_env)
    return parser


def _cmd_env(args) -> int:
    for v in env.VARIABLES.values():
        print(f"{v.name}={env.get_str(v.name)!s:<20} {v.help} (default {v.default!r})")
    return 0


def _setup_logging(verbose: int) -> None:
    level = {0: env.get_str("ZIPMOE_LOG_LEVEL").upper(), 1: "INFO"}.get(verbose, "DEBUG")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("zipmoe_ray").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except ZipMoEError as e:
        print(f"zipmoe {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"zipmoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
