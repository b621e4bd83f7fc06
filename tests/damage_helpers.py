"""Shared helpers for tests that damage stores: flip a byte, find an expert first used late in a generation
(so that a damaged one fails a request midway), and a module fixture built from them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from zipmoe_ray.store import open_store

from .runtime_helpers import BATCH1


def flip(path: Path, offset: int, mask: int = 0x40) -> None:
    """XOR one byte of ``path`` at ``offset`` with ``mask``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def late_expert(store_dir, ids, n) -> tuple[int, int, int]:
    """(layer, expert, step) of the expert first used latest in greedy generation of ``ids``."""
    from zipmoe_ray.engine import ZipMoEEngine
    from zipmoe_ray.trace import load_recorded

    trace = store_dir.parent / "late.jsonl"
    with ZipMoEEngine(
        store_dir, memory_budget="100%", backend="local", calibrate=False, trace_path=trace
    ) as e:
        e.generate(ids, max_new_tokens=n)
    first: dict[tuple[int, int], int] = {}
    for s in load_recorded(trace).steps:
        for layer, picks in s.layers.items():
            for expert, _ in picks:
                first.setdefault((layer, expert), s.step)
    (layer, expert), step = max(first.items(), key=lambda kv: kv[1])
    return layer, expert, step


def damage_expert(store_dir, layer: int, expert: int) -> None:
    rec = open_store(store_dir).record(layer, expert)
    flip(store_dir / rec.file, rec.offset + rec.tensors[0].raw.offset + 3, 0x01)


@pytest.fixture(scope="module")
def late_damage(tiny_stores, tmp_path_factory):
    """A store whose expert first used at a late decode step is damaged, and the clean reference."""
    from zipmoe_ray.engine import ZipMoEEngine

    s = tmp_path_factory.mktemp("late") / "store"
    shutil.copytree(tiny_stores["qwen2_moe"], s)
    layer, expert, step = late_expert(s, BATCH1[0], 20)
    assert step >= 2, "no expert is first used after the prefill; pick another prompt"
    with ZipMoEEngine(s, memory_budget="100%", backend="local", calibrate=False) as e:
        ref = e.generate(BATCH1[0], max_new_tokens=20)
    damage_expert(s, layer, expert)
    return s, ref, step, f"layer {layer}, expert {expert}"
