"""Prometheus metrics of `kvjax serve` (prometheus-client; `GET /metrics`, text format).

Each app gets its own `CollectorRegistry` (two servers in one process do not collide).
Request-level figures are measured in the server, from the moment a request is accepted:
time to first token (TTFT), time per output token after the first (TPOT), whole-request
duration, tokens in and out, finish reasons. The engine's own counters (`Engine.stats()`:
pages in use, peak, prefix-cache hits, preemptions, ...) are read at scrape time by a
collector, so they are never stale and cost nothing between scrapes.
"""
from __future__ import annotations

import re
import time

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the routes)
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector:
    """Engine.stats() at scrape time: each numeric entry as a gauge kvjax_engine_<key>,
    plus the headline names kvjax_pages_used / _total / _peak and kvjax_prefix_cache_hits."""

    HEADLINE = {"pages_used": "pages of the KV pool in use",
                "pages_total": "pages in the KV pool",
                "pages_peak": "most pages in use at once since start"}

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        try:
            stats = self.engine.stats()
        except Exception:  # a closing engine: report nothing rather than fail the scrape
            return
        for key, doc in self.HEADLINE.items():
            if _number(stats.get(key)):
                yield GaugeMetricFamily(f"kvjax_{key}", doc, value=float(stats[key]))
        hits = [k for k in stats if "prefix" in k and "hit" in k and _number(stats[k])]
        for k in hits[:1]:
            yield GaugeMetricFamily("kvjax_prefix_cache_hits", f"prefix-cache hits (Engine.stats {k})",
                                    value=float(stats[k]))
        for key, value in sorted(stats.items()):
            if _number(value):
                name = "kvjax_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
                yield GaugeMetricFamily(name, f"Engine.stats()[{key!r}]", value=float(value))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Metrics:
    """The server's metrics in their own registry; `engine` (optional): read at scrape time."""

    def __init__(self, engine=None):
        disable_created_metrics()   # no *_created series next to every counter
        self.registry = r = CollectorRegistry()
        self.http = Counter("kvjax_http_requests", "HTTP requests answered, by route and status",
                            ["route", "status"], registry=r)
        self.requests = Counter("kvjax_requests", "generation requests finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.running = Gauge("kvjax_requests_running", "generation requests in the engine now",
                             registry=r)
        self.prompt_tokens = Counter("kvjax_prompt_tokens", "prompt tokens of finished requests",
                                     registry=r)
        self.cached_tokens = Counter("kvjax_prompt_tokens_cached",
                                     "prompt tokens served from the prefix cache", registry=r)
        self.generated_tokens = Counter("kvjax_generation_tokens", "tokens generated", registry=r)
        self.rejected = Counter("kvjax_requests_rejected", "generation requests refused before the engine "
                                "(queue_full: 429 at --max-waiting)", ["reason"], registry=r)
        self.ttft = Histogram("kvjax_time_to_first_token_seconds",
                              "from accepting a request to its first new token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kvjax_time_per_output_token_seconds",
                              "mean time per new token after the first, per request",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.duration = Histogram("kvjax_request_duration_seconds",
                                  "from accepting a request to its last token",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        if engine is not None:
            r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One generation request's clock: feed it token counts as they arrive, then finish it."""

    def __init__(self, metrics: Metrics):
        self.m = metrics
        self.start = time.perf_counter()
        self.first = None
        self.last = None
        self.tokens = 0
        self.m.running.inc()
        self._done = False

    def tokens_arrived(self, n: int):
        if n <= 0:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.m.ttft.observe(now - self.start)
        self.last = now
        self.tokens += n

    def finish(self, finish_reason: str, prompt_tokens: int, cached_tokens: int = 0):
        if self._done:
            return
        self._done = True
        self.m.running.dec()
        self.m.requests.labels(finish_reason=finish_reason).inc()
        self.m.prompt_tokens.inc(prompt_tokens)
        self.m.cached_tokens.inc(cached_tokens)
        self.m.generated_tokens.inc(self.tokens)
        end = self.last or time.perf_counter()
        self.m.duration.observe(end - self.start)
        if self.tokens > 1:
            self.m.tpot.observe((self.last - self.first) / (self.tokens - 1))
