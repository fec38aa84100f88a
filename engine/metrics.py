"""Prometheus metrics of the engine server (`GET /metrics`, text format).

Per server, its own registry (tests run several servers in one process):
- `llmudf_http_requests_total{path, status}`, `llmudf_http_request_seconds{path}`;
- `llmudf_requests_served_total` / `_failed_total` (Flight and HTTP), `llmudf_prompt_tokens_total`,
  `llmudf_cached_tokens_total`, `llmudf_generated_tokens_total`, `llmudf_prefix_cache_hit_rate`;
- `llmudf_queue_waiting{client}` / `llmudf_queue_running{client}` (clients with work only),
  `llmudf_engine_step_seconds` (a histogram of engine steps);
- `llmudf_engine_<field>`: one gauge per numeric field of the engine's stats
  (`EngineService.engine_stats`), so a counter the engine adds shows up here by itself.

>>> metrics = ServerMetrics(service)                                      # doctest: +SKIP
>>> b"llmudf_prompt_tokens_total" in metrics.render()                     # doctest: +SKIP
True
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServerMetrics:
    """The metrics of one server; `paths` are the routes counted by name (others: "other")."""

    def __init__(self, service, paths: tuple[str, ...] = ()):
        self.service = service
        self.paths = frozenset(paths)
        self.registry = CollectorRegistry(auto_describe=True)
        self._http_requests = Counter(
            "llmudf_http_requests",
            "HTTP requests answered, by path and status",
            ["path", "status"],
            registry=self.registry,
        )
        self._http_seconds = Histogram(
            "llmudf_http_request_seconds",
            "time to answer an HTTP request (streams: to their end)",
            ["path"],
            registry=self.registry,
        )
        self._step_seconds = Histogram(
            "llmudf_engine_step_seconds",
            "time of one engine step",
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ServiceCollector(service))
        service.on_step = self.observe_step

    def observe_http(self, path: str, status: int, seconds: float) -> None:
        path = path if path in self.paths else "other"
        self._http_requests.labels(path, str(status)).inc()
        self._http_seconds.labels(path).observe(seconds)

    def observe_step(self, seconds: float, _num_outputs: int) -> None:
        self._step_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ServiceCollector:
    """Reads the service's counters and queues at scrape time."""

    def __init__(self, service):
        self.service = service

    def describe(self):
        return []

    def collect(self):
        s = self.service
        counters = {
            "requests_served": ("requests answered", s.num_served),
            "requests_failed": ("requests answered with an error", s.num_failed),
            "prompt_tokens": ("prompt tokens of answered requests", s.num_prompt_tokens),
            "cached_tokens": ("prompt tokens found in the prefix cache", s.num_cached_tokens),
            "generated_tokens": ("tokens generated", s.num_generated_tokens),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"llmudf_{name}", doc, value=value)
        hit_rate = s.num_cached_tokens / s.num_prompt_tokens if s.num_prompt_tokens else 0.0
        yield GaugeMetricFamily(
            "llmudf_prefix_cache_hit_rate", "cached / prompt tokens, all requests", value=hit_rate
        )
        yield GaugeMetricFamily("llmudf_ready", "1 when the model is loaded", value=s.is_ready)
        waiting = GaugeMetricFamily("llmudf_queue_waiting", "requests waiting", labels=["client"])
        running = GaugeMetricFamily("llmudf_queue_running", "requests running", labels=["client"])
        for client, (num_waiting, num_running) in sorted(s.queue_depths().items()):
            waiting.add_metric([client], num_waiting)
            running.add_metric([client], num_running)
        yield waiting
        yield running
        for field, value in (s.engine_stats() or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = "llmudf_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", field)
                yield GaugeMetricFamily(name, f"engine stats: {field}", value=value)
