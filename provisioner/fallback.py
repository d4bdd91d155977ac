"""When to stop asking for spot: after N spot failures (no capacity, or preempted) of a GPU type.

Spot is tried first because it costs a third to a half of on-demand; but a spot market that keeps
failing (launch refused for lack of capacity, node preempted again and again) is worth leaving for
on-demand while the failures are recent. Failures age out after ``window_s``, so spot is tried again
later.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable


class SpotFallbackPolicy:
    """Counts recent spot failures per GPU type; says when to fall back to on-demand."""

    def __init__(
        self, max_spot_failures: int = 2, window_s: float = 3600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_spot_failures < 1:
            raise ValueError("max_spot_failures must be at least 1")
        self.max_spot_failures = max_spot_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, gpu_type: str) -> deque[float]:
        q = self._failures[gpu_type]
        horizon = self._clock() - self.window_s
        while q and q[0] < horizon:
            q.popleft()
        return q

    def record_spot_failure(self, gpu_type: str) -> int:
        """Note one failure (refused launch or preemption); returns the recent count."""
        q = self._recent(gpu_type)
        q.append(self._clock())
        return len(q)

    def spot_failures(self, gpu_type: str) -> int:
        return len(self._recent(gpu_type))

    def use_on_demand(self, gpu_type: str) -> bool:
        return self.spot_failures(gpu_type) >= self.max_spot_failures

    def reason(self, gpu_type: str) -> str:
        n = self.spot_failures(gpu_type)
        return f"{n} spot failures of {gpu_type} in the last {self.window_s:.0f}s (limit {self.max_spot_failures})"
