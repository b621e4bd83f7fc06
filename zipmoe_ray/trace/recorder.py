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

    def __init__(self, path: str | os.PathLike, store_dir: str, model: dict[str, Any]):
        self.path = str(path)
        self.store_dir = store_dir
        self.model = model
        self._next: int | None = None  # the next request number, once the file was read

    @classmethod
    def for_store(cls, path, store_dir: str, store, layout) -> TraceRecorder:
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
        )

    def next_request(self) -> int:
        """The request number of the next generation (writes the header on first use)."""
        if self._next is None:
            RecordedTrace(self.model).write_header(self.path, self.store_dir)
            existing = load_recorded(self.path).steps
            self._next = 1 + max((s.request for s in existing), default=-1)
        n = self._next
        self._next += 1
        return n

    def write(self, steps: list[TraceStep] | None) -> None:
        if steps:
            RecordedTrace.append(self.path, steps)
