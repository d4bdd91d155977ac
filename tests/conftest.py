"""Shared fixtures: a real, empty redis-server per test module (never a fake)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from planner.embedded_redis import EmbeddedRedis
from planner.state import StateStore


@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One embedded redis-server for the module; stopped (and its files removed) afterwards."""
    server = EmbeddedRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
async def state(redis_url: str) -> AsyncIterator[StateStore]:
    """A StateStore on a fresh deployment namespace, so tests in one module do not see each other."""
    client = aioredis.from_url(redis_url)
    store = StateStore(client, deployment=f"t{uuid.uuid4().hex[:8]}")
    yield store
    await store.wipe()
    await client.aclose()
