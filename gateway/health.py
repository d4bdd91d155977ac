"""Active health checks: GET /health on every known worker, every ``health_interval_s``.

Passive signals (a refused connection, the circuit breaker) take a worker out at once; this loop is
what brings it back, what notices a worker that dies while idle, and what rescues requests stuck on a
worker that hangs (a frozen process, or a preempted VM whose connections go silent instead of being
reset): when a worker goes down, its in-flight legs are failed at once, so their requests retry or
migrate within ``health_interval_s x health_failures`` rather than after a read timeout.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from gateway.context import Gateway
from gateway.workers import Worker

log = logging.getLogger("gateway.health")


async def check_worker(gw: Gateway, worker: Worker) -> bool:
    assert gw.session is not None
    try:
        async with gw.session.get(worker.url + "/health",
                                  timeout=aiohttp.ClientTimeout(total=gw.cfg.health_timeout_s)) as resp:
            await resp.read()
            ok = resp.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        ok = False
    before = worker.healthy
    worker.mark_health(ok, gw.cfg.health_failures)
    if before is not worker.healthy and worker.healthy is not None:
        log.log(logging.INFO if worker.healthy else logging.WARNING, "%s worker %s is %s", worker.role,
                worker.name, "healthy" if worker.healthy else "DOWN")
        if worker.healthy is False:
            moved = worker.fail_inflight("failed its health checks")
            if moved:
                log.warning("%d request(s) on %s move to other workers", moved, worker.name)
    return ok


async def check_all(gw: Gateway) -> None:
    await asyncio.gather(*(check_worker(gw, w) for w in gw.pool.all()))


async def health_loop(gw: Gateway) -> None:
    while True:
        try:
            await check_all(gw)
        except Exception:  # never let the loop die; the next round tries again
            log.exception("health round failed")
        await asyncio.sleep(gw.cfg.health_interval_s)
