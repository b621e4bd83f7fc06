"""The compression-aware expert cache (plain classes, no Ray)."""

from .expert_cache import CacheEntry, Demotion, ExpertCache
from .forms import ExpertSizes, Form, Key
from .layout import ModelLayout, expert_sizes
from .popularity import Popularity
from .split import FORM_POLICIES, SplitRule

__all__ = [
    "FORM_POLICIES",
    "CacheEntry",
    "Demotion",
    "ExpertCache",
    "ExpertSizes",
    "Form",
    "Key",
    "ModelLayout",
    "Popularity",
    "SplitRule",
    "expert_sizes",
]
