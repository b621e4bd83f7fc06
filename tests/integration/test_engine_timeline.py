"""The engine's profiling records (``timeline=True``): the executor's MoE-layer events and the storage
device's reads, on the same clock, covering what the counters count."""

from __future__ import annotations

import itertools
import time


def test_timeline_and_read_timeline_cover_one_generation(tiny_stores):
    from zipmoe_ray.engine import ZipMoEEngine

    with ZipMoEEngine(
        tiny_stores["qwen3_moe"],
        memory_budget="20%",
        backend="local",
        calibrate=False,
        timeline=True,
        bandwidth=2e9,  # an emulated device: each read is the interval it booked
    ) as e:
        e.generate([5, 6, 7, 8], 4)
        e.reset_stats()
        t0 = time.time()
        e.generate([[1, 2, 3], [9, 9]], 3)
        t1 = time.time()
        stats, events, reads = e.stats(), e.timeline(), e.read_timeline()
    assert sum(1 for ev in events if ev[1] == "step") == 3
    assert {ev[2] for ev in events if ev[1] == "layer"} == {0, 1, 2}
    assert reads, "a 20% budget misses: the device must have read"
    # one emulated serial device: each read starts once the one before it is done
    assert all(b[0] >= a[0] + a[1] - 1e-6 for a, b in itertools.pairwise(reads))
    assert all(t0 - 0.01 <= r[0] and r[0] + r[1] <= t1 + 0.01 for r in reads)  # the same clock as t0, t1
    assert sum(r[2] for r in reads) == stats["bytes_read"]  # every read since the reset, none twice
    assert {r[3] for r in reads} <= {0, 1, 2} and {r[5] for r in reads} <= {"all", "exp", "raw"}
    assert all(r[1] > 0 for r in reads) and {r[6] for r in reads} == {"local"}


def test_read_timeline_is_empty_unless_asked_for(tiny_stores):
    from zipmoe_ray.engine import ZipMoEEngine

    with ZipMoEEngine(tiny_stores["qwen3_moe"], memory_budget="20%", backend="local", calibrate=False) as e:
        e.generate([5, 6, 7, 8], 2)
        assert e.read_timeline() == [] and e.timeline() == []
