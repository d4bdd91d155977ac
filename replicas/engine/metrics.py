"""Prometheus metrics under SGLang's names (``sglang:*``), so dashboards and routers read us like SGLang."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from replicas.engine.sequence import Sequence

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class EngineMetrics:
    """One registry per engine process; gauges are refreshed by the scheduler after every step."""

    def __init__(self, model_name: str) -> None:
        disable_created_metrics()  # SGLang's exposition has no *_created series
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"sglang:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"sglang:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"sglang:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_running = gauge("num_running_reqs", "Requests in the running (decode) batch.")
        self.num_queue = gauge("num_queue_reqs", "Requests waiting to be scheduled.")
        self.num_used_tokens = gauge("num_used_tokens", "KV cache tokens in use.")
        self.token_usage = gauge("token_usage", "KV cache tokens in use / capacity.")
        self.gen_throughput = gauge("gen_throughput", "Generated tokens per second (last 5 s).")
        self.cache_hit_rate = gauge("cache_hit_rate", "Prefix cache hit rate (no prefix cache here: 0).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.num_requests = counter("num_requests", "Generation requests received.")
        self.num_aborted = counter("num_aborted_requests", "Requests aborted (disconnect, timeout, shutdown).")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Time per output token after the first.",
                              _TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)

    def observe_first_token(self, seq: Sequence, now: float) -> None:
        self.ttft.observe(max(0.0, now - seq.arrival))

    def observe_finished(self, seq: Sequence) -> None:
        end = seq.finished_at or time.monotonic()
        self.e2e.observe(max(0.0, end - seq.arrival))
        n = len(seq.output_ids)
        if n > 1 and seq.first_token_at is not None:
            self.tpot.observe(max(0.0, (end - seq.first_token_at) / (n - 1)))

    def render(self) -> bytes:
        return generate_latest(self.registry)
