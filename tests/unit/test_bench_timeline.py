"""benchmarks/timeline.py's device_idle: where the storage device idles, from an executor timeline and the
device's reads. The inputs are hand-made: a prefill, then two decode steps of two MoE layers."""

from __future__ import annotations

import pytest

from ..bench_helpers import benchmark_modules


@pytest.fixture(scope="module")
def timeline():
    with benchmark_modules("timeline") as (mod,):
        yield mod


def _events():
    return [
        (0.0, "layer", 0, 8, 0),
        (1.0, "layer_done", 0),
        (1.0, "layer", 1, 8, 0),
        (2.0, "layer_done", 1),
        (2.5, "step", -1),  # the prefill ends
        (3.0, "layer", 0, 2, 0),
        (4.0, "layer_done", 0),  # decode step 1
        (4.5, "layer", 1, 2, 2),
        (5.0, "layer_done", 1),  # all hits: no read
        (5.5, "step", -1),
        (6.0, "layer", 0, 2, 0),
        (8.0, "layer_done", 0),  # decode step 2
        (8.2, "layer", 1, 2, 0),
        (9.0, "layer_done", 1),
        (9.5, "step", -1),
    ]


def _reads():  # (start, seconds, bytes, layer, expert, part)
    return [
        (0.0, 2.0, 100, 0, 1, "all"),  # busy through the prefill
        (3.2, 0.3, 10, 0, 1, "all"),
        (3.6, 0.2, 10, 0, 2, "all"),  # step 1, layer 0
        (5.2, 0.6, 10, 0, 3, "all"),  # across the step boundary (a prefetch)
        (6.5, 0.5, 10, 0, 4, "all"),
        (7.0, 0.5, 10, 0, 5, "all"),  # back to back: one busy stretch
        (8.4, 0.4, 10, 1, 1, "all"),
    ]


def test_device_idle_splits_the_decode_idle_by_where_the_executor_was(timeline):
    out = timeline.device_idle(_events(), _reads(), 0.0, 9.5)
    assert out["window_s"] == pytest.approx(9.5)
    assert out["busy_s"] == pytest.approx(2.0 + 0.3 + 0.2 + 0.6 + 1.0 + 0.4)
    assert out["idle_s"] == pytest.approx(9.5 - out["busy_s"])
    assert (out["prefill_s"], out["prefill_idle_s"]) == pytest.approx((2.5, 0.5))
    assert (out["decode_s"], out["decode_idle_s"]) == pytest.approx((7.0, 7.0 - 2.5))
    parts = out["decode_idle"]
    assert set(parts) == set(timeline.DECODE_IDLE_KEYS)
    assert parts["layer_start"] == pytest.approx(0.2 + 0.5 + 0.2)
    assert parts["between_reads"] == pytest.approx(0.1)  # 3.5..3.6; 6.5..7.5 is one stretch
    assert parts["layer_end"] == pytest.approx(0.2 + 0.5 + 0.2)
    assert parts["layers_without_reads"] == pytest.approx(0.5)
    assert parts["between_layers"] == pytest.approx(0.5 + 0.2)  # 4.0..4.5, 8.0..8.2
    # 2.5..3.0 (the first step's start), 5.0..6.0 less the prefetch's 0.6 s, 9.0..9.5 (the last step's end)
    assert parts["step_boundaries"] == pytest.approx(0.5 + 0.4 + 0.5)
    assert sum(parts.values()) == pytest.approx(out["decode_idle_s"])


def test_device_idle_without_steps_is_all_prefill_and_a_silent_device_all_idle(timeline):
    events = [(0.0, "layer", 0, 8, 0), (1.0, "layer_done", 0)]
    out = timeline.device_idle(events, [], 0.0, 2.0)
    assert out["busy_s"] == 0 and out["idle_s"] == pytest.approx(2.0)
    assert out["prefill_s"] == pytest.approx(2.0) and out["decode_s"] == 0
    assert sum(out["decode_idle"].values()) == 0
