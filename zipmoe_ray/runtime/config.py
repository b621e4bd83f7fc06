"""EngineConfig: every setting of a ZipMoEEngine, validated in one place (CLI flags map onto these fields)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..cache.split import FORM_POLICIES, SplitRule
from ..errors import ConfigError
from ..store.io import CACHE_MODES, ReadOptions

__all__ = ["BACKENDS", "EngineConfig"]

BACKENDS = ("ray", "local")


@dataclass(frozen=True)
class EngineConfig:
    memory_budget: int | str  # bytes, "1.5GiB", or "25%" of the routed-expert bytes (--memory-budget)
    device: str | None = None  # cuda, mps or cpu; None picks the best available (--device)
    num_decompressors: int | None = None  # W decode lanes; None = one per CPU core (--num-decompressors)
    backend: str = "ray"  # ray or local (--backend)
    address: str | None = None  # attach to a running Ray cluster (--address); None starts one in-process
    cache_mode: str = "bypass"  # how experts are read: page-cache, direct, drop or bypass (--read-mode)
    bandwidth: float | None = None  # emulated SSD bandwidth, bytes/s (--ssd-bandwidth)
    latency: float = 0.0  # emulated per-read latency, seconds (--ssd-latency)
    policy: str = "zipmoe"  # cache forms allowed: zipmoe, full-only, compressed-only, sm-only (--policy)
    split: SplitRule | None = None  # explicit shares per form (overrides the policy's)
    popularity: str = "lfu"  # lfu (aged token counts) or lru
    decay: float = 0.98  # popularity decay per generation step
    calibrate: bool = True  # measure read and decode rates at start-up (else nominal figures)
    recombine_on_device: bool | None = None  # None: on the accelerator when there is one
    torch_threads: int | None = None  # executor's intra-op threads; None = CPU count
    dtype: str = "auto"  # non-expert weights' dtype as stored
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources pinning all stages
    nodes: tuple[str, ...] | None = None  # cluster nodes to serve across (names or addresses); None = all
    node_timeout: float = 5.0  # seconds a layer waits on another node before checking that it lives

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.address is not None and self.backend != "ray":
            raise ConfigError("--address needs the ray backend")
        if self.num_decompressors is not None and (
            not isinstance(self.num_decompressors, int) or self.num_decompressors < 1
        ):
            raise ConfigError(f"num_decompressors must be a positive integer, got {self.num_decompressors!r}")
        if self.cache_mode not in CACHE_MODES:
            raise ConfigError(f"read mode {self.cache_mode!r} is not one of {', '.join(CACHE_MODES)}")
        if self.policy not in FORM_POLICIES:
            raise ConfigError(f"policy {self.policy!r} is not one of {', '.join(FORM_POLICIES)}")
        if self.popularity not in ("lfu", "lru"):
            raise ConfigError(f"popularity {self.popularity!r} is not lfu or lru")
        if not 0 < self.decay <= 1:
            raise ConfigError(f"decay must be in (0, 1], got {self.decay}")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"device {self.device!r} is not cpu, cuda[:N] or mps")
        if self.nodes is not None and (
            isinstance(self.nodes, str) or not all(isinstance(n, str) for n in self.nodes)
        ):
            raise ConfigError(f"nodes must be a list of node names, got {self.nodes!r}")
        if not (isinstance(self.node_timeout, (int, float)) and self.node_timeout > 0):
            raise ConfigError(f"node_timeout must be a positive number of seconds, got {self.node_timeout!r}")
        if self.nodes is not None and self.resources:
            raise ConfigError(
                "give either resources (pin every stage to one node) or nodes (serve across several)"
            )
        self.read_options()  # validates bandwidth and latency

    @property
    def workers(self) -> int:
        return self.num_decompressors or os.cpu_count() or 1

    def read_options(self) -> ReadOptions:
        return ReadOptions(cache=self.cache_mode, bandwidth=self.bandwidth, latency=self.latency)

    def split_rule(self) -> SplitRule:
        return self.split or SplitRule.for_policy(self.policy)

    @classmethod
    def for_tests(cls, **kw) -> EngineConfig:
        """Small, deterministic settings for tests: local backend, 2 lanes, page cache, nominal costs."""
        base = dict(
            memory_budget="100%",
            backend="local",
            num_decompressors=2,
            cache_mode="page-cache",
            calibrate=False,
        )
        base.update(kw)
        return cls(**base)
