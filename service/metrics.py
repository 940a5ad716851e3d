"""Prometheus metrics of one service instance, on its own `CollectorRegistry`.

A registry per app (never prometheus_client's global `REGISTRY`) means two apps in one
process, e.g. tests, never collide on metric names or share counts.

Exposed at `GET /metrics`:
- `rlaif_requests_total{endpoint,method,status}` and `rlaif_request_duration_seconds{endpoint,status}`;
  `endpoint` is the route template (`/v1/rubrics/{rubric_id}`), so label cardinality stays bounded;
- `rlaif_batch_size_items{kind}` / `rlaif_batch_size_requests{kind}`: what the micro-batcher
  hands the engine, the direct evidence that concurrent requests are coalesced;
- `rlaif_queue_depth_items`: items waiting for the engine;
- `rlaif_judgments_total{kind}` (use `rate()` for judgments/s) and `rlaif_judgments_per_second{kind}`
  (throughput of the last engine batch, for dashboards without PromQL);
- `rlaif_engine_seconds{kind}` and `rlaif_engine_errors_total{kind}`;
- `rlaif_model_ready` (0/1).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServiceMetrics:
    """All metrics of one app. Methods are thread-safe (prometheus_client locks internally)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("rlaif_requests", "HTTP requests by route template, method and status.",
                                ["endpoint", "method", "status"], registry=r)
        self.request_seconds = Histogram("rlaif_request_duration_seconds", "HTTP request latency.",
                                         ["endpoint", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_items = Histogram("rlaif_batch_size_items", "Items per engine batch formed by the micro-batcher.",
                                     ["kind"], buckets=_SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("rlaif_batch_size_requests", "Requests coalesced into one engine batch.",
                                        ["kind"], buckets=_SIZE_BUCKETS, registry=r)
        self.queue_depth = Gauge("rlaif_queue_depth_items", "Items waiting for the engine.", registry=r)
        self.judgments = Counter("rlaif_judgments", "Items judged (or scored by the reward model).", ["kind"], registry=r)
        self.judgments_per_second = Gauge("rlaif_judgments_per_second", "Items per second of the last engine batch.",
                                          ["kind"], registry=r)
        self.engine_seconds = Histogram("rlaif_engine_seconds", "Wall time of one engine batch.", ["kind"],
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.engine_errors = Counter("rlaif_engine_errors", "Engine batches that raised.", ["kind"], registry=r)
        self.model_ready = Gauge("rlaif_model_ready", "1 once the model (and reward model) are loaded.", registry=r)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.request_seconds.labels(endpoint, str(status)).observe(seconds)

    def observe_batch(self, kind: str, items: int, requests: int, seconds: float, failed: bool) -> None:
        self.batch_items.labels(kind).observe(items)
        self.batch_requests.labels(kind).observe(requests)
        self.engine_seconds.labels(kind).observe(seconds)
        if failed:
            self.engine_errors.labels(kind).inc()
            return
        self.judgments.labels(kind).inc(items)
        if seconds > 0:
            self.judgments_per_second.labels(kind).set(items / seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
