"""GET /metrics text from the engine's stats: the cache counters and the online re-planning's choices."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")

from zipmoe_ray.serve.metrics import ServeMetrics

STATS = {
    "hits": {"full": 7, "compressed": 3},
    "misses": {"disk": 5},
    "bytes_read": 1234,
    "peak_cache_bytes": 999,
    "budget": 1000,
}


def _lines(text: bytes) -> set[str]:
    return {ln for ln in text.decode().splitlines() if ln and not ln.startswith("#")}


def test_the_split_chosen_per_batch_size_is_exported():
    replan = {
        "in_use": "full-only",
        "rounds": 3,
        "by_batch": {
            1: {
                "split": "start-up plan",
                "measuring": False,
                "step_s": {"start-up plan": 0.2, "full-only": 0.25},
            },
            8: {"split": "full-only", "measuring": True, "step_s": {}},
        },
    }
    lines = _lines(ServeMetrics(8).render({**STATS, "replan": replan}))
    assert 'zipmoe_cache_hits_total{form="compressed"} 3.0' in lines
    assert "zipmoe_replan_rounds_total 3.0" in lines
    assert 'zipmoe_split_in_use{split="full-only"} 1.0' in lines
    assert 'zipmoe_split_chosen{batch="1",split="start-up plan"} 1.0' in lines
    assert 'zipmoe_split_chosen{batch="8",split="full-only"} 1.0' in lines
    assert 'zipmoe_replan_step_seconds{batch="1",split="full-only"} 0.25' in lines
    assert not any(ln.startswith('zipmoe_replan_step_seconds{batch="8"') for ln in lines)


def test_no_re_planning_series_when_it_is_off():
    text = ServeMetrics(8).render({**STATS, "replan": None}).decode()
    assert "zipmoe_read_bytes_total 1234.0" in text
    assert "zipmoe_split" not in text and "zipmoe_replan" not in text
