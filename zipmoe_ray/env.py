"""The registry of ``ZIPMOE_*`` environment variables: the only module that reads them.

Each variable has one entry here with its default and meaning; ``zipmoe env`` (CLI) lists them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["VARIABLES", "EnvVar", "get_bool", "get_int", "get_str"]


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    help: str


VARIABLES: dict[str, EnvVar] = {
    v.name: v
    for v in (
        EnvVar(
            "ZIPMOE_CACHE_DIR",
            "~/.cache/zipmoe",
            "where `zipmoe demo` keeps its model (the upcycled SmolLM2 MoE, or the tiny random one) and store",
        ),
        EnvVar(
            "ZIPMOE_CODEC_THREADS",
            "",
            "threads for shard decompression in codec.decode when none are given (default: CPU count)",
        ),
        EnvVar(
            "ZIPMOE_PLANES",
            "auto",
            "bit-plane split and merge: auto (the C extension where the package was built with it, else "
            "numpy), c (the extension or an error), numpy (always numpy: same bits, slower)",
        ),
        EnvVar(
            "ZIPMOE_LOG_LEVEL",
            "WARNING",
            "log level of the zipmoe_ray loggers when run from the CLI (DEBUG, INFO, WARNING, ...)",
        ),
    )
}


def _raw(name: str) -> str:
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a registered ZIPMOE_* variable; add it to zipmoe_ray.env.VARIABLES")
    return os.environ.get(name, VARIABLES[name].default)


def get_str(name: str) -> str:
    """Value of a registered variable (its default when unset)."""
    return _raw(name)


def get_int(name: str) -> int | None:
    """Integer value of a registered variable, ``None`` when empty; raises ConfigError when not an integer."""
    from .errors import ConfigError

    raw = _raw(name).strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def get_bool(name: str) -> bool:
    """Boolean value of a registered variable: 1/true/yes/on are true."""
    return _raw(name).strip().lower() in {"1", "true", "yes", "on"}
