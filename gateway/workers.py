"""Workers as the gateway sees them: where they are, whether they are usable, and how loaded they are.

A ``Worker`` object lives as long as its (url, role) stays in some routing table, so its health,
breaker and load survive plan swaps; routing tables only hold references to these objects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from gateway.upstream_http import address

# A request's token count is folded into the load score at this rate: 512 outstanding tokens weigh
# as much as one more outstanding request.
TOKENS_PER_REQUEST_EQUIV = 512.0


@dataclass
class CircuitBreaker:
    """Closed -> open after ``threshold`` consecutive failures; after ``cooldown_s`` one probe may pass
    (half-open); its success closes the breaker, its failure reopens it. 4xx answers are not failures."""

    threshold: int = 3
    cooldown_s: float = 5.0
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if time.monotonic() - self.opened_at >= self.cooldown_s else "open"

    def allows(self) -> bool:
        """May a new request go to this worker now? (Does not reserve the half-open probe.)"""
        if self.opened_at is None:
            return True
        return not self.probing and time.monotonic() - self.opened_at >= self.cooldown_s

    def on_dispatch(self) -> None:
        if self.opened_at is not None:
            self.probing = True

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = time.monotonic()


class InFlight(Protocol):
    """A request attempt that can be told one of its workers is gone."""

    def worker_down(self, worker: Worker, reason: str) -> None: ...


@dataclass(eq=False)
class Worker:
    """One SGLang-protocol worker (prefill, decode or colocated) and its live state."""

    url: str
    role: str
    name: str = ""
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    healthy: bool | None = None  # None = not checked yet (usable, but not counted as ready)
    health_failures: int = 0
    outstanding: int = 0
    outstanding_tokens: int = 0
    served: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.host = urlsplit(self.url).hostname or "127.0.0.1"
        self.addr = address(self.url)
        self.name = self.name or self.url
        self.inflight: set[InFlight] = set()  # attempts with a leg on this worker

    # -- availability ------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.healthy is not False and self.breaker.allows()

    @property
    def ready(self) -> bool:
        return self.healthy is True and self.breaker.allows()

    def mark_health(self, ok: bool, failures_to_down: int) -> None:
        """Result of one active health check."""
        if ok:
            self.health_failures = 0
            self.healthy = True
        else:
            self.health_failures += 1
            if self.health_failures >= failures_to_down or self.healthy is None:
                self.healthy = False

    def fail_inflight(self, reason: str) -> int:
        """This worker is gone (it fails its health checks): fail every leg on it now, so each request
        retries or migrates at once instead of waiting for a silence timeout. Returns how many."""
        attempts = list(self.inflight)
        for attempt in attempts:
            attempt.worker_down(self, reason)
        return len(attempts)

    def mark_unreachable(self) -> None:
        """Connection refused: the process is gone; stop routing to it until a health check says otherwise."""
        self.healthy = False
        self.health_failures = max(self.health_failures, 1)

    def record(self, ok: bool) -> None:
        """Outcome of one request leg, for the circuit breaker."""
        if ok:
            self.breaker.success()
        else:
            self.failed += 1
            self.breaker.failure()

    # -- load --------------------------------------------------------------------------------------
    def load(self) -> float:
        return self.outstanding + self.outstanding_tokens / TOKENS_PER_REQUEST_EQUIV

    def acquire(self, tokens: int) -> None:
        self.outstanding += 1
        self.outstanding_tokens += tokens
        self.served += 1
        if self.breaker.opened_at is not None:
            self.breaker.on_dispatch()

    def release(self, tokens: int) -> None:
        self.outstanding -= 1
        self.outstanding_tokens -= tokens

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.url,
            "role": self.role,
            "healthy": self.healthy,
            "breaker": self.breaker.state,
            "outstanding": self.outstanding,
            "outstanding_tokens": self.outstanding_tokens,
            "served": self.served,
            "failed": self.failed,
        }


class WorkerPool:
    """Every worker any routing table refers to, keyed by (url, role).

    Their load and health reach Prometheus through ``gateway.metrics.WorkerCollector``, read at scrape
    time, so the request path updates plain integers only.
    """

    def __init__(self, cb_failures: int = 3, cb_cooldown_s: float = 5.0) -> None:
        self.cb_failures = cb_failures
        self.cb_cooldown_s = cb_cooldown_s
        self._workers: dict[tuple[str, str], Worker] = {}

    def get(self, url: str, role: str, name: str = "") -> Worker:
        key = (url.rstrip("/"), role)
        w = self._workers.get(key)
        if w is None:
            w = Worker(url, role, name=name, breaker=CircuitBreaker(self.cb_failures, self.cb_cooldown_s))
            self._workers[key] = w
        elif name:
            w.name = name
        return w

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def prune(self, keep: set[Worker]) -> None:
        """Forget workers no table uses any more, once nothing is in flight on them."""
        for key, w in list(self._workers.items()):
            if w not in keep and w.outstanding == 0:
                del self._workers[key]
