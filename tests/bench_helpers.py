"""Importing the benchmarks' own modules (benchmarks/ is scripts, not a package) in tests."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_modules(*names: str):
    """The named modules of benchmarks/ (``"bench_e2e"``, ``"e2e.report"``), with benchmarks/ on sys.path
    while the block runs (their own imports resolve there) and taken off after."""
    sys.path.insert(0, str(BENCH))
    try:
        yield tuple(importlib.import_module(n) for n in names)
    finally:
        sys.path.remove(str(BENCH))
