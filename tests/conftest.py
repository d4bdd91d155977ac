"""Shared fixtures: a real, empty redis-server per test module (never a fake); the bench scripts as modules."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from planner.embedded_redis import EmbeddedRedis
from planner.state import StateStore


@pytest.fixture
def bench() -> ModuleType:
    """``bench/_suite.py``, which loads the bench scripts as modules (``bench_module``, ``planner_suite``). Its
    folder goes after the repository root on ``sys.path``: ``planner`` stays the package, not the script."""
    folder = str(Path(__file__).resolve().parents[1] / "bench")
    if folder not in sys.path:
        sys.path.append(folder)
    import _suite

    return _suite


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
    """A StateStore on a fresh deployment namespace, so tests in one module do not see each other; its
    client bounds every reply as the product's do (a stalled Redis fails the test instead of hanging it)."""
    store = StateStore.from_url(redis_url, deployment=f"t{uuid.uuid4().hex[:8]}")
    yield store
    await store.wipe()
    await store.close()
