"""Recorded routing traces: what the engine saw, step by step.

File format ``zipmoe-trace/1`` (JSON Lines, one object per line, appendable):

* first line, the header::

    {"format": "zipmoe-trace/1", "model": {"model_type": ..., "layers": [layer ids], "num_experts": E,
     "top_k": k, "expert_bytes": B}, "store": path, "fingerprint": "<hex>", "store_id": "<hex>",
     "budget": bytes}

  ``fingerprint`` is the checkpoint the store was compressed from (what the routing depends on: a trace
  holds for every store of that checkpoint), ``store_id`` and ``budget`` the store and budget it was
  recorded with (all absent in traces written before they were recorded). Appending to a trace of
  another checkpoint is refused, and so is planning a store from one.

* then one line per forward step of a generation::

    {"request": r, "step": s, "kind": "prefill" | "decode", "batch": n,
     "layers": {"<layer id>": [[expert, tokens], ...], ...}}

  ``request`` numbers the ``generate`` calls (a batch of prompts is one request), ``step`` counts forward
  passes within it (0 is the prefill), ``tokens`` is how many tokens of the step were routed to the expert.
  With prefetch on, a step also has ``"predicted": {"<layer id>": [[expert, tokens], ...]}``: what the
  previous layer's input predicted for that layer (fetched ahead or, with the precision gate shut, only
  scored), which the simulator replays. Optional: older traces and runs without prefetch have none.

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
    predicted: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # prefetch's guesses, per layer

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "request": self.request,
            "step": self.step,
            "kind": self.kind,
            "batch": self.batch,
            "layers": _picks_json(self.layers),
        }
        if self.predicted:
            d["predicted"] = _picks_json(self.predicted)
        return d


def _picks_json(layers: dict[int, list[tuple[int, int]]]) -> dict[str, list[list[int]]]:
    return {str(k): [list(x) for x in v] for k, v in layers.items()}


def _picks(d: dict) -> dict[int, list[tuple[int, int]]]:
    return {int(k): [(int(e), int(t)) for e, t in v] for k, v in d.items()}


@dataclass
class RecordedTrace:
    model: dict[str, Any]
    steps: list[TraceStep] = field(default_factory=list)
    fingerprint: str = ""  # the checkpoint the store was made from ("" for traces that predate it)
    store_id: str = ""  # hex id of the store it was recorded on
    budget: int | None = None  # the engine's memory budget while recording

    @property
    def layers(self) -> list[int]:
        return list(self.model["layers"])

    def check_appendable(self, path: str | os.PathLike) -> None:
        """Refuse ``path`` when it holds a trace of another model, format or store, or cannot be written;
        blocks on nothing, writes nothing."""
        from ..store.durable import check_writable

        p = Path(path)
        check_writable(p, "trace")
        try:
            if not (p.exists() and p.stat().st_size > 0):
                return
            with p.open() as f:
                head = json.loads(f.readline())
        except OSError as e:
            raise ConfigError(f"cannot use the trace file {p}: {e.strerror or e}") from None
        except ValueError:
            raise ConfigError(
                f"{p} is not a {FORMAT} trace (its first line is not JSON); choose a new file"
            ) from None
        if not isinstance(head, dict) or head.get("format") != FORMAT or head.get("model") != self.model:
            raise ConfigError(f"{p} holds a trace of another model or format; choose a new trace file")
        theirs = head.get("fingerprint") or ""
        if self.fingerprint and theirs and theirs != self.fingerprint:
            raise ConfigError(
                f"{p} holds a trace recorded on a store of another checkpoint (fingerprint {theirs[:12]}..., "
                f"this one {self.fingerprint[:12]}...); choose a new trace file"
            )

    def write_header(self, path: str | os.PathLike, store: str = "") -> None:
        p = Path(path)
        self.check_appendable(p)
        if p.exists() and p.stat().st_size > 0:
            return
        head: dict[str, Any] = {"format": FORMAT, "model": self.model, "store": store}
        if self.fingerprint:
            head["fingerprint"] = self.fingerprint
        if self.store_id:
            head["store_id"] = self.store_id
        if self.budget is not None:
            head["budget"] = self.budget
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("w") as f:
            f.write(json.dumps(head) + "\n")

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
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        got = head.get("format") if isinstance(head, dict) else None
        raise ConfigError(f"{p}: format {got!r}, expected {FORMAT}")
    if not isinstance(head.get("model"), dict) or not all(
        isinstance(head.get(k, ""), str) for k in ("fingerprint", "store_id")
    ):
        raise ConfigError(f"{p}: line 1 is not a {FORMAT} header (model, fingerprint, store_id)")
    budget = head.get("budget")
    trace = RecordedTrace(
        head["model"],
        fingerprint=head.get("fingerprint", ""),
        store_id=head.get("store_id", ""),
        budget=budget if isinstance(budget, int) and not isinstance(budget, bool) else None,
    )
    experts = head["model"].get("num_experts")
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            step = TraceStep(
                int(d["request"]),
                int(d["step"]),
                d["kind"],
                int(d.get("batch", 1)),
                _picks(d["layers"]),
                _picks(d.get("predicted") or {}),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{p}: line {i} is not a trace step ({e})") from None
        if isinstance(experts, int):
            every = [*step.layers.values(), *step.predicted.values()]
            bad = [e for picks in every for e, _ in picks if not 0 <= e < experts]
            if bad:
                raise ConfigError(
                    f"{p}: line {i} routes to expert {bad[0]}, but the model has {experts} (0..{experts - 1})"
                )
        trace.steps.append(step)
    return trace
