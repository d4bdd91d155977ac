"""Stop strings, matched by the gateway on the whole answer.

Matching here rather than on the worker means a stop string that straddles a migration (its first
half from the dead worker, its second from the new one) is still found. Text that could be the start
of a stop string is held back until it is known not to be, so the client never sees a stop string.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.matched: str | None = None

    def feed(self, delta: str) -> str:
        """Text safe to send now. After a match, ``matched`` is set and nothing more is released."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return delta
        self.pending += delta
        hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            at, stop = min(hits)
            self.matched = stop
            out, self.pending = self.pending[:at], ""
            return out
        keep = self._partial_suffix()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest tail of ``pending`` that begins some stop string (must be held back)."""
        text = self.pending
        for k in range(min(self.hold, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
