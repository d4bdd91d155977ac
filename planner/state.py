"""Shared state in Redis: the one module that knows the key layout.

Every process that needs state another process wrote goes through ``StateStore``: the controller
writes plans and replica records, the gateway reads them, node agents write heartbeats, provisioners
write node records and events. Keys are namespaced per deployment as ``ts:{deployment}:...``:

- ``ts:{d}:nodes`` (hash): node id -> ``NodeRecord`` JSON: instance type, GPUs, region, spot, $/h,
  status, agent URL.
- ``ts:{d}:replicas`` (hash): replica id -> ``ReplicaRecord`` JSON: nodes, GPUs, engine, TP/PP, role,
  URL, bootstrap port, status.
- ``ts:{d}:plan`` (string): the current plan JSON (``planner.plan.Plan``) with its ``version`` set.
- ``ts:{d}:plan:version`` (string, int): version of the current plan; bumped on every publish.
- ``ts:{d}:plan:{v}`` (string): plan history, one key per version (the last ``PLAN_HISTORY`` kept).
- ``ts:{d}:plan-updates`` (pub/sub channel): message = plan version, sent on every publish and on every
  replica record change (``announce``); gateways re-read plan and replicas and swap tables on it.
- ``ts:{d}:events`` (stream): the audit log (preemptions, reschedules, role switches, provisioning);
  fields kind, reason, data (JSON), ts.
- ``ts:{d}:hb:{node}`` (string with TTL): last heartbeat of a node agent; expiry = node presumed lost.
- ``ts:{d}:apikeys`` (hash): sha256(key) -> ``ApiKeyRecord`` JSON; plaintext keys are never stored.
- ``ts:{d}:rl:{keyhash}:{minute}`` (hash with TTL): request and token counters (fields req, tok) of
  one key in one minute window.
- ``ts:{d}:workload:{bucket}`` (hash with TTL): what the gateways finished in one ``WORKLOAD_BUCKET_S`` window
  (fields requests, input_sum, input_sq, output_sum, output_sq; judged and slo_met: requests timed against the
  plan's SLO and those that met it; ttft_{i}, tpot_{i}: latency histograms over ``LATENCY_BOUNDS_S``), added
  with HINCRBYFLOAT by every gateway; the controller reads a window of them back to see the workload shift
  (``planner.observed_workload``) and whether the SLO is met live, and ``tsctl status`` shows them.
- ``ts:{d}:controller:leader`` (string with TTL): the controller holding the lease; one acts at a time.
- ``ts:{d}:meta`` (hash): deployment facts (gateway URL, budget, model, local/cloud, started_at).
- ``ts:{d}:budget:limit`` (string, int micro-USD/h): the hourly budget the provisioners enforce.
- ``ts:{d}:budget:holds`` (hash): node id -> micro-USD/h held for a pending or live instance; the
  provisioners' budget ledger (``provisioner.budget``) reserves with one Lua script, so the sum of holds
  never exceeds the limit even with several writers.

Read-modify-write of a record uses WATCH/MULTI (``_update_json_field``); the plan publish uses
WATCH/MULTI on the version key; the rate limit is one Lua script, so concurrent gateways never lose an
update or admit more than the limit.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from planner.plan import Plan

if TYPE_CHECKING:
    from planner.observed_workload import WorkloadSample

PLAN_HISTORY = 50
# Every command gets a reply within this or fails with a RedisError (not retried: it may have run): a Redis
# that stops answering (a stalled host, a half-open connection) must not hang a gateway or a provisioner.
# Blocking reads (pub/sub, XREAD) wait in slices shorter than this, so they may wait longer in all.
REDIS_TIMEOUT_S = 5.0
EVENTS_MAXLEN = 10_000
WORKLOAD_BUCKET_S = 10
WORKLOAD_TTL_S = 3600
# Latency histogram buckets (upper bounds, seconds; one more bucket past the last) for TTFT and TPOT: fixed, so
# every gateway's counts add up in Redis and a window's quantiles can be read back (as a bucket's upper bound).
LATENCY_BOUNDS_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
LATENCY_KEYS = {what: tuple(f"{what}_{i}" for i in range(len(LATENCY_BOUNDS_S) + 1)) for what in ("ttft", "tpot")}
LATENCY_FIELDS = (*LATENCY_KEYS["ttft"], *LATENCY_KEYS["tpot"])
WORKLOAD_FIELDS = ("requests", "input_sum", "input_sq", "output_sum", "output_sq", "judged", "slo_met",
                   *LATENCY_FIELDS)
NODE_STATUSES = ("pending", "ready", "preempted", "terminated", "failed")
REPLICA_STATUSES = ("starting", "ready", "draining", "switching", "failed", "stopped")

T = TypeVar("T")


def _from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """Build a record dataclass from JSON, ignoring fields a newer writer added."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class NodeRecord:
    """A machine we rent (or a virtual node with --local), as the provisioner sees it."""

    id: str
    instance_type: str
    gpu_type: str
    gpu_count: int
    spot: bool
    price_per_hour: float
    region: str = ""
    cloud: str = ""
    status: str = "pending"
    agent_url: str = ""
    provider_ref: str = ""  # SkyPilot cluster name, or the local process-group id
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


@dataclass
class ReplicaRecord:
    """A running (or starting) replica: where to reach it and what it does now."""

    id: str
    node_ids: list[str]
    role: str
    url: str = ""
    bootstrap_port: int | None = None
    gpus: list[list[Any]] = field(default_factory=list)
    engine: str = "reference"
    model: str = ""
    tp: int = 1
    pp: int = 1
    status: str = "starting"
    updated_at: float = field(default_factory=time.time)


@dataclass
class ApiKeyRecord:
    """What we know of an API key; the key itself is only ever shown once, at creation."""

    name: str
    key_hash: str
    rpm: int | None = None  # requests per minute, None = unlimited
    tpm: int | None = None  # tokens per minute, None = unlimited
    admin: bool = False
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Event:
    """One entry of the events stream."""

    id: str
    kind: str
    reason: str
    ts: float
    data: dict[str, Any]


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after: float  # seconds until the window resets; 0 when allowed
    requests: int  # counts in the current window after this call (or before, if refused)
    tokens: int


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# Lua: check both per-minute counters against their limits, increment both only if both fit.
# KEYS[1] = window hash key; ARGV = req_inc, tok_inc, rpm (-1 = none), tpm (-1 = none), ttl_s
_RATE_LIMIT_LUA = """
local req = tonumber(redis.call('HGET', KEYS[1], 'req') or '0')
local tok = tonumber(redis.call('HGET', KEYS[1], 'tok') or '0')
local dreq, dtok = tonumber(ARGV[1]), tonumber(ARGV[2])
local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
if (rpm >= 0 and req + dreq > rpm) or (tpm >= 0 and tok + dtok > tpm) then
  return {0, req, tok}
end
req = redis.call('HINCRBY', KEYS[1], 'req', dreq)
tok = redis.call('HINCRBY', KEYS[1], 'tok', dtok)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return {1, req, tok}
"""


# Lua: take the lease if free, renew it if we hold it. KEYS[1] = lease key; ARGV = owner, ttl_ms
_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
return 0
"""


class StateStore:
    """Typed async access to one deployment's state. Cheap to create; share the Redis client."""

    def __init__(self, client: aioredis.Redis, deployment: str = "default") -> None:
        self.r = client
        self.deployment = deployment
        self.prefix = f"ts:{deployment}:"
        self._rate_limit = self.r.register_script(_RATE_LIMIT_LUA)
        self._lease = self.r.register_script(_LEASE_LUA)

    @classmethod
    def from_url(cls, url: str, deployment: str = "default", timeout_s: float = REDIS_TIMEOUT_S) -> StateStore:
        """A store with its own client whose every read and connect is bounded by ``timeout_s``."""
        client = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(client, deployment)

    @property
    def _wait_slice_s(self) -> float:
        """How long one blocking read may wait: half the client's socket timeout (all of it if none)."""
        timeout = self.r.connection_pool.connection_kwargs.get("socket_timeout")
        return 3600.0 if timeout is None else max(0.01, timeout / 2)

    async def close(self) -> None:
        await self.r.aclose()

    # -- key names (the only place they are spelled) ---------------------------------------------
    def key(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    @property
    def nodes_key(self) -> str:
        return self.key("nodes")

    @property
    def replicas_key(self) -> str:
        return self.key("replicas")

    @property
    def plan_key(self) -> str:
        return self.key("plan")

    @property
    def plan_version_key(self) -> str:
        return self.key("plan", "version")

    @property
    def plan_channel(self) -> str:
        return self.key("plan-updates")

    @property
    def events_key(self) -> str:
        return self.key("events")

    @property
    def apikeys_key(self) -> str:
        return self.key("apikeys")

    @property
    def meta_key(self) -> str:
        return self.key("meta")

    def heartbeat_key(self, node_id: str) -> str:
        return self.key("hb", node_id)

    @property
    def budget_limit_key(self) -> str:
        return self.key("budget", "limit")

    @property
    def budget_holds_key(self) -> str:
        return self.key("budget", "holds")

    # -- generic record helpers --------------------------------------------------------------------
    async def _put(self, hkey: str, rec_id: str, rec: Any) -> None:
        await self.r.hset(hkey, rec_id, orjson.dumps(asdict(rec)))

    async def _get(self, hkey: str, rec_id: str, cls: type[T]) -> T | None:
        raw = await self.r.hget(hkey, rec_id)
        return None if raw is None else _from_dict(cls, orjson.loads(raw))

    async def _all(self, hkey: str, cls: type[T]) -> dict[str, T]:
        raw = await self.r.hgetall(hkey)
        return {k.decode(): _from_dict(cls, orjson.loads(v)) for k, v in raw.items()}

    async def _update(self, hkey: str, rec_id: str, cls: type[T], change: Callable[[T], None]) -> T:
        """Read-modify-write one record under WATCH, retried on conflict: no update is lost."""
        result: list[T] = []

        async def txn(pipe: aioredis.client.Pipeline) -> None:
            raw = await pipe.hget(hkey, rec_id)
            if raw is None:
                raise KeyError(f"{hkey} has no {rec_id!r}")
            rec = _from_dict(cls, orjson.loads(raw))
            change(rec)
            if hasattr(rec, "updated_at"):
                rec.updated_at = time.time()  # type: ignore[attr-defined]
            pipe.multi()
            pipe.hset(hkey, rec_id, orjson.dumps(asdict(rec)))
            result[:] = [rec]

        await self.r.transaction(txn, hkey)
        return result[0]

    # -- nodes ---------------------------------------------------------------------------------------
    async def put_node(self, node: NodeRecord) -> None:
        await self._put(self.nodes_key, node.id, node)

    async def get_node(self, node_id: str) -> NodeRecord | None:
        return await self._get(self.nodes_key, node_id, NodeRecord)

    async def nodes(self) -> dict[str, NodeRecord]:
        return await self._all(self.nodes_key, NodeRecord)

    async def update_node(self, node_id: str, **changes: Any) -> NodeRecord:
        if "status" in changes and changes["status"] not in NODE_STATUSES:
            raise ValueError(f"unknown node status {changes['status']!r}")
        return await self._update(self.nodes_key, node_id, NodeRecord, lambda n: _assign(n, changes))

    async def modify_node(self, node_id: str, change: Callable[[NodeRecord], None]) -> NodeRecord:
        """Apply ``change`` to the stored record atomically (retried if another writer got there first)."""
        return await self._update(self.nodes_key, node_id, NodeRecord, change)

    async def delete_node(self, node_id: str) -> None:
        await self.r.hdel(self.nodes_key, node_id)

    # -- replicas ----------------------------------------------------------------------------------
    async def put_replica(self, rep: ReplicaRecord) -> None:
        await self._put(self.replicas_key, rep.id, rep)
        await self.announce()

    async def get_replica(self, replica_id: str) -> ReplicaRecord | None:
        return await self._get(self.replicas_key, replica_id, ReplicaRecord)

    async def replicas(self) -> dict[str, ReplicaRecord]:
        return await self._all(self.replicas_key, ReplicaRecord)

    async def update_replica(self, replica_id: str, **changes: Any) -> ReplicaRecord:
        if "status" in changes and changes["status"] not in REPLICA_STATUSES:
            raise ValueError(f"unknown replica status {changes['status']!r}")
        rec = await self._update(self.replicas_key, replica_id, ReplicaRecord, lambda r: _assign(r, changes))
        await self.announce()
        return rec

    async def modify_replica(self, replica_id: str, change: Callable[[ReplicaRecord], None]) -> ReplicaRecord:
        """Apply ``change`` to the stored record atomically (retried if another writer got there first)."""
        rec = await self._update(self.replicas_key, replica_id, ReplicaRecord, change)
        await self.announce()
        return rec

    async def delete_replica(self, replica_id: str) -> None:
        await self.r.hdel(self.replicas_key, replica_id)
        await self.announce()

    # -- plans ---------------------------------------------------------------------------------------
    async def publish_plan(self, plan: Plan) -> int:
        """Store ``plan`` as the next version, keep it in the history, tell every subscriber.

        The version counter is WATCHed so two controllers publishing at once get distinct
        versions and the current plan is always the one with the highest version.
        """
        published: list[int] = []

        async def txn(pipe: aioredis.client.Pipeline) -> None:
            current = int(await pipe.get(self.plan_version_key) or 0)
            version = current + 1
            plan.version = version
            body = plan.to_json()
            pipe.multi()
            pipe.set(self.plan_version_key, version)
            pipe.set(self.plan_key, body)
            pipe.set(self.key("plan", version), body)
            if version > PLAN_HISTORY:
                pipe.delete(self.key("plan", version - PLAN_HISTORY))
            pipe.publish(self.plan_channel, str(version))
            published[:] = [version]

        await self.r.transaction(txn, self.plan_version_key)
        return published[0]

    async def announce(self) -> None:
        """Re-announce the current plan version: replica records changed, so routers re-read both.

        Every replica write calls this, so a worker turning ready, draining or failed reaches every
        gateway at once instead of at its next periodic refresh.
        """
        await self.r.publish(self.plan_channel, str(await self.plan_version()))

    async def get_plan(self, version: int | None = None) -> Plan | None:
        raw = await self.r.get(self.plan_key if version is None else self.key("plan", version))
        return None if raw is None else Plan.from_json(raw)

    async def plan_version(self) -> int:
        return int(await self.r.get(self.plan_version_key) or 0)

    async def plan_updates(self) -> AsyncIterator[int]:
        """Yield the version of every plan published from now on (pub/sub; one connection). Waits in slices
        under the socket timeout: ``listen()`` reads with it in older redis-py and would fail when idle."""
        wait_s = self._wait_slice_s
        pubsub = self.r.pubsub()
        await pubsub.subscribe(self.plan_channel)
        try:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait_s)
                if msg is not None and msg.get("type") == "message":
                    yield int(msg["data"])
        finally:
            await pubsub.unsubscribe(self.plan_channel)
            await pubsub.aclose()

    # -- events ------------------------------------------------------------------------------------
    async def emit(self, kind: str, reason: str = "", **data: Any) -> str:
        """Append one event to the audit stream; returns its stream id (ordered by time)."""
        eid = await self.r.xadd(
            self.events_key,
            {"kind": kind, "reason": reason, "ts": repr(time.time()), "data": orjson.dumps(data)},
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )
        return _event_id(eid)

    async def events(self, after: str = "-", count: int = 1000, kind: str | None = None) -> list[Event]:
        """Events after stream id ``after`` (exclusive), oldest first."""
        start = "-" if after == "-" else f"({after}"
        rows = await self.r.xrange(self.events_key, min=start, max="+", count=count)
        out = [_event(eid, f) for eid, f in rows]
        return [e for e in out if kind is None or e.kind == kind]

    async def recent_events(self, count: int = 20) -> list[Event]:
        rows = await self.r.xrevrange(self.events_key, count=count)
        return [_event(eid, f) for eid, f in reversed(rows)]

    async def wait_events(self, after: str = "$", block_ms: int = 1000) -> list[Event]:
        """Block up to ``block_ms`` for events newer than ``after`` ("$" = from now). Each XREAD blocks for
        less than the socket timeout; "$" is pinned to the newest id first, so no event falls between two."""
        if after == "$":
            last = await self.r.xrevrange(self.events_key, count=1)
            after = _event_id(last[0][0]) if last else "0-0"
        deadline, slice_ms = time.monotonic() + block_ms / 1000, int(self._wait_slice_s * 1000)
        while True:
            wait_ms = max(1, min(int((deadline - time.monotonic()) * 1000), slice_ms))
            res = await self.r.xread({self.events_key: after}, block=wait_ms, count=100)
            if res or time.monotonic() >= deadline:
                return [_event(eid, f) for _, rows in (res or []) for eid, f in rows]

    # -- heartbeats ----------------------------------------------------------------------------------
    async def heartbeat(self, node_id: str, ttl_s: float = 5.0) -> None:
        await self.r.set(self.heartbeat_key(node_id), repr(time.time()), px=max(1, int(ttl_s * 1000)))

    async def alive(self, node_ids: list[str]) -> dict[str, bool]:
        """Which nodes have an unexpired heartbeat."""
        if not node_ids:
            return {}
        async with self.r.pipeline(transaction=False) as pipe:
            for n in node_ids:
                pipe.exists(self.heartbeat_key(n))
            found = await pipe.execute()
        return {n: bool(x) for n, x in zip(node_ids, found, strict=True)}

    # -- API keys ------------------------------------------------------------------------------------
    async def create_api_key(
        self, name: str, rpm: int | None = None, tpm: int | None = None, admin: bool = False
    ) -> str:
        """Make a new key and return it in plain text (the only time it exists outside the client)."""
        key = "ts-" + secrets.token_urlsafe(32)
        rec = ApiKeyRecord(name=name, key_hash=hash_api_key(key), rpm=rpm, tpm=tpm, admin=admin)
        await self.r.hset(self.apikeys_key, rec.key_hash, orjson.dumps(asdict(rec)))
        return key

    async def verify_api_key(self, key: str) -> ApiKeyRecord | None:
        return await self._get(self.apikeys_key, hash_api_key(key), ApiKeyRecord)

    async def api_keys(self) -> list[ApiKeyRecord]:
        return list((await self._all(self.apikeys_key, ApiKeyRecord)).values())

    async def revoke_api_key(self, key_hash: str) -> bool:
        return bool(await self.r.hdel(self.apikeys_key, key_hash))

    # -- rate limits ---------------------------------------------------------------------------------
    async def consume_rate(
        self, key_hash: str, rpm: int | None, tpm: int | None, requests: int = 1, tokens: int = 0,
        now: float | None = None,
    ) -> RateDecision:
        """Charge one request and ``tokens`` tokens to this minute's window, or refuse both.

        Fixed one-minute windows shared by every gateway; the check and the increment are one Lua
        script, so N gateways together never admit more than the limit.
        """
        now = time.time() if now is None else now
        window = int(now // 60)
        allowed, req, tok = await self._rate_limit(
            keys=[self.key("rl", key_hash, window)],
            args=[requests, tokens, -1 if rpm is None else rpm, -1 if tpm is None else tpm, 120],
        )
        retry = 0.0 if allowed else (window + 1) * 60 - now
        return RateDecision(bool(allowed), retry, int(req), int(tok))

    # -- observed workload ---------------------------------------------------------------------------
    async def record_workload(self, counts: dict[str, float], now: float | None = None) -> None:
        """Add a gateway's counts (``WORKLOAD_FIELDS``) to the current bucket."""
        now = time.time() if now is None else now
        key = self.key("workload", int(now // WORKLOAD_BUCKET_S))
        async with self.r.pipeline(transaction=True) as pipe:
            for name in WORKLOAD_FIELDS:
                if counts.get(name):
                    pipe.hincrbyfloat(key, name, float(counts[name]))
            pipe.expire(key, WORKLOAD_TTL_S)
            await pipe.execute()

    async def workload_window(self, seconds: float, now: float | None = None) -> WorkloadSample:
        """The counts of the whole buckets of the last ``seconds`` (the current, partial bucket left out)."""
        from planner.observed_workload import WorkloadSample

        now = time.time() if now is None else now
        last = int(now // WORKLOAD_BUCKET_S) - 1
        first = last - max(1, int(seconds // WORKLOAD_BUCKET_S)) + 1
        async with self.r.pipeline(transaction=False) as pipe:
            for bucket in range(first, last + 1):
                pipe.hmget(self.key("workload", bucket), *WORKLOAD_FIELDS)
            rows = await pipe.execute()
        totals = {name: sum(float(row[i] or 0) for row in rows) for i, name in enumerate(WORKLOAD_FIELDS)}
        return WorkloadSample.from_counts(float((last - first + 1) * WORKLOAD_BUCKET_S), totals)

    # -- controller lease ----------------------------------------------------------------------------
    async def acquire_leader(self, owner: str, ttl_s: float = 5.0) -> bool:
        """Take or renew the controller lease; False if another controller holds it."""
        got = await self._lease(keys=[self.key("controller", "leader")], args=[owner, int(ttl_s * 1000)])
        return bool(got)

    async def release_leader(self, owner: str) -> None:
        key = self.key("controller", "leader")
        holder = await self.r.get(key)
        if holder is not None and holder.decode() == owner:
            await self.r.delete(key)

    # -- deployment meta -----------------------------------------------------------------------------
    async def set_meta(self, **values: Any) -> None:
        await self.r.hset(self.meta_key, mapping={k: orjson.dumps(v) for k, v in values.items()})

    async def meta(self) -> dict[str, Any]:
        raw = await self.r.hgetall(self.meta_key)
        return {k.decode(): orjson.loads(v) for k, v in raw.items()}

    async def wipe(self) -> int:
        """Delete every key of this deployment (``tsctl down``). Returns how many were removed."""
        n = 0
        async for k in self.r.scan_iter(match=self.prefix + "*", count=500):
            n += await self.r.delete(k)
        return n


def _assign(rec: Any, changes: dict[str, Any]) -> None:
    for k, v in changes.items():
        if not hasattr(rec, k):
            raise AttributeError(f"{type(rec).__name__} has no field {k!r}")
        setattr(rec, k, v)


def _event_id(eid: bytes | str) -> str:
    return eid.decode() if isinstance(eid, bytes) else eid


def _event(eid: bytes | str, f: dict[bytes, bytes]) -> Event:
    return Event(
        id=_event_id(eid),
        kind=f[b"kind"].decode(),
        reason=f[b"reason"].decode(),
        ts=float(f[b"ts"]),
        data=orjson.loads(f[b"data"]),
    )


__all__ = [
    "ApiKeyRecord",
    "Event",
    "NodeRecord",
    "RateDecision",
    "ReplicaRecord",
    "StateStore",
    "WatchError",
    "hash_api_key",
]
