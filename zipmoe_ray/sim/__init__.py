"""Trace-driven simulation of the runtime on devices we do not have (no Ray, no torch)."""

from .bound import belady_misses, lower_bound
from .runner import SimHandle, SimRunner
from .simulator import POLICIES, SimResult, simulate

__all__ = ["POLICIES", "SimHandle", "SimResult", "SimRunner", "belady_misses", "lower_bound", "simulate"]
