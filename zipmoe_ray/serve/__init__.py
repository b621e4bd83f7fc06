"""An OpenAI-compatible HTTP server on Ray Serve (``zipmoe serve``; needs the ``serve`` extra).

Modules: config (ServeConfig), protocol (request and response bodies), batcher (the queue that batches
concurrent requests into generations), text (incremental detokenization, stop sequences), metrics
(Prometheus), handlers (the endpoints), deployment (the Serve deployment and ``build_app``), launcher (what
the CLI runs: Ray, Serve, signals). See docs/serving.md.
"""

from __future__ import annotations

from typing import Any

from .config import ServeConfig

__all__ = ["ServeConfig", "build_app"]


def build_app(config: ServeConfig) -> Any:
    """The Ray Serve application serving ``config`` (an ``Application`` for ``serve.run``). Imports Ray Serve
    and FastAPI: raises ConfigError saying how to install them when they are missing."""
    from .launcher import require_serve

    require_serve()
    from .deployment import build_app as _build

    return _build(config)
