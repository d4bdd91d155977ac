"""API keys and per-key rate limits.

Keys live hashed in Redis (``StateStore``); a lookup is cached for ``key_cache_s`` (default 2 s), so a
revoked key stops working within that time while the hot path makes no Redis round trip for a known
key. Unknown keys are cached too (a flood of bad keys costs Redis one lookup per key per TTL), and
concurrent lookups of one key share one round trip. If Redis is unreachable, a key seen in the last
minute keeps working (fail-safe for a Redis blip); an unseen key gets 503.

Limits (requests and tokens per minute) are charged through ``StateStore.consume_rate``: one Lua
call, shared by every gateway, made only for keys that have a limit. Tokens are charged at admission
as prompt tokens plus the requested completion budget (a reservation: the limit can never be
exceeded, at the price of counting tokens that were not generated).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from redis.exceptions import RedisError

from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics
from planner.state import StateStore, hash_api_key

log = logging.getLogger("gateway.auth")

STALE_OK_S = 60.0  # how long a cached key stays usable while Redis is unreachable
CACHE_MAX = 10_000


@dataclass(frozen=True)
class Principal:
    """Who is calling, and what they may do."""

    name: str
    key_hash: str
    rpm: int | None = None
    tpm: int | None = None
    admin: bool = False

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None


ANONYMOUS = Principal(name="anonymous", key_hash="")


def bearer_key(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, key = header.partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


class Authenticator:
    """Answers "who is this and may they proceed" for each request."""

    def __init__(
        self,
        state: StateStore | None,
        static_keys: list[str],
        admin_key: str | None,
        enabled: bool,
        cache_s: float = 2.0,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.state = state
        self.enabled = enabled
        self.cache_s = cache_s
        self.metrics = metrics
        self._static = {hash_api_key(k): Principal(name=f"static-{i}", key_hash=hash_api_key(k))
                        for i, k in enumerate(static_keys)}
        self._admin_hash = hash_api_key(admin_key) if admin_key else None
        self._cache: OrderedDict[str, tuple[float, float, Principal | None]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[Principal | None]] = {}  # lookups in flight, by key hash
        self._last_redis_warning = 0.0

    # -- identity ------------------------------------------------------------------------------------
    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller of a public route; 401 if auth is on and the key is missing or unknown."""
        if not self.enabled:
            return ANONYMOUS
        key = bearer_key(authorization)
        if key is None:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        principal = await self._lookup(key)
        if principal is None:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        return principal

    async def authenticate_admin(self, authorization: str | None) -> Principal:
        """The caller of an /admin route: the --admin-key, or a Redis key created with admin=True."""
        key = bearer_key(authorization)
        if key is None:
            raise ApiError(401, "missing admin key: send 'Authorization: Bearer <admin key>'", code="missing_api_key")
        h = hash_api_key(key)
        if self._admin_hash is not None and hmac.compare_digest(h, self._admin_hash):
            return Principal(name="admin", key_hash=h, admin=True)
        principal = await self._lookup(key) if self.state is not None else None
        if principal is None:
            raise ApiError(401, "invalid admin key", code="invalid_api_key")
        if not principal.admin:
            raise ApiError(403, "this key is not an admin key", code="not_admin")
        return principal

    def forget(self, key_hash: str) -> None:
        """Drop a cached lookup at once (this gateway revoked the key)."""
        self._cache.pop(key_hash, None)

    async def _lookup(self, key: str) -> Principal | None:
        key_hash = hash_api_key(key)
        static = self._static.get(key_hash)
        if static is not None:
            return static
        if self.state is None:
            return None
        now = time.monotonic()
        hit = self._cache.get(key_hash)
        if hit is not None and hit[0] > now:
            return hit[2]
        pending = self._pending.get(key_hash)
        if pending is None:
            # The lookup runs as its own task, shared by every request for this key: a caller that goes
            # away (client disconnect, deadline) cancels only its own wait, never the others' answer.
            pending = asyncio.ensure_future(self._fetch(key, key_hash, hit, now))
            self._pending[key_hash] = pending
            pending.add_done_callback(lambda t: self._lookup_done(key_hash, t))
        return await asyncio.shield(pending)

    def _lookup_done(self, key_hash: str, task: asyncio.Future[Principal | None]) -> None:
        self._pending.pop(key_hash, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter re-raises it; none may be left to do so

    async def _fetch(self, key: str, key_hash: str, stale: tuple[float, float, Principal | None] | None,
                     now: float) -> Principal | None:
        assert self.state is not None
        try:
            rec = await self.state.verify_api_key(key)
        except (RedisError, OSError) as e:
            if stale is not None and stale[2] is not None and now - stale[1] < STALE_OK_S:
                self._warn(f"Redis unreachable ({e}); using a cached API key")
                return stale[2]
            self._warn(f"Redis unreachable ({e}); cannot check API keys")
            raise ApiError(503, "the API-key store is unreachable; try again shortly",
                           code="auth_unavailable") from e
        principal = None if rec is None else Principal(rec.name, key_hash, rec.rpm, rec.tpm, rec.admin)
        self._cache[key_hash] = (now + self.cache_s, now, principal)
        self._cache.move_to_end(key_hash)
        while len(self._cache) > CACHE_MAX:
            self._cache.popitem(last=False)
        return principal

    # -- limits --------------------------------------------------------------------------------------
    async def charge(self, principal: Principal, tokens: int) -> None:
        """Count one request and ``tokens`` tokens against the key's per-minute limits; 429 if over."""
        if not principal.limited or self.state is None:
            return
        try:
            decision = await self.state.consume_rate(principal.key_hash, principal.rpm, principal.tpm, 1, tokens)
        except (RedisError, OSError) as e:
            self._warn(f"Redis unreachable ({e}); rate limits not enforced")
            return
        if not decision.allowed:
            if self.metrics is not None:
                self.metrics.rate_limited.inc()
            what = "tokens" if principal.tpm is not None and decision.tokens + tokens > principal.tpm else "requests"
            retry = max(1, math.ceil(decision.retry_after))
            raise ApiError(
                429, f"rate limit reached for {what} per minute; retry in {retry} s",
                code="rate_limit_exceeded", headers={"Retry-After": str(retry)},
            )

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_redis_warning > 10:
            self._last_redis_warning = now
            log.warning(message)
