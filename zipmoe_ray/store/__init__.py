"""The lossless expert store: writing (compress), reading (open_store), verifying and inspecting.

The names are loaded on first use (see zipmoe_ray._lazy): the readers import torch, and the parts that need
only the store's options or format (the simulator, the CLI's argument parser) must not pay for it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_WHERE = {
    "Checkpoint": ".checkpoint",
    "FORMAT_VERSION": ".format",
    "ExpertRecord": ".format",
    "StoreIndex": ".format",
    "TensorRecord": ".format",
    "BandwidthLimiter": ".io",
    "ExtentReader": ".io",
    "ReadOptions": ".io",
    "Store": ".reader",
    "open_store": ".reader",
    "CompressOptions": ".writer",
    "Progress": ".writer",
    "compress": ".writer",
}
__all__ = [
    "FORMAT_VERSION",
    "BandwidthLimiter",
    "Checkpoint",
    "CompressOptions",
    "ExpertRecord",
    "ExtentReader",
    "Progress",
    "ReadOptions",
    "Store",
    "StoreIndex",
    "TensorRecord",
    "compress",
    "open_store",
]
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .format import FORMAT_VERSION, ExpertRecord, StoreIndex, TensorRecord
    from .io import BandwidthLimiter, ExtentReader, ReadOptions
    from .reader import Store, open_store
    from .writer import CompressOptions, Progress, compress
