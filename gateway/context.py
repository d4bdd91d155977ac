"""The gateway's shared state: config, the current routing table, the upstream session, auth, tokenizer.

One object, built once at startup and attached to the aiohttp app; handlers read ``gw.table`` once
per attempt, and the plan watcher replaces it in a single assignment (atomic for asyncio).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from gateway.auth import Authenticator
from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics
from gateway.routing import NoWorkers, Pair, RoutingTable
from gateway.tokenizer import GatewayTokenizer
from gateway.upstream import Exchange
from gateway.upstream_http import UpstreamPool
from gateway.workers import WorkerPool
from gateway.workload_meter import WorkloadMeter
from planner.plan import Plan
from planner.state import StateStore

log = logging.getLogger("gateway")


@dataclass
class ModelInfo:
    """What clients may name in `model`, and the context length if a worker told us."""

    ids: list[str] = field(default_factory=list)
    context_length: int | None = None
    owned_by: str = "thunderserve"

    def accepts(self, name: str) -> bool:
        return not self.ids or name in self.ids


@dataclass
class Gateway:
    cfg: GatewayConfig
    metrics: GatewayMetrics
    pool: WorkerPool
    auth: Authenticator
    table: RoutingTable
    state: StateStore | None = None
    session: aiohttp.ClientSession | None = None  # health checks and discovery (off the hot path)
    upstream: UpstreamPool = field(default_factory=UpstreamPool)  # the dispatch legs
    tokenizer: GatewayTokenizer | None = None
    model: ModelInfo = field(default_factory=ModelInfo)
    rng: random.Random = field(default_factory=random.Random)
    plan: Plan | None = None  # the plan in use (plan mode), for /admin/plan
    table_changed: asyncio.Event = field(default_factory=asyncio.Event)  # set on every swap
    workload: WorkloadMeter = field(default_factory=WorkloadMeter)  # lengths served, for the controller

    async def choose_pair(self, avoid: set | None = None) -> Pair:
        """A pair from the current table; when none is usable, wait (up to --wait-for-pair-s) for the
        table to change or a worker to recover instead of failing at once: after a lost node the
        controller's new plan, or a role switch finishing, gives a pair within moments. Still none:
        the client's 503 (``no_workers``)."""
        try:
            return self.table.choose(self.rng, avoid)
        except NoWorkers as e:
            if self.cfg.wait_for_pair_s <= 0:
                raise ApiError(503, str(e), code="no_workers") from e
        try:
            return await self._wait_for_pair(avoid)
        except NoWorkers as e:
            raise ApiError(503, str(e), code="no_workers") from e

    async def _wait_for_pair(self, avoid: set | None) -> Pair:
        self.metrics.pair_waits.inc()
        deadline = time.monotonic() + self.cfg.wait_for_pair_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return self.table.choose(self.rng, avoid)  # raises NoWorkers if still none
            self.table_changed.clear()
            try:  # a table swap wakes us at once; health recoveries are seen on the short poll
                await asyncio.wait_for(self.table_changed.wait(), min(left, 0.1))
            except TimeoutError:
                pass
            try:
                return self.table.choose(self.rng, avoid)
            except NoWorkers:
                continue

    def retry_backoff_s(self, attempt: int) -> float:
        """Pause before retry ``attempt`` (1, 2, ...): --retry-backoff-ms, x1.5 per retry, +-20% jitter."""
        return self.cfg.retry_backoff_ms / 1000.0 * 1.5 ** (attempt - 1) * self.rng.uniform(0.8, 1.2)

    def exchange(self, pair: Pair, path: bytes, tokens: int, stream: bool) -> Exchange:
        """One attempt on ``pair``. A stream may stay silent for --upstream-read-timeout-s; a non-stream
        answer comes all at once at the end, so it gets the whole --request-timeout-s."""
        silence = self.cfg.upstream_read_timeout_s if stream else self.cfg.request_timeout_s
        return Exchange(self.upstream, pair, path, tokens, self.metrics, silence)

    def swap_table(self, table: RoutingTable) -> None:
        """Make ``table`` the one new requests use; requests in flight keep theirs."""
        old = self.table
        self.table = table
        self.table_changed.set()
        self.metrics.plan_version.set(table.version)
        self.pool.prune(table.workers())
        if old.version != table.version or len(old.pairs) != len(table.pairs):
            log.info("routing table v%s: %s", table.version,
                     ", ".join(f"{p.label()}={p.weight:.3f}" for p in table.pairs) or "empty")


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
