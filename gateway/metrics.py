"""Prometheus metrics of the gateway, all named `ts_gateway_*` (the Grafana dashboard depends on these names).

One registry per gateway instance, so several gateways in one test process do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

# Latency buckets from sub-millisecond (cached, tiny models) to minutes (long CPU generations).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class WorkerView(Protocol):
    url: str
    role: str
    outstanding: int
    outstanding_tokens: int

    @property
    def ready(self) -> bool: ...


class WorkerCollector(Collector):
    """Per-worker load and health, read from the live Worker objects when Prometheus scrapes.

    The request path then only touches plain integers (a labelled Gauge.set costs a lock each time).
    """

    def __init__(self, workers: Callable[[], Iterable[WorkerView]]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        out = GaugeMetricFamily("ts_gateway_worker_outstanding", "Requests in flight on a worker",
                                labels=["worker", "role"])
        tok = GaugeMetricFamily("ts_gateway_worker_outstanding_tokens",
                                "Tokens (prompt + budget) of the requests in flight on a worker",
                                labels=["worker", "role"])
        ok = GaugeMetricFamily("ts_gateway_worker_healthy",
                               "1 if the worker passes health checks and its breaker is closed",
                               labels=["worker", "role"])
        for w in self.workers():
            out.add_metric([w.url, w.role], w.outstanding)
            tok.add_metric([w.url, w.role], w.outstanding_tokens)
            ok.add_metric([w.url, w.role], 1.0 if w.ready else 0.0)
        yield out
        yield tok
        yield ok

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class GatewayMetrics:
    """The gateway's metric families; handlers call these, `/metrics` renders them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ts_gateway_requests", "Requests answered, by route and HTTP status", ["route", "status"], registry=r
        )
        self.ttft = Histogram(
            "ts_gateway_ttft_seconds", "Time from request arrival to the first token sent", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "ts_gateway_tpot_seconds", "Mean time per output token after the first, per request", ["route"],
            buckets=_TPOT_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "ts_gateway_e2e_seconds", "Time from request arrival to the last byte sent", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.retries = Counter("ts_gateway_retries", "Attempts on a new pair before the first byte", registry=r)
        self.pair_waits = Counter(
            "ts_gateway_pair_waits", "Requests held because no (prefill, decode) pair was usable", registry=r
        )
        self.migrations = Counter(
            "ts_gateway_migrations", "Streams moved to a new pair after bytes reached the client", registry=r
        )
        self.upstream_failures = Counter(
            "ts_gateway_upstream_failures", "Failed legs by worker role and reason", ["role", "reason"], registry=r
        )
        self.plan_version = Gauge("ts_gateway_plan_version", "Version of the routing table in use", registry=r)
        self.rate_limited = Counter("ts_gateway_rate_limited", "Requests refused with 429", registry=r)
        # Children cached per label set: `.labels()` validates and locks each time; the cache is a dict lookup.
        self._children: dict[tuple[object, ...], object] = {}

    def watch_workers(self, workers: Callable[[], Iterable[WorkerView]]) -> None:
        self.registry.register(WorkerCollector(workers))

    def count(self, route: str, status: int) -> None:
        key = ("req", route, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(route, str(status))
        child.inc()  # type: ignore[attr-defined]

    def observe(self, histogram: Histogram, route: str, value: float) -> None:
        key = (id(histogram), route)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = histogram.labels(route)
        child.observe(value)  # type: ignore[attr-defined]

    def render(self) -> bytes:
        return generate_latest(self.registry)
