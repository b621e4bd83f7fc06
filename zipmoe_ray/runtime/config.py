"""EngineConfig: every setting of a ZipMoEEngine, validated in one place.

Each field that is also a command-line flag carries its flag, help, choices and parser in its metadata
(:class:`CliOption`); ``cli/engine_opts.py`` builds the flags of ``zipmoe generate``, ``chat`` and the
benchmarks from them, so a setting has one name and one default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..cache.popularity import DEFAULT_DECAY, DEFAULT_POPULARITY, POPULARITY_KINDS
from ..cache.split import FORM_POLICIES, SplitRule
from ..errors import ConfigError
from ..store.io import READ_MODES, ReadOptions
from .sizes import parse_bandwidth

__all__ = ["BACKENDS", "LANES", "CliOption", "EngineConfig", "check_replan_every", "parse_address"]

BACKENDS = ("ray", "local")
LANES = ("auto", "executor", "actors")  # where the Ray backend runs its lanes (backends/colocated.py)
# reads whose device intervals a timeline keeps (the last ones; about 3 MB): minutes of an emulated SSD
READ_TIMELINE = 16384


def check_replan_every(value) -> None:
    """Raises ConfigError unless ``value`` is a whole number of decode steps (0: no online re-planning);
    the engine's config and the simulator take the same setting."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"replan_every must be a whole number of decode steps (0: off), got {value!r}")


@dataclass(frozen=True)
class CliOption:
    """How a config field appears on the command line."""

    help: str
    flag: str | None = None  # default: --field-name
    parse: Callable[[str], Any] | None = None  # text -> value (raise ZipMoEError or ValueError)
    choices: tuple[str, ...] | None = None
    kind: str = "value"  # value | switch (store_true) | negated (--no-X stores False) | optional-bool
    cli_default: Any = None  # for fields without a dataclass default
    metavar: str | None = None


def _cli(help: str, **kw) -> dict:
    return {"cli": CliOption(help, **kw)}


def _nodes(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of a Ray cluster address ``HOST:PORT`` (``[v6]:PORT``, or ``ray://HOST:PORT`` for Ray
    Client); raises ConfigError naming the address otherwise."""
    rest = address[len("ray://") :] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "/ "):
        raise ConfigError(
            f"--address {address!r} is not HOST:PORT; give the address of the cluster's head node as "
            "`ray start --head` printed it, e.g. 192.168.1.20:6379"
        )
    return host, int(port)


@dataclass(frozen=True)
class EngineConfig:
    memory_budget: int | str = field(
        metadata=_cli(
            "bytes for all expert forms and buffers in flight: 1.5GiB, 800MB, or a share of the routed-expert "
            "bytes like 25%",
            cli_default="50%",
        )
    )
    device: str | None = field(
        default=None, metadata=_cli("cuda[:N], mps or cpu (default: the best available)")
    )
    num_decompressors: int | None = field(
        default=None, metadata=_cli("decode lanes W (default: one per CPU core)", parse=int, metavar="W")
    )
    backend: str = field(default="ray", metadata=_cli("where the stages run", choices=BACKENDS))
    lanes: str = field(
        default="auto",
        metadata=_cli(
            "ray backend: where the I/O and decode lanes run: 'executor', threads in the executor's "
            "process, the scheduler staying the central actor (fewer copies and task submissions on the "
            "cores the model uses); 'actors', actors exchanging planes through the object store (their "
            "own processes, restarted by Ray if they die); 'auto' (default): executor on one node, actors "
            "on every node of a cluster. The local backend's lanes are always threads of its one process",
            choices=LANES,
        ),
    )
    address: str | None = field(
        default=None,
        metadata=_cli("attach to a running Ray cluster at HOST:PORT (default: start one in this process)"),
    )
    connect_timeout: float = field(
        default=30.0,
        metadata=_cli("seconds to reach and join the Ray cluster at --address before giving up", parse=float),
    )
    nodes: tuple[str, ...] | None = field(
        default=None,
        metadata=_cli(
            "with --address: the cluster nodes to serve across, comma-separated names (a node's custom "
            "resource) or addresses (default: every alive node)",
            parse=_nodes,
        ),
    )
    node_timeout: float = field(
        default=5.0,
        metadata=_cli(
            "seconds a layer waits on another node before checking it is alive; a node that then does not "
            "answer a ping within as long is declared failed",
            parse=float,
        ),
    )
    read_mode: str = field(
        default="bypass",
        metadata=_cli(
            "how experts are read: bypass (O_DIRECT where possible, else drop), direct, drop "
            "(fadvise DONTNEED) or page-cache",
            choices=READ_MODES,
        ),
    )
    bandwidth: float | None = field(
        default=None,
        metadata=_cli(
            "emulate an SSD of this many bytes/s, e.g. 0.5GB", flag="--ssd-bandwidth", parse=parse_bandwidth
        ),
    )
    latency: float = field(
        default=0.0,
        metadata=_cli("emulated seconds per read (with --ssd-bandwidth)", flag="--ssd-latency", parse=float),
    )
    policy: str = field(default="zipmoe", metadata=_cli("cache forms to use", choices=tuple(FORM_POLICIES)))
    split: SplitRule | None = None  # explicit shares per form (overrides the policy's); Python API only
    popularity: str = field(
        default=DEFAULT_POPULARITY,
        metadata=_cli(
            "how experts are ranked for caching: lfu (aged token counts) or lru", choices=POPULARITY_KINDS
        ),
    )
    decay: float = field(
        default=DEFAULT_DECAY,
        metadata=_cli(
            "lfu popularity decay per generation step, in (0, 1]", flag="--popularity-decay", parse=float
        ),
    )
    calibrate: bool = field(
        default=True,
        metadata=_cli(
            "skip the start-up calibration of read and decode rates (plan with nominal figures)",
            flag="--no-calibrate",
            kind="negated",
        ),
    )
    recombine_on_device: bool | None = field(
        default=None,
        metadata=_cli(
            "recombine planes on the accelerator (default: when there is one)", kind="optional-bool"
        ),
    )
    torch_threads: int | None = field(
        default=None, metadata=_cli("the executor's intra-op threads (default: CPU count)", parse=int)
    )
    dtype: str = "auto"  # non-expert weights' dtype as stored; Python API only
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources pinning all stages
    prefetch: bool = field(
        default=True,
        metadata=_cli(
            "do not fetch a MoE layer's predicted experts while the layer before it computes (every fetch "
            "then waits for its layer's routing)",
            flag="--no-prefetch",
            kind="negated",
        ),
    )
    replan_every: int = field(
        default=256,
        metadata=_cli(
            "re-plan the split between cache forms online every N decode steps: time the planned split "
            "and full-only for a few steps each while generating and keep the "
            "fastest (0: keep the start-up plan; applies to the zipmoe policy on one node)",
            parse=int,
            metavar="N",
        ),
    )
    verify: bool = field(
        default=False,
        metadata=_cli(
            "check every byte of the store against its checksum before serving (reads the whole store "
            "once); without it experts are checked as they are first read",
            kind="switch",
        ),
    )
    allow_budget_above_memory: bool = field(
        default=False,
        metadata=_cli(
            "accept a --memory-budget larger than this machine's memory (for those who know better: "
            "swap, or memory another node brings)",
            kind="switch",
        ),
    )
    timeline: bool = field(
        default=False,
        metadata=_cli(
            "record every MoE layer's events (request, each expert ready and computed) and the storage "
            "device's reads for profiling; read them with ZipMoEEngine.timeline() and read_timeline()",
            kind="switch",
        ),
    )

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.address is not None and self.backend != "ray":
            raise ConfigError("--address needs the ray backend")
        if self.lanes not in LANES:
            raise ConfigError(f"lanes {self.lanes!r} is not one of {', '.join(LANES)}")
        if self.address is not None:
            if not isinstance(self.address, str):
                raise ConfigError(f"address must be HOST:PORT, got {self.address!r}")
            parse_address(self.address)
        if not (
            isinstance(self.connect_timeout, (int, float))
            and not isinstance(self.connect_timeout, bool)
            and math.isfinite(self.connect_timeout)
            and self.connect_timeout > 0
        ):
            raise ConfigError(
                f"connect_timeout must be a positive number of seconds, got {self.connect_timeout!r}"
            )
        check_replan_every(self.replan_every)
        for name in ("num_decompressors", "torch_threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.read_mode not in READ_MODES:
            raise ConfigError(f"read mode {self.read_mode!r} is not one of {', '.join(READ_MODES)}")
        if self.policy not in FORM_POLICIES:
            raise ConfigError(f"policy {self.policy!r} is not one of {', '.join(FORM_POLICIES)}")
        if self.popularity not in POPULARITY_KINDS:
            raise ConfigError(f"popularity {self.popularity!r} is not one of {', '.join(POPULARITY_KINDS)}")
        if not (isinstance(self.decay, (int, float)) and 0 < self.decay <= 1):
            raise ConfigError(f"decay must be in (0, 1], got {self.decay!r}")
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
        return ReadOptions(
            read_mode=self.read_mode,
            bandwidth=self.bandwidth,
            latency=self.latency,
            timeline=READ_TIMELINE if self.timeline else 0,
        )

    def split_rule(self) -> SplitRule:
        return self.split or SplitRule.for_policy(self.policy)
