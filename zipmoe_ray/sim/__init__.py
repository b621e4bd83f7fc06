"""Trace-driven simulation of the runtime on devices we do not have (no Ray; the runtime's own cache and scheduler)."""

from .bound import belady_misses, lower_bound
from .cluster import NETWORKS, ClusterSimResult, NetworkProfile, simulate_cluster
from .runner import SimHandle, SimRunner
from .simulator import SIM_POLICIES, SimResult, simulate

__all__ = [
    "NETWORKS",
    "SIM_POLICIES",
    "ClusterSimResult",
    "NetworkProfile",
    "SimHandle",
    "SimResult",
    "SimRunner",
    "belady_misses",
    "lower_bound",
    "simulate",
    "simulate_cluster",
]
