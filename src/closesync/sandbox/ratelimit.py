"""Fixed-window request counters and the two vendors' rate-limit header formats.

Windows are aligned to the sandbox clock (window start = floor(now / window) * window), so a
test exhausts a bucket and then advances the clock instead of sleeping. A request checks all
its buckets first and spends from all of them only when every one has room, so a refused
request costs nothing. Holds no lock: the World calls it under its one lock.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RateVerdict:
    """The outcome for the tightest bucket; `reset` is seconds until its window ends."""

    allowed: bool
    limit: int
    remaining: int
    reset: float


class FixedWindowLimiter:
    """Counts requests per key per window."""

    def __init__(self) -> None:
        self._used: dict[Hashable, tuple[float, int]] = {}

    def hit(
        self, buckets: Sequence[tuple[Hashable, int]], window: float, now: float
    ) -> RateVerdict:
        """Spend one request from each (key, limit) bucket if all have room."""
        start = math.floor(now / window) * window
        reset = max(start + window - now, 0.0)
        states = []
        for key, limit in buckets:
            window_start, used = self._used.get(key, (start, 0))
            if window_start != start:
                used = 0
            states.append((key, limit, used))
        allowed = all(used < limit for _, limit, used in states)
        if allowed:
            for key, _, used in states:
                self._used[key] = (start, used + 1)
            states = [(key, limit, used + 1) for key, limit, used in states]
        _, limit, used = min(states, key=lambda state: state[1] - state[2])
        return RateVerdict(allowed, limit, max(limit - used, 0), reset)

    def reset(self) -> None:
        """Forget every count."""
        self._used.clear()


def format_seconds(seconds: float) -> str:
    """Seconds as Close writes them: `0.25`, `5`, never `5.000`."""
    text = f"{max(seconds, 0.0):.3f}".rstrip("0").rstrip(".")
    return text or "0"


def retry_after(seconds: float) -> int:
    """Whole seconds for Retry-After / X-RateLimit-Reset: rounded up, at least 1."""
    return max(1, math.ceil(seconds - 1e-9))


def close_header(verdict: RateVerdict) -> str:
    """Close's `RateLimit` header value."""
    return (
        f"limit={verdict.limit}, remaining={verdict.remaining}, "
        f"reset={format_seconds(verdict.reset)}"
    )


def calendly_headers(verdict: RateVerdict) -> dict[str, str]:
    """Calendly's `X-RateLimit-*` headers; Reset is whole seconds until the window ends."""
    return {
        "X-RateLimit-Limit": str(verdict.limit),
        "X-RateLimit-Remaining": str(verdict.remaining),
        "X-RateLimit-Reset": str(max(0, math.ceil(verdict.reset - 1e-9))),
    }
