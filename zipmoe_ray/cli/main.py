"""The ``zipmoe`` command: one subcommand per pipeline stage. Only this package prints.

Errors a user can cause (ZipMoEError, and OSError from the paths they give) end the command with one line
``zipmoe COMMAND: error: ...`` and exit status 1; ``-v`` adds the traceback. SIGTERM and Ctrl-C end every
command promptly, wherever it is (see signals.py): status 143 and 130 (``-vv`` shows where it was).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback

from .. import env
from .._version import __version__
from ..errors import ZipMoEError
from .demo import add_demo_command
from .generate_cmds import add_generate_commands
from .plan_cmds import add_plan_commands
from .serve_cmd import add_serve_command
from .signals import Interrupted, install_signal_handlers
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
    p = sub.add_parser(
        "env", help="list the ZIPMOE_* environment variables and which codec kernels this install uses"
    )
    p.set_defaults(func=_cmd_env)
    return parser


def _cmd_env(args) -> int:
    for v in env.VARIABLES.values():
        print(f"{v.name}={env.get_str(v.name)!s:<20} {v.help} (default {v.default!r})")
    from ..codec import checksum, planes

    print(f"in use: bit planes by {planes.IMPLEMENTATION}, crc32 by {checksum.IMPLEMENTATION}")
    return 0


def _setup_logging(verbose: int) -> None:
    level = {0: env.get_str("ZIPMOE_LOG_LEVEL").upper(), 1: "INFO"}.get(verbose, "DEBUG")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("zipmoe_ray").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    # Ray's driver prints a C stack dump ("*** SIGTERM received ...") for every SIGTERM: not a crash here,
    # where SIGTERM is how a command is stopped (set RAY_DISABLE_FAILURE_SIGNAL_HANDLER=0 to keep it)
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    signals = install_signal_handlers()
    try:
        return int(args.func(args) or 0)
    except ZipMoEError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"zipmoe {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a path the user gave: unreadable, not writable, a full disk
        if args.verbose:
            traceback.print_exc()
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"zipmoe {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as e:
        received = None
        if signals is not None:
            received = signals.wait_received(0.5 if isinstance(e, SystemExit) else 0.0)
        if isinstance(e, SystemExit) and received is None:
            raise  # an ordinary exit (argparse, a command's sys.exit)
        if args.verbose > 1:  # where it was stopped: for -vv
            traceback.print_exc()
        name = "terminated" if received == Interrupted.SIGTERM else "interrupted"  # Ctrl-C, or no signal
        print(f"zipmoe {args.command}: {name}", file=sys.stderr)
        rc = 143 if received == Interrupted.SIGTERM else 130
        if received is not None:
            # The command has unwound (its engine stopped, its files went). A signal that landed inside
            # ray.init can leave Ray's C++ core worker half built, and the interpreter's finalisation then
            # tears it down in an order that crashes (SIGSEGV, seen under load): end here, without it.
            # Processes Ray started for this command share its fate.
            signals.uninstall()
            _exit_now(rc)
        return rc
    finally:
        if signals is not None:
            signals.uninstall()


def _exit_now(rc: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
