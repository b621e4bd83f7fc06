"""bench_e2e's arithmetic and output (benchmarks/e2e): the issue's ratios are computed against the better
full-lru and against llama.cpp, the Ray overhead per layer is the all-hit TPOT difference over the layers,
the breakdown keys add up to the timeline's token time, and the tables format every kind of system,
failed ones included. The inputs are hand-made result dicts: nothing is measured here."""

from __future__ import annotations

import pytest

from ..bench_helpers import benchmark_modules


@pytest.fixture(scope="module")
def e2e():
    with benchmark_modules("e2e.engines", "e2e.report", "timeline") as modules:
        yield modules


def _sys(tpot, **kw):
    return {"ttft_s": 1.0, "tpot_s": tpot, "tokens_per_s": 1 / tpot, "bytes_read": int(1e9), **kw}


def _run(bw=0.5):
    hit = {"any": 0.6}
    return {
        "preset": "qwen1.5-moe", "layers": 4, "budget": "25%", "bandwidth_gbps": bw, "batch": 1,
        "systems": {
            "transformers": _sys(0.1, peak_memory_bytes=int(9e9), tokens_match=True),
            "llama.cpp": _sys(0.6, ttft_s=None, memory_limit_bytes=int(2e9), tokens_match=False),
            "full-lru": _sys(0.3, hit_rate=hit, tokens_match=True),
            "full-lru-local": _sys(0.2, hit_rate=hit, tokens_match=True, peak_rss_bytes=int(5e9)),
            "zipmoe-ray": _sys(0.15, hit_rate=hit, tokens_match=True),
            "zipmoe-local": {"error": "exit status 1"},
        },
    }  # fmt: skip


def test_figures_use_the_better_full_lru_and_llamacpp(e2e):
    _, report, _ = e2e
    lines = report.figures([_run(0.5), _run(2.0)], {"qwen1.5-moe": {"zipmoe-ray": {"ms_per_layer": 0.25}}})
    assert lines[0].startswith(
        "25%, 0.5 GB/s, batch 1: zipmoe-ray TPOT = 0.75x the better full-lru (goal <= 0.75)"
    )
    assert "0.25x llama.cpp (goal <= 0.6)" in lines[0]
    assert "goal <= 1)" in lines[1] and "0.25x llama.cpp" in lines[1] and "goal <= 0.6" not in lines[1]
    assert lines[2] == "qwen1.5-moe, all hits: zipmoe-ray Ray overhead = 0.25 ms per MoE layer (goal <= 0.5)"


def test_tables_format_every_system(e2e):
    _, report, _ = e2e
    t = report.table(_run())
    assert "| llama.cpp | - | 600 ms |" in t and "page cache" in t  # no TTFT: a dash, not a crash
    assert "| zipmoe-local | exit status 1 |" in t
    assert "5.00 GB" in t  # the old key of peak memory still reads
    s = report.summary_table([_run()])
    assert "**zipmoe-ray**" in s and "2.00x" in s  # full-lru-local's TPOT over zipmoe-ray's


def test_ray_overhead_per_layer_and_twins(e2e):
    engines, _, _ = e2e
    assert engines.ray_overhead_ms_per_layer(0.110, 0.100, 4) == pytest.approx(2.5)
    assert engines.ray_overhead_ms_per_layer(0.100, 0.110, 4) == pytest.approx(-2.5)
    with pytest.raises(ValueError):
        engines.ray_overhead_ms_per_layer(0.1, 0.1, 0)
    o = engines.paired_overhead([(0.100, 0.080), (0.110, 0.108), (0.120, 0.100)], 4)
    assert o["ms_per_layer_rounds"] == pytest.approx([5.0, 0.5, 5.0])
    # the median pair (5.0), not the difference of the median TPOTs (0.110 - 0.100: 2.5)
    assert o["ms_per_layer"] == pytest.approx(5.0)
    assert (o["tpot_ray_s"], o["tpot_local_s"]) == pytest.approx((0.110, 0.100))
    with pytest.raises(ValueError):
        engines.paired_overhead([], 4)
    assert engines.local_twin("full-lru") == "full-lru-local"
    assert engines.local_twin("zipmoe-ray") == "zipmoe-local"
    assert engines.local_twin("full-lru-local") is None


def test_breakdown_ms_splits_the_token_time(e2e):
    _, _, timeline = e2e
    # two tokens of one MoE layer each, as the executor's timeline records them: (time, kind, ...)
    events = [
        (0.000, "step"), (0.010, "layer", 0), (0.011, "request", 0), (0.013, "response", 0),
        (0.020, "ready", 0, 5), (0.025, "computed", 0, 5), (0.030, "layer_done", 0),
        (0.050, "step"), (0.060, "layer", 0), (0.060, "request", 0), (0.061, "response", 0),
        (0.070, "ready", 0, 7), (0.080, "computed", 0, 7), (0.090, "layer_done", 0),
        (0.100, "step"),
    ]  # fmt: skip
    ms = timeline.breakdown_ms(events)
    want = {"round_trips": 1.5, "waiting_for_experts": 8.0, "expert_compute": 15.5, "outside_moe": 25.0}
    assert ms == pytest.approx(want)
    assert sum(ms.values()) == pytest.approx(timeline.breakdown(events)["token_ms"])
    assert timeline.breakdown_ms(events[:3]) is None  # fewer than two steps: nothing to average
