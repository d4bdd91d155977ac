"""The life cycle every provisioner that runs real nodes shares, local process groups and cloud clusters alike.

``Provisioner`` (``base.py``) keeps records, budget holds and events; ``ManagedProvisioner`` adds what a
provisioner needs once it starts machines of its own: one entry per node it manages (``NodeState``), a
watch task, an HTTP session for agent health checks, adoption of nodes a previous instance left running,
and one way to start, admit a request, hold the budget for the first market that fits, claim a node's
release, and close. Subclasses say how a node is started, stopped and watched.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, Self, TypeVar

import aiohttp

from planner.state import NodeRecord, StateStore
from provisioner.base import LIVE_STATUSES, NodeRequest, Provisioner, ProvisionError, cancel_and_wait
from provisioner.budget import BudgetExceeded, BudgetLedger
from provisioner.fallback import SpotFallbackPolicy


@dataclass(kw_only=True)
class NodeState:
    """Where a managed node is in its life, beyond its Redis record: the flags that decide who ends it."""

    ready_at: float | None = None  # time.monotonic() when it turned ready
    heartbeat_seen: bool = False
    stopping: bool = False  # release() owns the end of this node
    finished: bool = False  # someone has claimed the node's final transition
    done: asyncio.Event = field(default_factory=asyncio.Event)  # set once that transition is recorded
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


N = TypeVar("N", bound=NodeState)
C = TypeVar("C")


class ManagedProvisioner(Provisioner, Generic[N]):
    """A provisioner that starts, watches and stops nodes itself (subclasses: local, SkyPilot)."""

    #: what ``close`` says of nodes whose release failed
    close_failure = "node(s) did not stop cleanly"
    #: how long ``close`` waits for losses being recorded right now (None: as long as they take)
    settle_timeout_s: float | None = 30.0

    def __init__(self, state: StateStore, ledger: BudgetLedger, fallback: SpotFallbackPolicy | None = None) -> None:
        super().__init__(state, ledger, fallback)
        self._nodes: dict[str, N] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._stopping = asyncio.Event()  # set by close: watch loops end between rounds

    # -- what subclasses say ---------------------------------------------------------------------------
    async def _prepare(self) -> None:
        """Anything ``start`` needs before adopting nodes (an SDK, a folder)."""

    @abstractmethod
    async def _adopt(self) -> None:
        """Take over the live nodes a previous provisioner of this kind left in Redis."""

    @abstractmethod
    async def _watch_loop(self) -> None:
        """Watch the nodes for losses until ``_pause`` says the provisioner is stopping."""

    # -- life cycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._prepare()
        if self._session is None:
            self._session = aiohttp.ClientSession()
        await self._adopt()
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch_loop(), name=f"{type(self).__name__}-watch")

    async def close(self, release_nodes: bool = True) -> None:
        """Release every node (or, with ``release_nodes=False``, leave them running for a successor)."""
        if self._closed:
            return
        self._closed = True
        await self._stop_watch(self._watcher)
        self._watcher = None
        errors: list[BaseException] = []
        if release_nodes:
            live = [n for n, node in self._nodes.items() if not node.finished]
            results = await asyncio.gather(*(self.release(n, "provisioner shut down") for n in live),
                                           return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
        ending = [n.done.wait() for n in self._nodes.values() if n.finished and not n.done.is_set()]
        if ending:  # losses being recorded right now: let them finish, their budget holds depend on it
            await asyncio.wait_for(asyncio.gather(*ending), self.settle_timeout_s)
        await cancel_and_wait([t for n in self._nodes.values() for t in n.tasks])
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._close_hub()
        if errors:
            raise ProvisionError(f"{len(errors)} {self.close_failure}: {errors[0]}")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- watching -------------------------------------------------------------------------------------
    async def _pause(self, seconds: float) -> bool:
        """Sleep between watch rounds; False once the provisioner is stopping (end the loop)."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return True
        return False

    async def _stop_watch(self, task: asyncio.Task[None] | None, grace_s: float = 30.0) -> None:
        """End a watch loop between rounds, so no loss is left half-recorded; cancel it if it hangs."""
        self._stopping.set()
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), grace_s)
        except TimeoutError:
            await cancel_and_wait([task])

    # -- the steps acquire and release share ------------------------------------------------------------
    async def _admit(self, request: NodeRequest) -> None:
        """Refuse a request this provisioner cannot take now: closed, malformed, or a node id in use."""
        if self._closed:
            raise ProvisionError("provisioner is closed")
        request.validate()
        await self._check_new_id(request.node_id)
        node = self._nodes.get(request.node_id)
        if node is not None and not node.done.is_set():
            raise ProvisionError(f"node {request.node_id} is still being stopped")

    async def _reserve_first(self, options: Iterable[tuple[C, NodeRecord, float, str]]) -> tuple[C, NodeRecord]:
        """Hold the budget for the first option it can take, in order (spot before on-demand, cheaper types
        after); each option is (choice, pending record, $/h to hold, why). The last refusal if none fits."""
        refusal: BudgetExceeded | None = None
        for choice, record, amount, why in options:
            try:
                await self._reserve(record, amount, why)
            except BudgetExceeded as e:
                refusal = e
                continue
            return choice, record
        if refusal is None:
            raise ProvisionError("no market to ask for")
        raise refusal

    async def _claim_release(self, node_id: str, kind: str) -> N | NodeRecord:
        """The start of every ``release``: the node's record when there is nothing left to stop (its end is
        under way or over), else the node, marked stopping and its other tasks cancelled, for the caller
        to stop. ProvisionError for a node that is not ours or not managed here."""
        node = self._nodes.get(node_id)
        if node is None:
            rec = await self.state.get_node(node_id)
            if rec is None or not rec.provider_ref.startswith(self.ref_prefix):
                raise ProvisionError(f"unknown {kind} node {node_id}")
            if rec.status in LIVE_STATUSES:
                raise ProvisionError(f"node {node_id} is {rec.status} but not managed here: call start() first")
            return rec
        if node.finished or node.stopping:  # its end is under way: after it
            await node.done.wait()
            rec = await self.state.get_node(node_id)
            assert rec is not None
            return rec
        node.stopping = True
        current = asyncio.current_task()
        await cancel_and_wait([t for t in node.tasks if t is not current and not t.done()])
        return node
