"""The compression-aware expert cache (plain classes, no Ray)."""

from .expert_cache import CacheEntry, Demotion, ExpertCache
from .forms import ExpertSizes, Form
from .popularity import Popularity
from .split import POLICIES, SplitRule

__all__ = [
    "POLICIES",
    "CacheEntry",
    "Demotion",
    "ExpertCache",
    "ExpertSizes",
    "Form",
    "Popularity",
    "SplitRule",
]
