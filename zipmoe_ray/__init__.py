"""zipmoe-ray: bit-exact serving of Mixture-of-Experts LLMs on memory-constrained edge devices.

Public API (pinned by tests/test_public_api.py)::

    from zipmoe_ray import ZipMoEEngine, EngineConfig, GenerationOutput          # serving
    from zipmoe_ray import open_store, compress, CompressOptions, ReadOptions, verify_store, inspect_store
    from zipmoe_ray import build_tiny_model, encode, decode
    import zipmoe_ray.actors                                                     # the stages as Ray actors

Heavy submodules (torch, transformers) are imported on first use, so ``import zipmoe_ray`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import (
    ArchitectureError,
    BudgetError,
    CheckpointError,
    ChecksumError,
    ClusterError,
    ConfigError,
    DTypeError,
    FormatVersionError,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    ZipMoEError,
)

_LAZY = {
    "CountTrace": ".trace",
    "DeviceProfile": ".plan",
    "Plan": ".plan",
    "Workload": ".plan",
    "calibrate": ".plan.calibrate",
    "load_profile": ".plan",
    "make_plan": ".plan",
    "simulate": ".sim",
    "EngineConfig": ".runtime.config",
    "GenerationOutput": ".engine",
    "ZipMoEEngine": ".engine",
    "CompressOptions": ".store",
    "ReadOptions": ".store",
    "Store": ".store",
    "build_tiny_model": ".models.tiny",
    "compress": ".store",
    "decode": ".codec",
    "encode": ".codec",
    "inspect_store": ".store.inspect",
    "open_store": ".store",
    "supported_architectures": ".models.registry",
    "verify_store": ".store.verify",
}

__all__ = [
    "ArchitectureError",
    "BudgetError",
    "CheckpointError",
    "ChecksumError",
    "ClusterError",
    "CompressOptions",
    "ConfigError",
    "CountTrace",
    "DTypeError",
    "DeviceProfile",
    "EngineConfig",
    "FormatVersionError",
    "GenerationOutput",
    "Plan",
    "ReadOptions",
    "Store",
    "StoreCorruptError",
    "StoreError",
    "StoreMismatchError",
    "Workload",
    "ZipMoEEngine",
    "ZipMoEError",
    "__version__",
    "build_tiny_model",
    "calibrate",
    "compress",
    "decode",
    "encode",
    "inspect_store",
    "load_profile",
    "make_plan",
    "open_store",
    "simulate",
    "supported_architectures",
    "verify_store",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zipmoe_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from .codec import decode, encode
    from .engine import GenerationOutput, ZipMoEEngine
    from .models.registry import supported_architectures
    from .models.tiny import build_tiny_model
    from .plan import DeviceProfile, Plan, Workload, load_profile, make_plan
    from .plan.calibrate import calibrate
    from .runtime.config import EngineConfig
    from .sim import simulate
    from .store import CompressOptions, ReadOptions, Store, compress, open_store
    from .store.inspect import inspect_store
    from .store.verify import verify_store
    from .trace import CountTrace
