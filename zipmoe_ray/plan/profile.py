"""Device profiles: a JSON description of a machine, for planning and simulating where we are not.

Fields (all per the device, not per model, except the two optional non-MoE times):

=========================  =====================================================================
cpu_cores                  CPU cores of the machine
decode_workers             decompression lanes W the runtime would run (cores left for decoding)
decompress_gbps_per_core   exponent decompression, GB/s of BF16 it represents, one core
recombine_gbps_per_core    recombination of planes into BF16 on a CPU core, GB/s of BF16
recombine_on_device        recombination runs on the accelerator (decode lanes only decompress)
ssd_read_gbps, ssd_latency_s   the SSD: sequential read bandwidth and per-request latency
executor_gbps              the executor applying an expert to a token streams its weights at this rate
executor_cores             CPU cores the executor computes on, shared with the decode lanes (its torch
                           threads); 0: it computes on an accelerator (the simulator then lets lanes
                           and executor run side by side undisturbed)
request_overhead_s         one scheduler round trip per MoE layer that misses (Ray hops)
delivery_overhead_s        executor time per delivered expert, beside computing it (building its weights
                           from the delivered buffers, the client's bookkeeping)
non_moe_s_per_layer        executor time per layer outside the routed experts (attention, shared
                           experts, norms), per step; null: non-expert bytes of a layer / executor_gbps
non_moe_s_per_token        per generated token outside the layers (embeddings, lm_head, sampling)
memory_bytes               memory shared by CPU and accelerator
sources                    where each figure comes from: "measured ...", "datasheet ...", "estimate ..."
=========================  =====================================================================
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..schedule.costs import CostModel

__all__ = ["BUILTIN_PROFILES", "DeviceProfile", "load_profile"]


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    cpu_cores: int
    decode_workers: int
    decompress_gbps_per_core: float
    recombine_gbps_per_core: float
    recombine_on_device: bool
    ssd_read_gbps: float
    ssd_latency_s: float
    executor_gbps: float
    memory_bytes: int
    request_overhead_s: float = 0.0
    delivery_overhead_s: float = 0.0
    non_moe_s_per_layer: float | None = None
    non_moe_s_per_token: float | None = None
    executor_cores: int = 0
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("cpu_cores", "decode_workers", "memory_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"device profile {self.name}: {name} must be a positive integer")
        for name in ("decompress_gbps_per_core", "recombine_gbps_per_core", "ssd_read_gbps", "executor_gbps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"device profile {self.name}: {name} must be positive")
        for name in ("ssd_latency_s", "request_overhead_s", "delivery_overhead_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"device profile {self.name}: {name} must be >= 0")
        if not isinstance(self.executor_cores, int) or not 0 <= self.executor_cores <= self.cpu_cores:
            raise ConfigError(
                f"device profile {self.name}: executor_cores must be an integer from 0 (an accelerator) "
                f"to cpu_cores ({self.cpu_cores})"
            )

    @property
    def decode_gbps_per_core(self) -> float:
        """Full decode rate of one lane: decompress, plus recombine unless the accelerator does it."""
        if self.recombine_on_device:
            return self.decompress_gbps_per_core
        return 1.0 / (1.0 / self.decompress_gbps_per_core + 1.0 / self.recombine_gbps_per_core)

    def costs(self) -> CostModel:
        return CostModel(
            read_bps=self.ssd_read_gbps * 1e9,
            read_latency=self.ssd_latency_s,
            decode_bps=self.decode_gbps_per_core * 1e9,
            decompress_bps=self.decompress_gbps_per_core * 1e9,
            source=f"device profile {self.name}",
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "device profile") -> DeviceProfile:
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"{where}: not a device profile ({e})") from None

    def with_(self, **changes) -> DeviceProfile:
        return replace(self, **changes)


_ORIN_SOURCES = {
    "cpu_cores": "datasheet: Jetson AGX Orin 64GB, 12-core Arm Cortex-A78AE (32GB: 8 cores)",
    "decode_workers": "estimate: all cores but 2 (executor host thread, Ray, OS)",
    "decompress_gbps_per_core": "estimate: 5.6 GB/s measured on this project's x86 cores, scaled by ~0.55 for a "
    "2.2 GHz A78AE running zstd's Huffman decoder",
    "recombine_gbps_per_core": "estimate: 6 GB/s measured here, scaled by ~0.5 (only used without the GPU path)",
    "recombine_on_device": "design: recombination runs on the Ampere GPU (torch integer ops)",
    "ssd_read_gbps": "estimate: PCIe Gen4 x4 NVMe as fitted to Orin developer kits, ~2 GB/s sustained "
    "(DESIGN.md section 1)",
    "ssd_latency_s": "estimate: typical NVMe 4 KiB random-read latency, ~100 us",
    "executor_gbps": "estimate: 204.8 GB/s LPDDR5 peak (datasheet) at ~70% efficiency for GEMV on the GPU",
    "memory_bytes": "datasheet: 64 GB LPDDR5 shared by CPU and GPU (32 GB model: 32 GB)",
    "request_overhead_s": "estimate: one Ray actor round trip on 12 Arm cores, ~0.5 ms",
    "delivery_overhead_s": "estimate: ~0.2 ms of object-store hand-off per expert",
}

_ORIN_64 = DeviceProfile(
    name="orin-agx-64gb",
    cpu_cores=12,
    decode_workers=10,
    decompress_gbps_per_core=3.0,
    recombine_gbps_per_core=3.0,
    recombine_on_device=True,
    ssd_read_gbps=2.0,
    ssd_latency_s=100e-6,
    executor_gbps=140.0,
    memory_bytes=64 * 10**9,
    request_overhead_s=0.5e-3,
    delivery_overhead_s=0.2e-3,
    sources=_ORIN_SOURCES,
)

BUILTIN_PROFILES: dict[str, DeviceProfile] = {
    "orin-agx-64gb": _ORIN_64,
    # the 32 GB module: 8 cores and half the memory, otherwise the same figures
    "orin-agx-32gb": _ORIN_64.with_(
        name="orin-agx-32gb", cpu_cores=8, decode_workers=6, memory_bytes=32 * 10**9
    ),
}


def load_profile(name_or_path: str | os.PathLike | DeviceProfile) -> DeviceProfile:
    """A built-in profile by name, or a profile JSON file."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    key = str(name_or_path)
    if key in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[key]
    p = Path(key)
    if not p.is_file():
        raise ConfigError(
            f"device profile {key!r} is neither a built-in ({', '.join(BUILTIN_PROFILES)}) nor a JSON file; "
            "create one with `zipmoe calibrate --out FILE`"
        )
    try:
        return DeviceProfile.from_json(json.loads(p.read_text()), str(p))
    except ValueError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
