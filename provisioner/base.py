"""The provisioner interface the controller calls: acquire, release, list, watch; and what they share.

A provisioner turns a ``NodeRequest`` (one node: an instance type, or a GPU type and count, spot or not,
candidate offers, a price cap) into a running node agent, and reports what happens to the node:
``ready``, ``preempted``, ``terminated``, ``failed``. Every node has a ``NodeRecord`` in Redis
(``StateStore``) and every change goes to the events stream with its reason and timing, so a restarted
controller (or ``tsctl status``) sees the same truth as the process that made the change.

Money first: ``acquire`` reserves the node's worst-case price in the budget ledger before anything is
started and refuses with ``BudgetExceeded`` (a clear reason) if the budget cannot take it; the hold is
given back only when the instance stops billing.

Spot first: a request for spot is served on-demand instead once spot for that GPU type has failed
``SpotFallbackPolicy.max_spot_failures`` times recently (no capacity, or preempted), if the
on-demand price fits the budget.
"""

from __future__ import annotations

import asyncio
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

from planner.plan import Instance
from planner.state import NodeRecord, StateStore
from provisioner.budget import BudgetExceeded, BudgetLedger, HoldExists
from provisioner.events import EventHub, EventSubscription, NodeEvent, NodeEventKind, event_data
from provisioner.fallback import SpotFallbackPolicy

NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
LIVE_STATUSES = ("pending", "ready")


class ProvisionError(Exception):
    """A request cannot be served (bad request, unknown node, nothing feasible); the message says why."""


@dataclass(frozen=True)
class Offer:
    """One place a node could come from: a catalog row and its price for the whole instance."""

    cloud: str
    instance_type: str
    gpu_type: str
    gpu_count: int
    spot: bool
    price_per_hour: float
    region: str = ""


@dataclass(frozen=True)
class NodeRequest:
    """What the controller asks for, one node at a time.

    Give an ``instance_type`` (the plan's choice), or a ``gpu_type`` + ``gpu_count``; ``offers`` are the
    candidate (cloud, instance type) rows the provider may choose from (SkyPilot ``any_of``);
    ``max_price_per_hour`` caps the price of whatever is chosen.
    """

    node_id: str
    gpu_type: str = ""
    gpu_count: int = 1
    spot: bool = True
    instance_type: str = ""
    offers: tuple[Offer, ...] = ()
    max_price_per_hour: float | None = None
    region: str = ""
    cloud: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ProvisionError naming the field at fault."""
        if not NODE_ID_RE.match(self.node_id or ""):
            raise ProvisionError(
                f"NodeRequest.node_id: {self.node_id!r} must be 1-63 letters, digits, '-', '_' or '.'"
            )
        if not self.instance_type and not self.gpu_type and not self.offers:
            raise ProvisionError(f"node {self.node_id}: NodeRequest needs instance_type, gpu_type or offers")
        if self.gpu_count < 1:
            raise ProvisionError(f"node {self.node_id}: NodeRequest.gpu_count must be >= 1, got {self.gpu_count}")
        if self.max_price_per_hour is not None and not self.max_price_per_hour > 0:
            raise ProvisionError(
                f"node {self.node_id}: NodeRequest.max_price_per_hour must be > 0, got {self.max_price_per_hour}"
            )
        for i, o in enumerate(self.offers):
            if not o.price_per_hour >= 0:
                raise ProvisionError(f"node {self.node_id}: NodeRequest.offers[{i}].price_per_hour is negative")

    @classmethod
    def from_instance(cls, inst: Instance, offers: tuple[Offer, ...] = ()) -> NodeRequest:
        """The request for one ``Plan.instances`` entry: that type, that market, at most that price."""
        if not offers and inst.cloud:
            offers = (
                Offer(inst.cloud, inst.instance_type, inst.gpu_type, inst.gpu_count, inst.spot,
                      inst.price_per_hour, inst.region),
            )
        return cls(
            node_id=inst.id, gpu_type=inst.gpu_type, gpu_count=inst.gpu_count, spot=inst.spot,
            instance_type=inst.instance_type, offers=offers, region=inst.region, cloud=inst.cloud,
        )


def next_generation_id(node_id: str) -> str:
    """Id for the replacement of ``node_id``: ``n0`` -> ``n0-r1`` -> ``n0-r2``."""
    m = re.match(r"^(.*)-r(\d+)$", node_id)
    return f"{m.group(1)}-r{int(m.group(2)) + 1}" if m else f"{node_id}-r1"


class Provisioner(ABC):
    """Common machinery: records, budget holds, events. Subclasses start and stop the machines."""

    #: prefix of ``NodeRecord.provider_ref`` for nodes this kind of provisioner owns
    ref_prefix: str = ""

    def __init__(self, state: StateStore, ledger: BudgetLedger, fallback: SpotFallbackPolicy | None = None) -> None:
        self.state = state
        self.ledger = ledger
        self.fallback = fallback or SpotFallbackPolicy()
        self._hub = EventHub()
        self._requested_at: dict[str, float] = {}  # node id -> time.monotonic() of the request
        self._requests: dict[str, NodeRequest] = {}

    # -- the interface ----------------------------------------------------------------------------
    @abstractmethod
    async def start(self) -> None:
        """Start watching; adopt nodes a previous instance left in Redis (restartable controller)."""

    @abstractmethod
    async def acquire(self, request: NodeRequest) -> NodeRecord:
        """Reserve budget, record the node as pending, start getting it; returns at once.

        The outcome comes as a ``ready`` or ``failed`` event (``watch``/``wait_ready``). Raises
        ``BudgetExceeded`` if the budget cannot take the node, ``ProvisionError`` if the request
        cannot be served at all.
        """

    @abstractmethod
    async def release(self, node_id: str, reason: str = "released") -> NodeRecord:
        """Stop the node, give back its budget hold, record it as terminated."""

    @abstractmethod
    async def close(self, release_nodes: bool = True) -> None:
        """Stop watching; with ``release_nodes``, release every node (``tsctl down``)."""

    def watch(self) -> EventSubscription:
        """Node events from now on, as an async iterator (subscribed when this returns)."""
        return self._hub.subscribe()

    async def nodes(self) -> list[NodeRecord]:
        """Records of the nodes this kind of provisioner owns, live or not, oldest first."""
        found = [n for n in (await self.state.nodes()).values() if n.provider_ref.startswith(self.ref_prefix)]
        return sorted(found, key=lambda n: (n.created_at, n.id))

    async def live_nodes(self) -> list[NodeRecord]:
        return [n for n in await self.nodes() if n.status in LIVE_STATUSES]

    async def wait_ready(self, node_id: str, timeout_s: float = 120.0) -> NodeRecord:
        """Block until the node is ready; ProvisionError if it fails or ends first, TimeoutError on time."""
        async with self.watch() as events:
            deadline = time.monotonic() + timeout_s
            rec = await self.state.get_node(node_id)
            while True:
                if rec is None:
                    raise ProvisionError(f"unknown node {node_id}")
                if rec.status == "ready":
                    return rec
                if rec.status not in LIVE_STATUSES:
                    why = await self._last_reason(node_id, rec.status)
                    raise ProvisionError(f"node {node_id} is {rec.status}, not ready" + (f": {why}" if why else ""))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"node {node_id} not ready after {timeout_s:.0f}s")
                try:
                    ev = await events.next(left)
                except TimeoutError:
                    continue
                if ev.node_id == node_id:
                    if ev.kind != "ready":
                        raise ProvisionError(f"node {node_id} {ev.kind}: {ev.reason}")
                    return ev.record
                rec = await self.state.get_node(node_id)

    async def replace(self, node_id: str, new_node_id: str | None = None) -> NodeRecord:
        """Ask for a node shaped like ``node_id`` (same GPUs, spot first) under a new id."""
        old = await self.state.get_node(node_id)
        if old is None:
            raise ProvisionError(f"unknown node {node_id}")
        base = self._requests.get(node_id) or NodeRequest(
            node_id=node_id, gpu_type=old.gpu_type, gpu_count=old.gpu_count, spot=old.spot,
            instance_type=old.instance_type,
        )
        request = replace(base, node_id=new_node_id or next_generation_id(node_id), spot=base.spot or old.spot)
        return await self.acquire(request)

    # -- shared helpers for subclasses -------------------------------------------------------------
    def _choose_market(self, request: NodeRequest) -> tuple[bool, str]:
        """Spot or on-demand for this request, and why."""
        if not request.spot:
            return False, "on-demand requested"
        gpu = request.gpu_type or request.instance_type
        if self.fallback.use_on_demand(gpu):
            return False, f"on-demand fallback: {self.fallback.reason(gpu)}"
        return True, "spot requested"

    async def _check_new_id(self, node_id: str) -> None:
        existing = await self.state.get_node(node_id)
        if existing is not None and existing.status in LIVE_STATUSES:
            raise ProvisionError(f"node {node_id} already exists and is {existing.status}")

    async def _reserve(self, record: NodeRecord, amount: float, why: str) -> None:
        """Hold ``amount`` $/h and store the pending record in one step, or raise BudgetExceeded."""
        try:
            res = await self.ledger.reserve(record.id, amount, record=record)
        except HoldExists as e:
            raise ProvisionError(f"{e}: release it (or wait for it to stop) before asking again") from e
        except BudgetExceeded as e:
            await self.state.emit(
                "node.refused", str(e), **event_data(record, {}, requested=amount, committed=e.committed,
                                                      budget=e.limit, market=why),
            )
            raise
        self._requested_at[record.id] = time.monotonic()
        await self.state.emit(
            "node.requested", why,
            **event_data(record, {}, held=amount, committed=res.committed, budget=res.limit),
        )

    def _timing(self, node_id: str, **extra: float) -> dict[str, float]:
        t = dict(extra)
        started = self._requested_at.get(node_id)
        if started is not None:
            t["elapsed_s"] = time.monotonic() - started
        return t

    async def _transition(
        self,
        node_id: str,
        kind: NodeEventKind,
        reason: str,
        *,
        release_budget: bool,
        timing: dict[str, float] | None = None,
        detected_at: float | None = None,
        **changes: Any,
    ) -> NodeEvent:
        """Record the new status, give back the hold if billing stopped, log and publish the event.

        The hold is released before the event is published, so a controller that reacts to a loss by
        asking for a replacement finds the budget already freed. ``detected_at`` (wall clock) is when the
        change was seen; the event's ``at`` carries it, so reaction times can be measured from it.
        """
        at = time.time() if detected_at is None else detected_at
        try:
            rec = await self.state.update_node(node_id, status=kind, **changes)
        except KeyError:  # the record was wiped under us (tsctl down): still free the budget and tell watchers
            rec = NodeRecord(id=node_id, instance_type="", gpu_type="", gpu_count=0, spot=False, price_per_hour=0.0,
                             status=kind)
        freed = await self.ledger.release(node_id) if release_budget else 0.0
        timing = self._timing(node_id, **(timing or {}))
        stream_id = await self.state.emit(
            f"node.{kind}", reason,
            **event_data(rec, timing, budget_released=release_budget, freed=freed, detected_at=at),
        )
        event = NodeEvent(kind=kind, node_id=node_id, reason=reason, record=rec, at=at, timing=timing,
                          stream_id=stream_id)
        self._hub.publish(event)
        return event

    async def _last_reason(self, node_id: str, status: str) -> str:
        """Why the node reached ``status``, from its latest ``node.<status>`` event (empty if none is recent)."""
        for event in reversed(await self.state.recent_events(500)):
            if event.kind == f"node.{status}" and event.data.get("node_id") == node_id:
                return event.reason
        return ""

    def _close_hub(self) -> None:
        self._hub.close()


async def cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel background tasks and wait until they have really finished."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        try:
            await t
        except (asyncio.CancelledError, Exception):  # a cancelled watcher's error is moot
            pass
