"""ServeConfig: every setting of `zipmoe serve` (the CLI flags map onto these fields), validated in one place."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["BATCH_WAIT_ROUNDS", "ServeConfig", "is_loopback"]

BATCH_WAIT_ROUNDS = 10  # an idle server gathers a burst for at most this many --batch-wait from its first


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1 or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeConfig:
    store_dir: str  # the zipmoe store to serve
    engine: dict[str, Any] = field(
        default_factory=dict
    )  # ZipMoEEngine keyword arguments (memory_budget, ...)
    model_name: str | None = None  # the name clients ask for (--model-name); None: the store's directory name
    max_batch: int = 8  # most sequences in one generation (--max-batch); 1 serves requests one at a time
    max_queue: int = 32  # most requests waiting for a generation before 429 (--max-queue)
    batch_wait: float = 0.05  # an idle server starts once no request came for this long (--batch-wait)
    api_key: str | None = None  # clients must send `Authorization: Bearer KEY` (--api-key)
    host: str = "127.0.0.1"  # where the HTTP proxy listens (--host)
    port: int = 8000  # (--port)
    trace_out: str | None = None  # record the routing of every generation here (--trace-out, zipmoe-trace/1)
    plan: str | None = None  # a plan from `zipmoe plan --out` to run instead of planning at start-up (--plan)

    def __post_init__(self):
        if not self.store_dir:
            raise ConfigError("give the store directory to serve")
        for name in ("trace_out", "plan"):
            v = getattr(self, name)
            if v is not None and not str(v).strip():
                raise ConfigError(f"{name} must not be empty (--{name.replace('_', '-')}); omit it instead")
        # the engine runs in a Serve replica, whose working directory is not the caller's
        for name in ("store_dir", "trace_out", "plan"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, os.path.abspath(os.path.expanduser(str(v))))
        if "memory_budget" not in self.engine:
            raise ConfigError("engine options need a memory_budget (--memory-budget)")
        for name, low in (("max_batch", 1), ("max_queue", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(
                    f"{name} must be an integer >= {low}, got {v!r} (--{name.replace('_', '-')})"
                )
        if not isinstance(self.batch_wait, (int, float)) or not 0 <= self.batch_wait <= 10:
            raise ConfigError(f"batch_wait must be 0..10 seconds, got {self.batch_wait!r} (--batch-wait)")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port!r} (--port)")
        if self.model_name is not None and not self.model_name.strip():
            raise ConfigError("model_name must not be empty (--model-name)")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key must not be empty (--api-key); omit it to serve without a key")
        if not self.host:
            raise ConfigError("host must not be empty (--host)")

    @property
    def name(self) -> str:
        """The model id served (what /v1/models lists and requests name)."""
        return self.model_name or os.path.basename(os.path.normpath(self.store_dir))

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @classmethod
    def for_tests(cls, store_dir: str, **kw) -> ServeConfig:
        """Small settings for tests: the local engine backend, 2 decode lanes, page cache, no calibration."""
        engine = dict(
            memory_budget="100%",
            backend="local",
            num_decompressors=2,
            cache_mode="page-cache",
            calibrate=False,
        )
        engine.update(kw.pop("engine", {}))
        return cls(store_dir=str(store_dir), engine=engine, **kw)
