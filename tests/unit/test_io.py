"""The extent reader's page-cache bypass and the emulated device's bandwidth arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from zipmoe_ray.errors import ConfigError, StoreCorruptError
from zipmoe_ray.store.io import BandwidthLimiter, ExtentReader, ReadOptions, aligned_empty


def test_limiter_books_a_serial_device(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("zipmoe_ray.store.io.time.monotonic", lambda: now[0])
    lim = BandwidthLimiter(bandwidth=1e9, latency=1e-4)
    assert lim.book(10**9) == pytest.approx((100.0, 101.0001))  # idle device: starts now
    assert lim.book(5 * 10**8) == pytest.approx((101.0001, 101.5002))  # queued behind the first transfer
    now[0] = 200.0
    assert lim.book(0) == pytest.approx((200.0, 200.0001))  # idle again: only the latency


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"read_mode": "fast"}, "read mode"),
        ({"bandwidth": 0}, "bandwidth"),
        ({"latency": -1}, "latency"),
        ({"timeline": -1}, "timeline"),
        ({"timeline": 2.5}, "timeline"),
        ({"timeline": True}, "timeline"),
    ],
)
def test_read_options_validate(kw, match):
    with pytest.raises(ConfigError, match=match):
        ReadOptions(**kw)


@pytest.mark.parametrize("cache", ["page-cache", "drop", "bypass"])
def test_reads_match_the_file_and_count_bytes(tmp_path, cache):
    data = np.random.default_rng(0).integers(0, 256, 5 * 4096 + 123, dtype=np.uint8)
    (tmp_path / "f.bin").write_bytes(data.tobytes())
    r = ExtentReader(str(tmp_path), ReadOptions(read_mode=cache))
    assert bytes(r.read("f.bin", 4096, 5000)) == data[4096:9096].tobytes()
    assert bytes(r.read("f.bin", 0, 3)) == data[:3].tobytes()
    assert bytes(r.read("f.bin", 4 * 4096, 4096 + 123)) == data[4 * 4096 :].tobytes()  # up to the file's end
    assert r.stats.snapshot()["bytes"] == 5000 + 3 + 4096 + 123
    with pytest.raises(StoreCorruptError, match="truncated"):
        r.read("f.bin", 4 * 4096, 8192)
    with pytest.raises(StoreCorruptError, match="missing"):
        r.read("nope.bin", 0, 1)
    r.close()


def test_read_timeline_keeps_the_booked_intervals_of_the_last_reads(tmp_path):
    (tmp_path / "f.bin").write_bytes(bytes(3 * 4096))
    r = ExtentReader(str(tmp_path), ReadOptions(bandwidth=4096 * 100.0, timeline=2))  # 10 ms a page
    for i in range(3):
        r.read("f.bin", i * 4096, 4096, tag=("page", i))
    (first, second), dropped = r.stats.timeline()
    assert dropped == 1  # the oldest read fell off, and that is said
    assert [s[3] for s in (first, second)] == [("page", 1), ("page", 2)]
    assert [s[2] for s in (first, second)] == [4096, 4096]
    assert first[1] == pytest.approx(0.01) and second[1] == pytest.approx(0.01)  # booked, not measured
    assert second[0] >= first[0] + first[1] - 1e-6  # one serial device: the second starts after the first
    assert r.stats.snapshot()["bytes"] == 3 * 4096  # the counters count every read, kept or not
    r.stats.reset()
    assert r.stats.timeline() == ([], 0) and r.stats.snapshot()["bytes"] == 0
    plain = ExtentReader(str(tmp_path), ReadOptions())
    plain.read("f.bin", 0, 4096, tag=("page", 0))
    assert plain.stats.timeline() == ([], 0)  # nothing kept unless asked
    plain.close()
    r.close()


def test_aligned_buffers():
    for n in (1, 4096, 10_000):
        assert aligned_empty(n).ctypes.data % 4096 == 0 and aligned_empty(n).size == n
