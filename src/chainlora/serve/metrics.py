"""The server's Prometheus metrics (text format at GET /metrics).

Request counts by endpoint and status, latency, tokens, batch sizes and the last batch's
tokens/s, routed-task counts, queue rejections, and the adapter cache's hits / misses / disk
loads / evictions / resident adapters (read from the engine at scrape time). Each server has
its own registry, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ENDPOINTS = {"chat": "/v1/chat/completions", "text": "/v1/completions"}


class _CacheCollector:
    """Adapter-cache counters straight from the engine, when Prometheus scrapes."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self):
        cache = self.engine.pool or self.engine.cache  # the device tier that answers
        s = cache.stats
        for name, value, help_ in (("hits", s.hits, "adapter requests served by a resident adapter"),
                                   ("misses", s.misses, "adapter requests that had to load it"),
                                   ("disk_loads", self.engine.cache.stats.disk_loads, "adapter reads from disk"),
                                   ("evictions", s.evictions, "adapters evicted from the device"),
                                   ("hotswaps", s.hotswaps, "loads into a recycled slot")):
            yield CounterMetricFamily(f"chainlora_adapter_cache_{name}", help_, value=value)
        yield GaugeMetricFamily("chainlora_adapters_resident", "adapters resident on the device",
                                value=len(cache.resident))


PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/adapters/reload", "/health",
                   "/metrics", "/openapi.json"})


class Metrics:
    def __init__(self, engine: Any):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("chainlora_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("chainlora_request_seconds", "request latency (queue + generation)",
                                 ["endpoint"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.prompt_tokens = Counter("chainlora_prompt_tokens", "prompt tokens of answered requests", registry=r)
        self.completion_tokens = Counter("chainlora_completion_tokens", "generated tokens", registry=r)
        self.batch_size = Histogram("chainlora_batch_size", "requests per generate call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.tokens_per_s = Gauge("chainlora_batch_tokens_per_second", "generated tokens/s of the last batch",
                                  registry=r)
        self.routed = Counter("chainlora_routed", "requests per answering adapter", ["adapter", "fallback"],
                              registry=r)
        self.rejected = Counter("chainlora_rejected", "requests refused because the queue was full", registry=r)
        r.register(_CacheCollector(engine))

    def batch(self, requests: list, answers: list, seconds: float) -> None:
        """Called by the scheduler's worker after each generate call."""
        self.batch_size.observe(len(requests))
        tokens = sum(a.completion_tokens for a in answers)
        self.tokens_per_s.set(tokens / seconds if seconds > 0 else 0.0)
        for a in answers:
            self.routed.labels(a.route.adapter, str(a.route.fallback).lower()).inc()

    def answered(self, kind: str, status: int, seconds: float) -> None:
        """One request of `kind` ("chat" / "text") answered with `status` after `seconds`."""
        self.requests.labels(ENDPOINTS[kind], str(status)).inc()
        self.latency.labels(ENDPOINTS[kind]).observe(seconds)

    def done(self, kind: str, answer: Any, seconds: float) -> None:
        """A request answered here: counted, timed, its tokens added."""
        self.answered(kind, 200, seconds)
        self.prompt_tokens.inc(answer.prompt_tokens)
        self.completion_tokens.inc(answer.completion_tokens)

    def status(self, path: str, status: int) -> None:
        """Count a refused request; any path but the server's own is `other`, so that random
        paths cannot grow the label sets (and the server's memory) without bound."""
        self.requests.labels(path if path in PATHS else "other", str(status)).inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()
