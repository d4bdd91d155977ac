"""A random preemption process: spot reclaims at exponential intervals, reproducible from a seed.

Spot reclaims look like a Poisson process to a tenant; with a mean time between preemptions and a seed,
a test or ``tsctl chaos`` gets the same sequence of (delay, victim) choices every run.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Protocol

from provisioner.base import ProvisionError

log = logging.getLogger(__name__)


class Preemptible(Protocol):
    def preemptible(self, spot_only: bool = False) -> list[str]: ...

    async def preempt(self, node_id: str, reason: str = ...) -> float: ...


@dataclass(frozen=True)
class Preemption:
    at: float  # time.monotonic() of the kill
    node_id: str


class RandomPreemptor:
    """Preempts a random ready node after exponential waits of mean ``mean_s`` until stopped."""

    def __init__(
        self, provisioner: Preemptible, mean_s: float, seed: int = 0, spot_only: bool = True,
        max_preemptions: int | None = None,
    ) -> None:
        if not mean_s > 0:
            raise ValueError(f"mean time between preemptions must be > 0 s, got {mean_s}")
        self.provisioner = provisioner
        self.mean_s = mean_s
        self.seed = seed
        self.spot_only = spot_only
        self.max_preemptions = max_preemptions
        self.history: list[Preemption] = []
        self._rng = random.Random(seed)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="random-preemptor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def wait(self) -> None:
        """Until ``max_preemptions`` have happened (only meaningful when it is set)."""
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while self.max_preemptions is None or len(self.history) < self.max_preemptions:
            await asyncio.sleep(self._rng.expovariate(1.0 / self.mean_s))
            candidates = self.provisioner.preemptible(spot_only=self.spot_only)
            if not candidates:
                continue
            victim = self._rng.choice(candidates)
            reason = f"random preemption #{len(self.history) + 1} (mean {self.mean_s:g}s, seed {self.seed})"
            try:
                at = await self.provisioner.preempt(victim, reason=reason)
            except ProvisionError as e:  # the node ended between the choice and the kill
                log.info("random preemption of %s skipped: %s", victim, e)
                continue
            self.history.append(Preemption(at if at else time.monotonic(), victim))

    async def __aenter__(self) -> RandomPreemptor:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
