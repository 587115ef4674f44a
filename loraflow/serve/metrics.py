"""Prometheus metrics of `loraflow serve` (GET /metrics, prometheus-client's text format).

Two owners, because one engine may serve several apps (tests hand one engine to a second app):
`EngineMetrics` lives with the engine (time in the queue, batch sizes, adapter loads and failed loads) and
`ServerMetrics` with each app (requests by route, mode and status, their latency, feedback events written, and
the loaded adapters read from the cache at scrape time). Each app has its own CollectorRegistry holding both,
never prometheus-client's global one, so servers started in one process count apart.

Label values are bounded: `mode` is a mode the registry knows, "base" (no adapter) or "unknown" (a name
nobody registered: clients choose it, so it never becomes a label of its own); `route` is the route's path
template (`/adapters/{mode}/merge`), "other" when no route matched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from loraflow.serve.adapters import AdapterCache

# Seconds: a queue wait is milliseconds when idle and whole generations when busy; a request lasts up to minutes.
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class EngineMetrics:
    """What the engine and its adapter cache observe; registered into each app's registry."""

    def __init__(self) -> None:
        self.queue_seconds = Histogram("loraflow_queue_seconds", "Time a request waited for its batch to start",
                                       ["mode"], buckets=QUEUE_BUCKETS, registry=None)
        self.batch_size = Histogram("loraflow_batch_size", "Requests generated together in one generate() call",
                                    buckets=BATCH_BUCKETS, registry=None)
        self.adapter_loads = Counter("loraflow_adapter_loads", "Adapters downloaded and loaded into the model",
                                     ["mode"], registry=None)
        self.adapter_load_failures = Counter("loraflow_adapter_load_failures",
                                             "Adapter loads that failed (the request was answered by the base model)",
                                             ["mode"], registry=None)

    def collectors(self) -> list:
        return [self.queue_seconds, self.batch_size, self.adapter_loads, self.adapter_load_failures]


class _AdapterState:
    """Read at scrape time from the cache: the adapters loaded now, per mode (retiring ones included)."""

    def __init__(self, cache: AdapterCache):
        self.cache = cache

    def collect(self):
        loaded = GaugeMetricFamily("loraflow_adapters_loaded", "Adapters loaded in the model now", labels=["mode"])
        failing = GaugeMetricFamily("loraflow_adapters_failing",
                                    "Modes whose champion failed to load at the last try (1) and serve the base model",
                                    labels=["mode"])
        with self.cache.state:
            per_mode: dict[str, int] = {}
            for a in [*self.cache.loaded.values(), *self.cache.retired]:
                per_mode[a.mode] = per_mode.get(a.mode, 0) + 1
            modes = sorted(set(self.cache.champions) | set(per_mode))
            failed = set(self.cache.failed)
        for m in modes:
            loaded.add_metric([m], per_mode.get(m, 0))
        for m in sorted(failed):
            failing.add_metric([m], 1)
        yield loaded
        yield failing
        # The model's own count (peft's adapters): equals the sum of loraflow_adapters_loaded unless a load or an
        # unload went wrong and left an adapter in the model that the cache no longer knows (a leak).
        attached = getattr(self.cache.host, "attached", None)
        if attached is not None:
            yield GaugeMetricFamily("loraflow_model_adapters", "LoRA adapters attached to the model itself (peft)",
                                    value=attached())


class ServerMetrics:
    """One app's registry: its own request and feedback metrics plus its engine's."""

    def __init__(self, engine_metrics: EngineMetrics, cache: AdapterCache):
        self.registry = CollectorRegistry()
        self.cache = cache
        self.requests = Counter("loraflow_requests", "HTTP requests answered (GET /metrics itself not counted)",
                                ["route", "mode", "status"], registry=self.registry)
        self.latency = Histogram("loraflow_request_duration_seconds",
                                 "Time from the request to the last byte of its response (a stream's end)",
                                 ["route", "mode"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.feedback = Counter("loraflow_feedback_events", "Feedback events appended to disk",
                                ["mode", "trains"], registry=self.registry)
        for c in engine_metrics.collectors():
            self.registry.register(c)
        self.registry.register(_AdapterState(cache))

    def mode_label(self, mode: str | None) -> str:
        if mode is None:
            return "base"
        with self.cache.state:
            return mode if mode in self.cache.champions or mode in self.cache.failed else "unknown"

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

