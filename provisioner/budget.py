"""The budget ledger: the sum of $/h of pending plus live instances never exceeds the hourly budget.

Every provisioner reserves a node's price *before* it asks for the machine and gives the hold back only
once the machine no longer bills (process group gone, cluster down). Holds live in Redis
(``StateStore.budget_holds_key``) and the check-and-reserve is one Lua script, so the invariant holds
across concurrent requests, several provisioner instances, and a restarted controller, which finds the
holds where it left them. Amounts are integer micro-dollars per hour: no float drift over many
reserve/release cycles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import orjson

from planner.state import NodeRecord, StateStore

MICRO = 1_000_000

# KEYS[1] = holds hash, KEYS[2] = limit key, KEYS[3] = nodes hash;
# ARGV = node id, amount (micro-USD/h), resize (1/0), node record JSON ('' = none).
# With resize the node's own hold is replaced (re-sized); without, a node that already holds is refused
# (it is still billing). Refuses if the total would pass the limit. When allowed, the node record (if
# given) is written in the same step, so no hold ever exists without its record.
# Returns {allowed, total (after if allowed, else current), limit (-1 = none set), previous hold, held_already}.
_RESERVE_LUA = """
local limit = redis.call('GET', KEYS[2])
local previous = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1])
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
if exists == 1 and ARGV[3] ~= '1' then return {0, total, tonumber(limit or '-1'), previous, 1} end
if not limit then return {0, total, -1, previous, 0} end
limit = tonumber(limit)
local after = total - previous + tonumber(ARGV[2])
if after > limit then return {0, total, limit, previous, 0} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[4]) end
return {1, after, limit, previous, 0}
"""


def to_micro(usd_per_hour: float) -> int:
    return round(usd_per_hour * MICRO)


def from_micro(micro: int) -> float:
    return micro / MICRO


class BudgetExceeded(Exception):
    """A reservation was refused; ``str(e)`` says by how much, so the caller can ask for less or wait."""

    def __init__(self, node_id: str, requested: float, committed: float, limit: float | None) -> None:
        self.node_id = node_id
        self.requested = requested
        self.committed = committed
        self.limit = limit
        if limit is None:
            msg = f"node {node_id}: no hourly budget is set; refusing ${requested:.2f}/h"
        else:
            msg = (
                f"node {node_id}: ${requested:.2f}/h refused: ${committed:.2f}/h already committed to pending and "
                f"live instances, ${max(0.0, limit - committed):.2f}/h left of the ${limit:.2f}/h budget"
            )
        super().__init__(msg)

    @property
    def remaining(self) -> float:
        return 0.0 if self.limit is None else max(0.0, self.limit - self.committed)


class HoldExists(ValueError):
    """A new reservation for a node id that still holds budget (its instance has not stopped billing)."""


@dataclass(frozen=True)
class Reservation:
    node_id: str
    amount: float  # $/h now held for the node
    committed: float  # $/h held in total after this reservation
    limit: float


class BudgetLedger:
    """Hourly-budget holds for one deployment, stored in its Redis namespace."""

    def __init__(self, state: StateStore) -> None:
        self.state = state
        self._reserve = state.r.register_script(_RESERVE_LUA)

    async def set_limit(self, usd_per_hour: float) -> None:
        """Set the budget. Lowering it below what is committed refuses new holds; it evicts nothing."""
        if not usd_per_hour >= 0:
            raise ValueError(f"budget must be a non-negative $/h, got {usd_per_hour!r}")
        await self.state.r.set(self.state.budget_limit_key, to_micro(usd_per_hour))

    async def limit(self) -> float | None:
        raw = await self.state.r.get(self.state.budget_limit_key)
        return None if raw is None else from_micro(int(raw))

    async def reserve(
        self, node_id: str, usd_per_hour: float, resize: bool = False, record: NodeRecord | None = None
    ) -> Reservation:
        """Hold ``usd_per_hour`` for ``node_id`` or raise BudgetExceeded.

        ``resize`` replaces the node's existing hold (e.g. lowered to the price actually charged);
        without it a node that already holds budget is refused with HoldExists, since it still bills.
        ``record`` is stored (``StateStore.put_node``) atomically with the hold.
        """
        if not usd_per_hour >= 0:
            raise ValueError(f"node {node_id}: price must be a non-negative $/h, got {usd_per_hour!r}")
        allowed, total, limit, previous, held_already = await self._reserve(
            keys=[self.state.budget_holds_key, self.state.budget_limit_key, self.state.nodes_key],
            args=[node_id, to_micro(usd_per_hour), 1 if resize else 0,
                  b"" if record is None else orjson.dumps(asdict(record))],
        )
        if held_already:
            raise HoldExists(f"node {node_id} already holds ${from_micro(int(previous)):.2f}/h of the budget")
        if not allowed:
            others = from_micro(int(total) - int(previous))  # what the rest of the fleet holds
            raise BudgetExceeded(node_id, usd_per_hour, others, None if int(limit) < 0 else from_micro(int(limit)))
        return Reservation(node_id, usd_per_hour, from_micro(int(total)), from_micro(int(limit)))

    async def release(self, node_id: str) -> float:
        """Give back the node's hold; returns what it was ($/h, 0 if it held nothing)."""
        key = self.state.budget_holds_key
        async with self.state.r.pipeline(transaction=True) as pipe:
            pipe.hget(key, node_id)
            pipe.hdel(key, node_id)
            raw, _ = await pipe.execute()
        return 0.0 if raw is None else from_micro(int(raw))

    async def holds(self) -> dict[str, float]:
        raw = await self.state.r.hgetall(self.state.budget_holds_key)
        return {k.decode(): from_micro(int(v)) for k, v in raw.items()}

    async def committed(self) -> float:
        """$/h held in total, summed in integer micro-dollars as the Lua script does."""
        raw = await self.state.r.hvals(self.state.budget_holds_key)
        return from_micro(sum(int(v) for v in raw))

    async def held(self, node_id: str) -> float | None:
        raw = await self.state.r.hget(self.state.budget_holds_key, node_id)
        return None if raw is None else from_micro(int(raw))
