"""Is the node agent up? ``GET /health`` over HTTP, as the controller and the gateway will ask it."""

from __future__ import annotations

import aiohttp


async def agent_healthy(session: aiohttp.ClientSession, agent_url: str, timeout_s: float = 2.0) -> bool:
    """True if ``{agent_url}/health`` answers 200 within ``timeout_s``; any failure is just False."""
    try:
        async with session.get(
            f"{agent_url.rstrip('/')}/health", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            await resp.read()
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False
