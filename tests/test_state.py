"""The state module against a real redis-server: plans, pub/sub, heartbeats, events, keys, limits."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import redis.asyncio as aioredis

from planner.plan import Instance, Plan, ReplicaSpec, Route
from planner.state import NodeRecord, ReplicaRecord, StateStore


def small_plan(weight: float = 1.0) -> Plan:
    return Plan(
        model="tiny",
        instances=[Instance("n0", "1x_L4", "L4", 1, True, 0.4), Instance("n1", "1x_A10G", "A10G", 1, True, 0.5)],
        replicas=[
            ReplicaSpec("r0", ["n0"], [("n0", 0)], 1, 1, "prefill"),
            ReplicaSpec("r1", ["n1"], [("n1", 0)], 1, 1, "decode"),
        ],
        routing=[Route("r0", "r1", weight)],
    )


async def test_plan_publish_is_seen_by_two_subscribers(state: StateStore, redis_url: str) -> None:
    other = StateStore(aioredis.from_url(redis_url), state.deployment)
    seen: dict[str, list[int]] = {"a": [], "b": []}

    async def listen(store: StateStore, name: str) -> None:
        async for version in store.plan_updates():
            seen[name].append(version)
            if len(seen[name]) == 2:
                return

    tasks = [asyncio.create_task(listen(state, "a")), asyncio.create_task(listen(other, "b"))]
    await asyncio.sleep(0.2)  # let both SUBSCRIBEs land before publishing
    v1 = await state.publish_plan(small_plan())
    v2 = await other.publish_plan(small_plan())
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert (v1, v2) == (1, 2)
    assert seen == {"a": [1, 2], "b": [1, 2]}
    current = await other.get_plan()
    assert current is not None and current.version == 2
    assert (await state.get_plan(1)).version == 1  # type: ignore[union-attr]
    await other.close()


async def test_concurrent_publishers_get_distinct_versions(state: StateStore, redis_url: str) -> None:
    stores = [StateStore(aioredis.from_url(redis_url), state.deployment) for _ in range(8)]
    versions = await asyncio.gather(*(s.publish_plan(small_plan()) for s in stores for _ in range(5)))
    assert sorted(versions) == list(range(1, 41))
    assert await state.plan_version() == 40
    assert (await state.get_plan()).version == 40  # type: ignore[union-attr]
    for s in stores:
        await s.close()


async def test_heartbeat_expires(state: StateStore) -> None:
    await state.heartbeat("n0", ttl_s=0.3)
    await state.heartbeat("n1", ttl_s=5)
    assert await state.alive(["n0", "n1", "n2"]) == {"n0": True, "n1": True, "n2": False}
    await asyncio.sleep(0.45)
    assert await state.alive(["n0", "n1"]) == {"n0": False, "n1": True}


async def test_events_stream_keeps_order_and_filters(state: StateStore) -> None:
    ids = [await state.emit("preempted" if i % 2 else "provisioned", f"step {i}", i=i) for i in range(10)]
    events = await state.events()
    assert [e.id for e in events] == ids
    assert [e.data["i"] for e in events] == list(range(10))
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(events))
    after = await state.events(after=ids[4])
    assert [e.data["i"] for e in after] == [5, 6, 7, 8, 9]
    assert [e.data["i"] for e in await state.events(kind="preempted")] == [1, 3, 5, 7, 9]
    assert [e.data["i"] for e in await state.recent_events(3)] == [7, 8, 9]


async def test_wait_events_blocks_until_one_arrives(state: StateStore) -> None:
    waiter = asyncio.create_task(state.wait_events(after="$", block_ms=3000))
    await asyncio.sleep(0.1)
    await state.emit("role_switch", "rebalance", replica="r1")
    got = await asyncio.wait_for(waiter, 5)
    assert [(e.kind, e.data) for e in got] == [("role_switch", {"replica": "r1"})]


# -- a Redis that is slow or silent -------------------------------------------------------------------
async def test_blocking_reads_outlast_the_socket_timeout(state: StateStore, redis_url: str) -> None:
    """A client whose replies are bounded at 0.3 s still waits seconds for an event or a plan update: its
    blocking reads wait in slices under the timeout instead of failing with it."""
    store = StateStore.from_url(redis_url, state.deployment, timeout_s=0.3)
    try:
        started = time.monotonic()
        assert await store.wait_events(after="$", block_ms=900) == []  # no event: an empty list, no error
        assert time.monotonic() - started >= 0.85
        waiter = asyncio.create_task(store.wait_events(after="$", block_ms=5000))
        updates = store.plan_updates()
        update = asyncio.ensure_future(anext(updates))
        await asyncio.sleep(1.2)  # four socket timeouts of silence on both connections
        assert not waiter.done() and not update.done()
        await state.emit("preempted", "spot", node="n3")
        version = await state.publish_plan(small_plan())
        got = await asyncio.wait_for(waiter, 5)
        assert [(e.kind, e.data) for e in got] == [("preempted", {"node": "n3"})]
        assert await asyncio.wait_for(update, 5) == version
        await updates.aclose()
    finally:
        await store.close()


async def test_a_redis_that_never_answers_fails_the_call_instead_of_hanging() -> None:
    """A server that accepts the connection and never replies (a stalled host): the call ends with a
    RedisError once the socket timeout is spent (redis-py does not retry it), not never."""
    from redis.exceptions import RedisError

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = StateStore.from_url(f"redis://127.0.0.1:{port}", "silent", timeout_s=0.2)
    try:
        with pytest.raises(RedisError):
            await asyncio.wait_for(store.plan_version(), 30)  # a hang would end here as the builtin TimeoutError
    finally:
        await store.close()
        server.close()
        await server.wait_closed()


async def test_concurrent_record_updates_lose_nothing(state: StateStore, redis_url: str) -> None:
    """Many writers doing read-modify-write of one record: WATCH/MULTI keeps every change."""
    await state.put_replica(ReplicaRecord(id="r0", node_ids=["n0"], role="prefill", gpus=[]))
    stores = [StateStore(aioredis.from_url(redis_url), state.deployment) for _ in range(6)]

    async def add_gpu(store: StateStore, i: int) -> None:
        await store.modify_replica("r0", lambda rec: rec.gpus.append(["n0", i]))

    await asyncio.gather(*(add_gpu(stores[i % 6], i) for i in range(60)))
    rec = await state.get_replica("r0")
    assert rec is not None and sorted(g[1] for g in rec.gpus) == list(range(60))
    for s in stores:
        await s.close()


async def test_node_records_and_status_validation(state: StateStore) -> None:
    node = NodeRecord("n0", "1x_L4", "L4", 1, True, 0.44, region="US", cloud="local")
    await state.put_node(node)
    updated = await state.update_node("n0", status="ready", agent_url="http://127.0.0.1:9")
    assert updated.status == "ready" and updated.updated_at >= node.updated_at
    assert (await state.nodes())["n0"].agent_url == "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="unknown node status"):
        await state.update_node("n0", status="exploded")
    with pytest.raises(KeyError):
        await state.update_node("missing", status="ready")
    await state.delete_node("n0")
    assert await state.get_node("n0") is None


async def test_api_keys_are_stored_hashed(state: StateStore) -> None:
    key = await state.create_api_key("alice", rpm=10)
    raw = await state.r.hgetall(state.apikeys_key)
    assert all(key.encode() not in k and key.encode() not in v for k, v in raw.items())
    rec = await state.verify_api_key(key)
    assert rec is not None and rec.name == "alice" and rec.rpm == 10
    assert await state.verify_api_key(key + "x") is None
    assert await state.revoke_api_key(rec.key_hash)
    assert await state.verify_api_key(key) is None


async def test_rate_limit_is_exact_under_concurrency(state: StateStore, redis_url: str) -> None:
    """20 gateways racing for a 50 requests/minute key: exactly 50 get through."""
    stores = [StateStore(aioredis.from_url(redis_url), state.deployment) for _ in range(20)]
    now = time.time()
    decisions = await asyncio.gather(
        *(stores[i % 20].consume_rate("k", rpm=50, tpm=None, now=now) for i in range(120))
    )
    assert sum(d.allowed for d in decisions) == 50
    refused = [d for d in decisions if not d.allowed]
    assert all(0 < d.retry_after <= 60 for d in refused)
    # token limit: a request that would cross it is refused and charges nothing
    ok = await state.consume_rate("t", rpm=None, tpm=100, tokens=80, now=now)
    no = await state.consume_rate("t", rpm=None, tpm=100, tokens=30, now=now)
    yes = await state.consume_rate("t", rpm=None, tpm=100, tokens=20, now=now)
    assert (ok.allowed, no.allowed, yes.allowed) == (True, False, True) and yes.tokens == 100
    # the next minute starts afresh
    assert (await state.consume_rate("k", rpm=50, tpm=None, now=now + 60)).allowed
    for s in stores:
        await s.close()


async def test_controller_lease(state: StateStore) -> None:
    assert await state.acquire_leader("a", ttl_s=0.3)
    assert await state.acquire_leader("a", ttl_s=0.3)  # renew
    assert not await state.acquire_leader("b", ttl_s=0.3)
    await asyncio.sleep(0.4)
    assert await state.acquire_leader("b", ttl_s=5)
    await state.release_leader("a")  # not the holder: no effect
    assert not await state.acquire_leader("a")
    await state.release_leader("b")
    assert await state.acquire_leader("a")


async def test_meta_and_wipe(state: StateStore) -> None:
    await state.set_meta(gateway_url="http://127.0.0.1:8000", budget=2.0)
    assert await state.meta() == {"gateway_url": "http://127.0.0.1:8000", "budget": 2.0}
    await state.emit("x")
    assert await state.wipe() >= 2
    assert await state.meta() == {} and await state.events() == []
