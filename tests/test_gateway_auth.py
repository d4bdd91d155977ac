"""API keys and rate limits against a real Redis: cached lookups, revocation within the TTL, shared limits."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gateway.auth import Authenticator
from gateway.errors import ApiError
from planner.state import StateStore


async def test_keys_are_checked_cached_and_revoked_within_the_ttl(state: StateStore) -> None:
    auth = Authenticator(state, [], None, enabled=True, cache_s=0.3)
    key = await state.create_api_key("alice")
    who = await auth.authenticate(f"Bearer {key}")
    assert who.name == "alice"
    for header, code in ((None, "missing_api_key"), ("Basic abc", "missing_api_key"),
                         ("Bearer ts-not-a-key", "invalid_api_key")):
        with pytest.raises(ApiError) as err:
            await auth.authenticate(header)
        assert err.value.status == 401 and err.value.code == code
    [rec] = await state.api_keys()
    await state.revoke_api_key(rec.key_hash)
    assert (await auth.authenticate(f"Bearer {key}")).name == "alice"  # still cached
    await asyncio.sleep(0.35)
    with pytest.raises(ApiError) as err:
        await auth.authenticate(f"Bearer {key}")
    assert err.value.status == 401


async def test_concurrent_lookups_of_one_key_share_one_round_trip(state: StateStore) -> None:
    auth = Authenticator(state, [], None, enabled=True, cache_s=5)
    key = await state.create_api_key("bob")
    calls = 0
    original = state.verify_api_key

    async def counting(k: str):
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return await original(k)

    state.verify_api_key = counting  # type: ignore[method-assign]
    results = await asyncio.gather(*(auth.authenticate(f"Bearer {key}") for _ in range(20)))
    assert {r.name for r in results} == {"bob"} and calls == 1


async def test_a_caller_that_leaves_does_not_cancel_the_shared_lookup(state: StateStore) -> None:
    """The first request for a key leads the lookup; its client disconnecting must not fail the others."""
    auth = Authenticator(state, [], None, enabled=True, cache_s=5)
    key = await state.create_api_key("dave")
    release = asyncio.Event()
    original = state.verify_api_key

    async def slow(k: str):
        await release.wait()
        return await original(k)

    state.verify_api_key = slow  # type: ignore[method-assign]
    leader = asyncio.create_task(auth.authenticate(f"Bearer {key}"))
    await asyncio.sleep(0.01)
    follower = asyncio.create_task(auth.authenticate(f"Bearer {key}"))
    await asyncio.sleep(0.01)
    leader.cancel()  # its client went away
    await asyncio.sleep(0.01)
    release.set()
    assert (await asyncio.wait_for(follower, 5)).name == "dave"
    assert leader.cancelled()


async def test_rate_limits_are_shared_between_gateways(state: StateStore, redis_url: str) -> None:
    key = await state.create_api_key("carol", rpm=5, tpm=1000)
    other_state = StateStore(aioredis.from_url(redis_url), state.deployment)
    gateways = [Authenticator(state, [], None, True), Authenticator(other_state, [], None, True)]
    admitted = refused = 0
    retry_after = None
    for i in range(8):
        gw = gateways[i % 2]
        who = await gw.authenticate(f"Bearer {key}")
        try:
            await gw.charge(who, 10)
            admitted += 1
        except ApiError as e:
            assert e.status == 429 and e.code == "rate_limit_exceeded"
            retry_after = int(e.headers["Retry-After"])
            refused += 1
    assert (admitted, refused) == (5, 3)
    assert retry_after is not None and 1 <= retry_after <= 60
    big = await state.create_api_key("dave", tpm=100)
    who = await gateways[0].authenticate(f"Bearer {big}")
    with pytest.raises(ApiError, match="tokens per minute"):
        await gateways[0].charge(who, 101)
    await other_state.close()


async def test_admin_key_and_admin_records(state: StateStore) -> None:
    auth = Authenticator(state, ["user-key"], "root-key", enabled=True)
    assert (await auth.authenticate_admin("Bearer root-key")).admin
    assert (await auth.authenticate("Bearer user-key")).name == "static-0"
    with pytest.raises(ApiError) as err:
        await auth.authenticate_admin("Bearer user-key")
    assert err.value.status in (401, 403)
    ops = await state.create_api_key("ops", admin=True)
    plain = await state.create_api_key("plain")
    assert (await auth.authenticate_admin(f"Bearer {ops}")).name == "ops"
    with pytest.raises(ApiError) as err:
        await auth.authenticate_admin(f"Bearer {plain}")
    assert err.value.status == 403


async def test_redis_outage_keeps_known_keys_and_refuses_unknown_ones() -> None:
    from planner.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis()
    url = server.start()
    store = StateStore(aioredis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5), "outage")
    auth = Authenticator(store, [], None, enabled=True, cache_s=0.05)
    key = await store.create_api_key("erin", rpm=1)
    who = await auth.authenticate(f"Bearer {key}")
    server.stop()
    await asyncio.sleep(0.1)
    assert (await auth.authenticate(f"Bearer {key}")).name == "erin"  # stale entry serves through the blip
    await auth.charge(who, 1)  # limits fail open, with a warning
    await auth.charge(who, 1)
    with pytest.raises(ApiError) as err:
        await auth.authenticate("Bearer ts-never-seen")
    assert err.value.status == 503
    await store.close()
