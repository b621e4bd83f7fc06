"""Recorded routing traces: what the engine saw, step by step.

File format ``zipmoe-trace/1`` (JSON Lines, one object per line, appendable):

* first line, the header::

    {"format": "zipmoe-trace/1", "model": {"model_type": ..., "layers": [layer ids], "num_experts": E,
     "top_k": k, "expert_bytes": B}, "store": path}

* then one line per forward step of a generation::

    {"request": r, "step": s, "kind": "prefill" | "decode", "batch": n,
     "layers": {"<layer id>": [[expert, tokens], ...], ...}}

  ``request`` numbers the ``generate`` calls (a batch of prompts is one request), ``step`` counts forward
  passes within it (0 is the prefill), ``tokens`` is how many tokens of the step were routed to the expert.

Loading needs only the standard library (no torch).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["FORMAT", "RecordedTrace", "TraceStep", "load_recorded"]

FORMAT = "zipmoe-trace/1"


@dataclass
class TraceStep:
    request: int
    step: int
    kind: str  # prefill | decode
    batch: int
    layers: dict[int, list[tuple[int, int]]]  # layer id -> [(expert, tokens)]

    def to_json(self) -> dict[str, Any]:
        return {
            "request": self.request,
            "step": self.step,
            "kind": self.kind,
            "batch": self.batch,
            "layers": {str(k): [list(x) for x in v] for k, v in self.layers.items()},
        }


@dataclass
class RecordedTrace:
    model: dict[str, Any]
    steps: list[TraceStep] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return list(self.model["layers"])

    def write_header(self, path: str | os.PathLike, store: str = "") -> None:
        p = Path(path)
        if p.exists() and p.stat().st_size > 0:
            head = json.loads(p.open().readline())
            if head.get("format") != FORMAT or head.get("model") != self.model:
                raise ConfigError(f"{p} holds a trace of another model or format; choose a new trace file")
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("w") as f:
            f.write(json.dumps({"format": FORMAT, "model": self.model, "store": store}) + "\n")

    @staticmethod
    def append(path: str | os.PathLike, steps: list[TraceStep]) -> None:
        with open(path, "a") as f:
            for s in steps:
                f.write(json.dumps(s.to_json()) + "\n")


def load_recorded(path: str | os.PathLike) -> RecordedTrace:
    """Read a ``zipmoe-trace/1`` file; raises ConfigError naming the line that is wrong."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the trace ({e.strerror})") from None
    if not lines:
        raise ConfigError(f"{p}: empty trace file")
    try:
        head = json.loads(lines[0])
    except ValueError:
        raise ConfigError(f"{p}: line 1 is not JSON; expected a {FORMAT} header") from None
    if head.get("format") != FORMAT:
        raise ConfigError(f"{p}: format {head.get('format')!r}, expected {FORMAT}")
    trace = RecordedTrace(head["model"])
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            trace.steps.append(
                TraceStep(
                    int(d["request"]),
                    int(d["step"]),
                    d["kind"],
                    int(d.get("batch", 1)),
                    {int(k): [(int(e), int(t)) for e, t in v] for k, v in d["layers"].items()},
                )
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{p}: line {i} is not a trace step ({e})") from None
    return trace
