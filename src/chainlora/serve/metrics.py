"""The server's Prometheus metrics (text format at GET /metrics).

Request counts by endpoint and status, latency, time to first token and inter-token latency
(the names and buckets follow vLLM's `time_to_first_token_seconds` / `inter_token_latency_seconds`,
so a load tool's dashboards read both), tokens, batch sizes and the last batch's tokens/s,
routed-task counts, queue rejections, and the adapter cache's hits / misses / disk loads /
evictions / resident adapters (read from the engine at scrape time). Each server has its own
registry, so several servers in one process (tests) do not collide.
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


class _StageCollector:
    """Requests answered early by stage, from the scheduler's and the preparer's own counts: a
    client that left (cancelled) or a deadline passed (timed out) while waiting to be prepared,
    in the queue, in prefill or in decode; and bodies refused because the preparer's queue was full."""

    def __init__(self, stats: Any, preparer: Any):
        self.stats, self.preparer = stats, preparer

    def collect(self):
        cancelled = CounterMetricFamily("chainlora_cancelled", "requests stopped because their client left, by stage",
                                        labels=["stage"])
        cancelled.add_metric(["prepare"], self.preparer.cancelled)
        for stage, n in sorted(dict(self.stats.cancelled_at).items()):  # a copy: the worker adds stages
            cancelled.add_metric([stage], n)
        yield cancelled
        timed_out = CounterMetricFamily("chainlora_timed_out", "requests stopped at their deadline (--timeout), "
                                        "by stage", labels=["stage"])
        for stage, n in sorted(dict(self.stats.timed_out_at).items()):
            timed_out.add_metric([stage], n)
        yield timed_out
        yield CounterMetricFamily("chainlora_prepare_shed", "bodies refused with a 503: the preparer's queue was full "
                                  "(--max-prepare-queue)", value=self.preparer.shed)
        yield GaugeMetricFamily("chainlora_prepare_waiting", "bodies waiting to be prepared", value=self.preparer.pending)


PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/adapters/reload", "/health",
                   "/metrics", "/openapi.json"})


class Metrics:
    def __init__(self, engine: Any):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("chainlora_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("chainlora_request_seconds", "request latency (queue + generation)",
                                 ["endpoint"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.ttft = Histogram("chainlora_time_to_first_token_seconds", "from a request's arrival in the queue to "
                              "its first generated token (engine-answered requests)", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80))
        self.itl = Histogram("chainlora_inter_token_latency_seconds", "between consecutive generated tokens "
                             "of one request", registry=r,
                             buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10))
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

    def watch(self, stats: Any, preparer: Any) -> None:
        """Export the scheduler's and the preparer's early answers (see _StageCollector)."""
        self.registry.register(_StageCollector(stats, preparer))

    def batch(self, requests: list, answers: list, seconds: float, steps: list[float] = ()) -> None:
        """Called by the scheduler's worker after each generate call; `steps`: when each decoding
        step's tokens were made (a row's k-th token at step k)."""
        self.batch_size.observe(len(requests))
        tokens = sum(a.completion_tokens for a in answers)
        self.tokens_per_s.set(tokens / seconds if seconds > 0 else 0.0)
        for r, a in zip(requests, answers):
            self.routed.labels(a.route.adapter, str(a.route.fallback).lower()).inc()
            made = min(a.completion_tokens, len(steps))
            if made:
                self.ttft.observe(max(0.0, steps[0] - r.enqueued))
                for k in range(1, made):
                    self.itl.observe(steps[k] - steps[k - 1])

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
