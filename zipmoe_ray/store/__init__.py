"""The lossless expert store: writing (compress), reading (open_store), verifying and inspecting."""

from .checkpoint import Checkpoint
from .format import FORMAT_VERSION, ExpertRecord, StoreIndex, TensorRecord
from .io import BandwidthLimiter, ExtentReader, ReadOptions
from .reader import Store, open_store
from .writer import CompressOptions, Progress, compress

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
