"""The server's Prometheus metrics, served at GET /metrics in the text exposition format.

Request, token, latency, queue and batch metrics are counted where they happen (handlers and batcher); the
engine's own counters (cache hits per form, disk misses, bytes read, cache peak) are read from
``ZipMoEEngine.stats()`` at scrape time, with the online re-planning's choices. They live in the server's own registry, on the API's port: Ray's
metrics route would need Ray's metrics agent port and a Prometheus scraping every node.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["CONTENT_TYPE", "ServeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
_PER_TOKEN = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _EngineCollector:
    """The engine's counters, as of the last ``update`` (the scrape calls it first)."""

    def __init__(self):
        self.stats: dict[str, Any] | None = None

    def collect(self):
        s = self.stats
        if not s:
            return
        hits = CounterMetricFamily(
            "zipmoe_cache_hits", "expert uses served from a cache, per form", labels=["form"]
        )
        for form, n in sorted(s.get("hits", {}).items()):
            hits.add_metric([form], n)
        yield hits
        yield CounterMetricFamily(
            "zipmoe_cache_misses", "expert uses read from disk", value=s["misses"]["disk"]
        )
        yield CounterMetricFamily("zipmoe_read_bytes", "bytes read from the store", value=s["bytes_read"])
        yield GaugeMetricFamily(
            "zipmoe_cache_peak_bytes", "peak bytes held by the cache", value=s["peak_cache_bytes"]
        )
        yield GaugeMetricFamily("zipmoe_memory_budget_bytes", "the engine's memory budget", value=s["budget"])
        yield from _replan(s.get("replan"))


def _replan(r: dict[str, Any] | None):
    """Online re-planning of the split between cache forms (stats()["replan"]; absent when off): the split
    in use, and per batch size the split chosen and its last round's median decode step."""
    if not r:
        return
    yield CounterMetricFamily("zipmoe_replan_rounds", "re-planning rounds completed", value=r["rounds"])
    in_use = GaugeMetricFamily("zipmoe_split_in_use", "the cache split in use (1)", labels=["split"])
    in_use.add_metric([r["in_use"]], 1)
    yield in_use
    chosen = GaugeMetricFamily(
        "zipmoe_split_chosen", "the split kept for a batch size (1)", labels=["batch", "split"]
    )
    step = GaugeMetricFamily(
        "zipmoe_replan_step_seconds",
        "median decode step per candidate split in a batch size's last round",
        labels=["batch", "split"],
    )
    for rows, b in sorted(r.get("by_batch", {}).items()):
        chosen.add_metric([str(rows), b["split"]], 1)
        for name, sec in b["step_s"].items():
            step.add_metric([str(rows), name], sec)
    yield chosen
    yield step


class ServeMetrics:
    """Thread-safe (prometheus_client's metrics are); one per server."""

    def __init__(self, max_batch: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "zipmoe_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.cancelled = Counter("zipmoe_requests_cancelled", "requests whose client went away", registry=r)
        self.prompt_tokens = Counter("zipmoe_prompt_tokens", "prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter(
            "zipmoe_generation_tokens", "tokens generated for clients", registry=r
        )
        self.ttft = Histogram(
            "zipmoe_time_to_first_token_seconds", "arrival to first token", buckets=_LATENCY, registry=r
        )
        self.tpot = Histogram(
            "zipmoe_time_per_output_token_seconds",
            "mean time between a request's tokens",
            buckets=_PER_TOKEN,
            registry=r,
        )
        self.queue_time = Histogram(
            "zipmoe_queue_seconds", "arrival to the start of its generation", buckets=_LATENCY, registry=r
        )
        self.queue_depth = Gauge("zipmoe_queue_depth", "requests waiting for a generation", registry=r)
        self.running = Gauge("zipmoe_running_requests", "requests in the running generation", registry=r)
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})
        self.batch_size = Histogram(
            "zipmoe_batch_size",
            "sequences per generation",
            buckets=[b for b in buckets if b <= max_batch],
            registry=r,
        )
        self._engine = _EngineCollector()
        r.register(self._engine)
        self._lock = threading.Lock()

    def render(self, engine_stats: dict[str, Any] | None) -> bytes:
        """The exposition text, with the engine's counters from ``engine_stats`` (None: left out)."""
        with self._lock:
            self._engine.stats = engine_stats
            return generate_latest(self.registry)
