"""Planning the cache from workloads: device profiles, workloads, the planner."""

from .planner import PLAN_FORMAT, Plan, expected_makespan, make_plan
from .profile import BUILTIN_PROFILES, DeviceProfile, load_profile
from .workload import Workload, estimated_sizes

__all__ = [
    "BUILTIN_PROFILES",
    "PLAN_FORMAT",
    "DeviceProfile",
    "Plan",
    "Workload",
    "estimated_sizes",
    "expected_makespan",
    "load_profile",
    "make_plan",
]
