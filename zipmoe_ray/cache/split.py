"""How the budget is split between cache forms until the planner (issue 4) chooses per workload.

The simple rule: after the staging reserve, give each allowed form a fixed share of the remaining budget
(default: 20% full, 30% compressed, 50% SM-only). The reasoning: when reading is the bottleneck, every byte
held as COMPRESSED or SM saves one byte of reading, while a byte held FULL saves only 0.66 bytes of reading
(but all the CPU work); SM-only covers the most experts per byte. Policies used as baselines pin one form.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .forms import Form

__all__ = ["FORM_POLICIES", "SplitRule"]

FORM_POLICIES = {
    "zipmoe": {Form.FULL: 0.2, Form.COMPRESSED: 0.3, Form.SM: 0.5},
    "full-only": {Form.FULL: 1.0},
    "compressed-only": {Form.COMPRESSED: 1.0},
    "sm-only": {Form.SM: 1.0},
}


@dataclass(frozen=True)
class SplitRule:
    """Shares of the cache budget per form (each in [0, 1], summing to at most 1)."""

    full: float = 0.2
    compressed: float = 0.3
    sm: float = 0.5

    def __post_init__(self):
        for name in ("full", "compressed", "sm"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ConfigError(f"split share {name}={v} must be between 0 and 1")
        if self.full + self.compressed + self.sm > 1 + 1e-9:
            raise ConfigError(f"split shares sum to {self.full + self.compressed + self.sm:.3f} > 1")

    @classmethod
    def for_policy(cls, policy: str) -> SplitRule:
        if policy not in FORM_POLICIES:
            raise ConfigError(f"unknown cache policy {policy!r}; choose one of {', '.join(FORM_POLICIES)}")
        s = FORM_POLICIES[policy]
        return cls(s.get(Form.FULL, 0.0), s.get(Form.COMPRESSED, 0.0), s.get(Form.SM, 0.0))

    def capacities(self, cache_bytes: int, full_bytes: int | None = None) -> dict[Form, int]:
        """Bytes per form out of ``cache_bytes``. When the allowed FULL share could hold every expert
        (``full_bytes``) given the whole cache, everything goes to FULL: nothing is gained by compression."""
        if full_bytes is not None and self.full > 0 and cache_bytes >= full_bytes:
            return {Form.FULL: cache_bytes, Form.COMPRESSED: 0, Form.SM: 0}
        return {
            Form.FULL: int(cache_bytes * self.full),
            Form.COMPRESSED: int(cache_bytes * self.compressed),
            Form.SM: int(cache_bytes * self.sm),
        }

    def describe(self) -> str:
        return f"full {self.full:.0%}, compressed {self.compressed:.0%}, sm-only {self.sm:.0%} of the cache budget"
