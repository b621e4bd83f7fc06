"""Recording an engine's routing into a trace file (zipmoe-trace/1), one request number per generation.

The file is appended to: requests recorded by earlier engines keep their numbers, and a new engine
continues after the highest one found.
"""

from __future__ import annotations

import os
from typing import Any

from .recorded import RecordedTrace, TraceStep, load_recorded

__all__ = ["TraceRecorder"]


class TraceRecorder:
    """Appends each traced generation's steps to ``path``; ``model`` describes the model (trace header)."""

    def __init__(
        self,
        path: str | os.PathLike,
        store_dir: str,
        model: dict[str, Any],
        store_id: str = "",
        budget: int | None = None,
        fingerprint: str = "",
    ):
        """Raises ConfigError at once when ``path`` cannot be written or holds a trace of another model or
        store (before any engine starts)."""
        self.path = str(path)
        self.store_dir = store_dir
        self.model = model
        self._header = RecordedTrace(model, fingerprint=fingerprint, store_id=store_id, budget=budget)
        self._header.check_appendable(self.path)
        self._next: int | None = None  # the next request number, once the file was read

    @classmethod
    def for_store(cls, path, store_dir: str, store, layout, budget: int | None = None) -> TraceRecorder:
        return cls(
            path,
            store_dir,
            {
                "model_type": store.model_type,
                "layers": store.layers(),
                "num_experts": store.num_experts,
                "top_k": store.top_k,
                "expert_bytes": max(s.full for s in layout.sizes.values()),
            },
            store_id=store.index.store_id.hex(),
            budget=budget,
            fingerprint=store.index.source["fingerprint"],
        )

    def next_request(self) -> int:
        """The request number of the next generation (writes the header on first use)."""
        if self._next is None:
            self._header.write_header(self.path, self.store_dir)
            existing = load_recorded(self.path).steps
            self._next = 1 + max((s.request for s in existing), default=-1)
        n = self._next
        self._next += 1
        return n

    def write(self, steps: list[TraceStep] | None) -> None:
        if steps:
            RecordedTrace.append(self.path, steps)
