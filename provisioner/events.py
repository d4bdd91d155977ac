"""Node events and their fan-out to in-process watchers.

Every event also goes to the Redis events stream (the audit log other processes read); this hub is the
low-latency path for the controller living in the same process as the provisioner.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from planner.state import NodeRecord

NodeEventKind = Literal["ready", "preempted", "terminated", "failed"]
NODE_EVENT_KINDS: tuple[str, ...] = ("ready", "preempted", "terminated", "failed")


@dataclass(frozen=True)
class NodeEvent:
    """A node changed state. ``timing`` holds the measured durations (seconds) the reason refers to."""

    kind: NodeEventKind
    node_id: str
    reason: str
    record: NodeRecord
    at: float = field(default_factory=time.time)  # wall clock when the change was seen
    timing: dict[str, float] = field(default_factory=dict)
    stream_id: str = ""  # id of the matching entry in the Redis events stream

    @property
    def lost(self) -> bool:
        """The node went away without being asked to: the controller must reschedule and replace."""
        return self.kind in ("preempted", "failed")


class EventSubscription:
    """One watcher's queue of node events; iterate with ``async for``. Subscribed from creation on."""

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[NodeEvent | None] = asyncio.Queue()

    def _push(self, event: NodeEvent | None) -> None:
        self._queue.put_nowait(event)

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> NodeEvent:
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def next(self, timeout_s: float) -> NodeEvent:
        """The next event, or TimeoutError after ``timeout_s``. ``asyncio.timeout``, not ``wait_for``: on Python
        3.11 ``wait_for`` drops a cancellation that lands as an event arrives, and the waiter (a controller's
        ``wait_ready`` being stopped) would go on waiting instead of ending."""
        async with asyncio.timeout(timeout_s):
            return await self.__anext__()

    def close(self) -> None:
        self._hub.unsubscribe(self)
        self._push(None)

    async def __aenter__(self) -> EventSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """Fan-out of node events to every open subscription (unbounded queues: events are rare)."""

    def __init__(self) -> None:
        self._subs: set[EventSubscription] = set()
        self.closed = False

    def subscribe(self) -> EventSubscription:
        sub = EventSubscription(self)
        if self.closed:
            sub._push(None)
        else:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: EventSubscription) -> None:
        self._subs.discard(sub)

    def publish(self, event: NodeEvent) -> None:
        for sub in list(self._subs):
            sub._push(event)

    def close(self) -> None:
        """End every subscription's iteration."""
        self.closed = True
        for sub in list(self._subs):
            sub._push(None)
        self._subs.clear()


def event_data(record: NodeRecord, timing: dict[str, float], **extra: Any) -> dict[str, Any]:
    """The ``data`` field of a node event in the Redis stream: what the node is, and the timings."""
    return {
        "node_id": record.id,
        "instance_type": record.instance_type,
        "gpu_type": record.gpu_type,
        "gpu_count": record.gpu_count,
        "spot": record.spot,
        "price_per_hour": record.price_per_hour,
        "cloud": record.cloud,
        "region": record.region,
        "provider_ref": record.provider_ref,
        **{k: round(v, 6) for k, v in timing.items()},
        **extra,
    }
