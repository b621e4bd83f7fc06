"""Engine flags shared by `zipmoe generate`, `chat` and the benchmarks, built from EngineConfig's fields.

Every flag's name, help, choices, parser and default come from the field's metadata (runtime/config.py
CliOption), so a setting has one home; ``engine_kwargs`` maps the parsed flags back onto the fields.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from ..errors import ZipMoEError
from ..runtime.config import CliOption, EngineConfig

__all__ = ["add_engine_options", "engine_kwargs"]


def _options() -> list[tuple[str, CliOption, object]]:
    out = []
    for f in fields(EngineConfig):
        opt = f.metadata.get("cli")
        if opt is not None:
            default = opt.cli_default if f.default is MISSING else f.default
            out.append((f.name, opt, default))
    return out


def _typed(parse, flag: str):
    def convert(text: str):
        try:
            return parse(text)
        except (ZipMoEError, ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: {e}") from None

    convert.__name__ = flag
    return convert


def add_engine_options(p: argparse.ArgumentParser, **defaults) -> None:
    """Add the engine's flags to ``p``; ``defaults`` (by field name) override a command's defaults."""
    g = p.add_argument_group("engine")
    for name, opt, default in _options():
        default = defaults.get(name, default)
        flag = opt.flag or "--" + name.replace("_", "-")
        kw: dict = {"dest": name, "help": opt.help.replace("%", "%%")}  # argparse %-formats help
        if opt.kind == "switch":
            kw.update(action="store_true", default=bool(default))
        elif opt.kind == "negated":
            kw.update(action="store_false", default=default)
        elif opt.kind == "optional-bool":
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            kw.update(default=default, choices=opt.choices, metavar=opt.metavar)
            if opt.parse is not None:
                kw["type"] = _typed(opt.parse, flag)
        if default is not None and opt.kind in ("value", "optional-bool"):
            kw["help"] += f" (default {str(default).replace('%', '%%')})"
        g.add_argument(flag, **kw)


def engine_kwargs(args) -> dict:
    """The EngineConfig fields given by the flags ``add_engine_options`` added."""
    return {name: getattr(args, name) for name, _, _ in _options()}
