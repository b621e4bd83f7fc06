"""Parsing memory sizes: ``1.5GiB``, ``800MB``, ``123456`` bytes, or ``25%`` of the routed-expert bytes."""

from __future__ import annotations

import re

from ..errors import BudgetError

__all__ = ["format_bytes", "parse_bandwidth", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")
_PCT = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


def parse_size(text: str | int | float, *, total: int | None = None, what: str = "memory budget") -> int:
    """Bytes from ``text``: an integer, a number with a unit (B, KB, MB, GB, TB in powers of 1000; KiB, MiB,
    GiB, TiB in powers of 1024) or a percentage of ``total``. Raises BudgetError naming the accepted forms."""
    if isinstance(text, bool):
        raise BudgetError(f"{what} must be a size, got {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise BudgetError(f"{what} must not be negative, got {text}")
        return int(text)
    m = _PCT.match(text)
    if m:
        if total is None:
            raise BudgetError(
                f"{what} {text!r} is a percentage, but there is nothing it is a percentage of here"
            )
        pct = float(m["num"])
        if pct <= 0:
            raise BudgetError(f"{what} must be more than 0%, got {text!r}")
        return int(total * pct / 100)
    m = _SIZE.match(text)
    if m and m["unit"].lower() in _UNITS:
        return int(float(m["num"]) * _UNITS[m["unit"].lower()])
    raise BudgetError(
        f"{what} {text!r} is not a size: use bytes (123456), a unit (800MB, 1.5GiB) or a share of the "
        "routed-expert bytes (25%)"
    )


def parse_bandwidth(text: str | int | float) -> float:
    """Bytes/s from ``0.5GB``, ``500MB/s`` or a number. Raises BudgetError naming the accepted forms."""
    if isinstance(text, str):
        text = text.strip().removesuffix("/s")
    return float(parse_size(text, what="bandwidth (--ssd-bandwidth)"))


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
