"""Plan mode: keep the routing table equal to the plan and replica records in Redis.

Every message on the plan-updates channel triggers a re-read; a slow periodic re-read is the safety
net for a missed message (a Redis reconnect) and for replica records that change without a new plan
(a replica turning ``draining`` or ``failed``). A new table is swapped in with one assignment only when
its content differs, so requests in flight are never disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import RedisError

from gateway.context import Gateway
from gateway.routing import RoutingTable, plan_table
from gateway.workload_meter import slo_targets
from planner.plan import PlanError
from planner.state import StateStore

log = logging.getLogger("gateway.plan")


def _fingerprint(table: RoutingTable) -> tuple[object, ...]:
    return (table.version, table.model, tuple(
        (p.prefill.url, p.prefill.role, p.decode.url, p.decode.role, round(p.weight, 9), p.bootstrap_port)
        for p in table.pairs
    ))


class PlanWatcher:
    def __init__(self, gw: Gateway, state: StateStore) -> None:
        self.gw = gw
        self.state = state
        self._lock = asyncio.Lock()
        self.refreshes = 0

    async def refresh(self) -> bool:
        """Re-read plan and replicas; swap the table if anything changed. True if swapped."""
        async with self._lock:
            plan = await self.state.get_plan()
            replicas = await self.state.replicas()
            self.refreshes += 1
            self.gw.workload.slo = slo_targets(plan.slo) if plan is not None else None
            if plan is None:
                table = RoutingTable([], version=0, source="plan")
            else:
                if plan.version < self.gw.table.version:
                    # Reads are serialised by the lock and Redis is linearisable, so a lower version is
                    # not a stale read: Redis lost its data (restarted without persistence, flushed)
                    # and the controller republished. Redis is the truth: follow it.
                    log.warning("plan version went back from v%s to v%s (Redis reset?); following Redis",
                                self.gw.table.version, plan.version)
                table = plan_table(plan, replicas, self.gw.pool)
            if _fingerprint(table) == _fingerprint(self.gw.table):
                return False
            self.gw.plan = plan
            self.gw.swap_table(table)
            return True

    async def _safe_refresh(self) -> None:
        """A refresh that never ends the watch: a failed one keeps the current table until the next."""
        try:
            await self.refresh()
        except (RedisError, OSError, PlanError) as e:
            log.warning("cannot read the plan from Redis: %s", e)
        except Exception:  # e.g. a replica record a newer agent wrote that this gateway cannot read
            log.exception("cannot build a routing table from Redis; keeping the current one")

    async def run(self) -> None:
        """Subscribe, read once, then follow updates and re-read periodically, until cancelled."""
        periodic = asyncio.create_task(self._periodic())
        try:
            while True:
                updates = self.state.plan_updates()
                pending = asyncio.ensure_future(anext(updates))
                try:
                    await asyncio.sleep(0.05)  # let SUBSCRIBE land before the first read
                    await self._safe_refresh()
                    while True:
                        version = await pending
                        log.info("plan update v%s announced", version)
                        await self._safe_refresh()
                        pending = asyncio.ensure_future(anext(updates))
                except (RedisError, OSError, StopAsyncIteration) as e:
                    log.warning("plan subscription lost (%s); resubscribing", e)
                    await asyncio.sleep(1.0)
                finally:
                    pending.cancel()
                    with contextlib.suppress(BaseException):
                        await pending
                    with contextlib.suppress(BaseException):
                        await updates.aclose()
        finally:
            periodic.cancel()

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.gw.cfg.plan_refresh_s)
            await self._safe_refresh()
