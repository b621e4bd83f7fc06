"""Count traces (``zipmoe-count-trace/1``): the aggregated form other tools share, loadable without torch.

    {"format": "zipmoe-count-trace/1",
     "model": {"num_layers": L, "num_experts": E, "top_k": k, "expert_bytes": B},
     "fingerprint": "<hex>",   (optional: the checkpoint of the store a converted trace was recorded on)
     "counts": [[[tokens routed to each of the E experts] for each layer] for each prompt]}

Layers are positions 0..L-1 (a recorded trace's layer ids, in order). A count trace has no step order, so
wherever one drives the planner or the simulator, decode steps are *drawn*: for each prompt, each step and
each layer, ``batch x top_k`` token slots are filled by drawing experts without replacement within a token
(a token never picks one expert twice) in proportion to the prompt's *remaining* counts, which are then
decremented; steps continue until the prompt's counts run out. So the per-prompt totals are reproduced
exactly and popularity (which expert, not only its rank) is kept; the order is random (seeded).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .recorded import RecordedTrace, load_recorded

__all__ = ["COUNT_FORMAT", "CountTrace", "load_any", "synth"]

COUNT_FORMAT = "zipmoe-count-trace/1"


@dataclass
class CountTrace:
    model: dict[str, Any]  # num_layers, num_experts, top_k, expert_bytes
    counts: list[list[list[int]]]  # [prompt][layer][expert]
    fingerprint: str = ""  # checkpoint it was recorded on ("" when unknown: synthetic, other tools)

    def __post_init__(self):
        for key in ("num_layers", "num_experts", "top_k", "expert_bytes"):
            if not isinstance(self.model.get(key), int) or self.model[key] <= 0:
                raise ConfigError(
                    f"count trace model.{key} must be a positive integer, got {self.model.get(key)!r}"
                )
        L, E = self.num_layers, self.num_experts
        for i, p in enumerate(self.counts):
            if len(p) != L or any(len(row) != E for row in p):
                raise ConfigError(f"count trace prompt {i} is not {L} layers x {E} experts")
            if any(c < 0 for row in p for c in row):
                raise ConfigError(f"count trace prompt {i} has a negative count")

    @property
    def num_layers(self) -> int:
        return self.model["num_layers"]

    @property
    def num_experts(self) -> int:
        return self.model["num_experts"]

    @property
    def top_k(self) -> int:
        return self.model["top_k"]

    @property
    def expert_bytes(self) -> int:
        return self.model["expert_bytes"]

    def totals(self) -> list[list[int]]:
        """Tokens per [layer][expert] over every prompt."""
        out = [[0] * self.num_experts for _ in range(self.num_layers)]
        for p in self.counts:
            for layer, row in enumerate(p):
                for e, c in enumerate(row):
                    out[layer][e] += c
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": COUNT_FORMAT, "model": self.model}
        if self.fingerprint:
            out["fingerprint"] = self.fingerprint
        out["counts"] = self.counts
        return out

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "count trace") -> CountTrace:
        if d.get("format") != COUNT_FORMAT:
            raise ConfigError(f"{where}: format {d.get('format')!r}, expected {COUNT_FORMAT}")
        try:
            fp = d.get("fingerprint", "")
            if not isinstance(fp, str):
                raise TypeError(f"fingerprint must be a string, got {type(fp).__name__}")
            return cls(
                dict(d["model"]), [[[int(c) for c in row] for row in p] for p in d["counts"]], fingerprint=fp
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: malformed ({e})") from None

    @classmethod
    def from_recorded(cls, trace: RecordedTrace, include_prefill: bool = False) -> CountTrace:
        """Aggregate a recorded trace per request (prompt or batch), decode steps only by default."""
        layers = trace.layers
        pos = {layer: i for i, layer in enumerate(layers)}
        E = trace.model["num_experts"]
        by_req: dict[int, list[list[int]]] = {}
        for s in trace.steps:
            if s.kind == "prefill" and not include_prefill:
                continue
            grid = by_req.setdefault(s.request, [[0] * E for _ in layers])
            for layer, picks in s.layers.items():
                for e, t in picks:
                    grid[pos[layer]][e] += t
        model = {
            "num_layers": len(layers),
            "num_experts": E,
            "top_k": trace.model["top_k"],
            "expert_bytes": trace.model["expert_bytes"],
        }
        return cls(model, [by_req[r] for r in sorted(by_req)], fingerprint=trace.fingerprint)

    def steps(self, batch: int = 1, seed: int = 0) -> Iterator[list[list[tuple[int, int]]]]:
        """Draw decode steps (see the module docstring): yields, per step, [layer] -> [(expert, tokens)].

        With ``batch`` > 1, prompts are served ``batch`` at a time, each contributing one token per step
        while it has counts left. Each round draws one token of every prompt and every layer at once: the
        top k of log(count) plus Gumbel noise are k distinct experts drawn without replacement in
        proportion to the counts (the Gumbel-top-k identity), so the whole trace costs a few array
        operations per round, not a loop per expert."""
        if not self.counts:
            return
        rng = np.random.default_rng(seed)
        k = self.top_k
        left = np.array(self.counts, dtype=np.int64)  # [prompt, layer, expert]
        _, L, _ = left.shape
        rounds = []  # per round: [prompt, layer, expert] drawn (0/1), and which prompts still had tokens
        while True:
            live = left > 0
            alive = live.any(axis=2).any(axis=1)
            if not alive.any():
                break
            with np.errstate(divide="ignore"):
                keys = np.where(live, np.log(np.maximum(left, 1)), -np.inf) + rng.gumbel(size=left.shape)
            top = np.argsort(-keys, axis=2, kind="stable")[:, :, :k]  # [prompt, layer, k]
            drawn = np.zeros_like(live)
            np.put_along_axis(drawn, top, True, axis=2)
            drawn &= live  # a row with fewer than k experts left draws only those
            left -= drawn
            rounds.append((drawn.astype(np.int8), alive))
        if rounds:
            yield from _steps_of(rounds, batch, L)


_CHUNK_CELLS = 1 << 25  # (step, layer, expert) cells turned into steps at once: bounds the memory it takes


def _steps_of(rounds, batch: int, layers: int) -> Iterator[list[list[tuple[int, int]]]]:
    """The steps of drawn ``rounds`` ([prompt, layer, expert] 0/1 per round, and which prompts were live),
    prompt group by prompt group and round by round: per step and layer, (expert, tokens) by expert. Whole
    groups at a time in array operations (one ``nonzero`` and one slice per layer of a step), not a few
    array calls per step, which were most of what loading a 1000-prompt trace cost."""
    drawn = np.stack([d for d, _ in rounds], axis=1)  # [prompt, round, layer, expert]
    alive = np.stack([a for _, a in rounds], axis=1)  # [prompt, round]
    P, R, L, E = drawn.shape
    groups = -(-P // batch)
    per_chunk = max(1, _CHUNK_CELLS // max(1, batch * R * L * E))
    for g0 in range(0, groups, per_chunk):
        a, b = g0 * batch, min(P, (g0 + per_chunk) * batch)
        d, live = drawn[a:b], alive[a:b]
        if batch > 1:  # a group's step: its members' tokens summed; live while any member is
            pad = -(b - a) % batch
            if pad:
                d = np.concatenate([d, np.zeros((pad, R, L, E), d.dtype)])
                live = np.concatenate([live, np.zeros((pad, R), bool)])
            d = d.reshape(-1, batch, R, L, E).sum(axis=1)
            live = live.reshape(-1, batch, R).any(axis=1)
        step = d[live]  # [step, layer, expert]: groups in order, each its live rounds in order
        s, lay, e = np.nonzero(step)
        pairs = list(zip(e.tolist(), step[s, lay, e].tolist()))
        cuts = np.searchsorted(s * L + lay, np.arange(len(step) * L + 1)).tolist()
        for i in range(0, len(step) * L, L):
            yield [pairs[cuts[j] : cuts[j + 1]] for j in range(i, i + L)]


def synth(
    *,
    num_layers: int,
    num_experts: int,
    top_k: int,
    expert_bytes: int,
    prompts: int = 8,
    tokens: int = 64,
    skew: float = 1.0,
    seed: int = 0,
) -> CountTrace:
    """A synthetic count trace: per layer, expert popularity follows Zipf(``skew``) over a random ranking
    (``skew=0``: uniform); each prompt routes ``tokens`` tokens, ``top_k`` distinct experts each."""
    if skew < 0:
        raise ConfigError(f"skew must be >= 0, got {skew}")
    if top_k > num_experts:
        raise ConfigError(f"top_k {top_k} > num_experts {num_experts}")
    rng = random.Random(seed)
    weights_per_layer = []
    for _ in range(num_layers):
        ranks = list(range(1, num_experts + 1))
        rng.shuffle(ranks)
        weights_per_layer.append([1.0 / (r**skew) for r in ranks])
    counts = []
    for _ in range(prompts):
        grid = []
        for w in weights_per_layer:
            row = [0] * num_experts
            for _ in range(tokens):
                pool = list(range(num_experts))
                ww = list(w)
                for _ in range(top_k):
                    i = rng.choices(range(len(pool)), weights=ww)[0]
                    row[pool.pop(i)] += 1
                    ww.pop(i)
            grid.append(row)
        counts.append(grid)
    model = {
        "num_layers": num_layers,
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_bytes": expert_bytes,
    }
    return CountTrace(model, counts)


def load_any(path: str | os.PathLike) -> CountTrace | RecordedTrace:
    """A count trace (JSON) or a recorded trace (JSON Lines), by its format field."""
    p = Path(path)
    try:
        first = p.open().readline()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
    try:
        head = json.loads(first)
    except ValueError:
        head = None
    if isinstance(head, dict) and head.get("format") == "zipmoe-trace/1":
        return load_recorded(p)
    try:
        doc = json.loads(p.read_text())
    except ValueError:
        raise ConfigError(f"{p}: neither a zipmoe-trace/1 nor a zipmoe-count-trace/1 file") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: neither a zipmoe-trace/1 nor a zipmoe-count-trace/1 file")
    return CountTrace.from_json(doc, str(p))
