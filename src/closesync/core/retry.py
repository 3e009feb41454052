"""Retry arithmetic: how long to wait before trying again. Pure functions, no I/O, no clock.

The HTTP layer (inline runs) and the Celery tasks (scheduled runs) both ask this module how long
to wait; neither decides on its own. The rule everywhere: never retry sooner than the API asked,
add jitter so that many workers that failed together do not come back together, and cap the
exponential growth so a long outage does not push a connection's next attempt out for hours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Random = Callable[[], float]
"""A source of floats in [0, 1); `random.random` in production, a constant in tests."""

# Transient errors: first wait 1 s, doubling, never more than 60 s between two attempts.
TRANSIENT_BASE_SECONDS = 1.0
TRANSIENT_CAP_SECONDS = 60.0
# Jitter added on top of a rate-limit wait: at most this fraction of the wait, and at most 2 s.
RATE_LIMIT_JITTER_FRACTION = 0.1
RATE_LIMIT_JITTER_CAP_SECONDS = 2.0


def transient_delay(
    attempt: int,
    rand: Random,
    *,
    base: float = TRANSIENT_BASE_SECONDS,
    cap: float = TRANSIENT_CAP_SECONDS,
) -> float:
    """Seconds to wait before retry number `attempt` (0-based) after a transient error.

    "Equal jitter": half of the capped exponential step is always waited, the other half is drawn,
    so the delay grows with the attempt but two workers rarely retry in the same instant.
    """
    step: float = min(cap, base * (2.0 ** max(0, attempt)))
    return step / 2 + (step / 2) * rand()


def rate_limit_delay(wait_seconds: float, rand: Random) -> float:
    """Seconds to wait after a 429 that asked for `wait_seconds`: never less, plus jitter."""
    wait = max(0.0, wait_seconds)
    jitter_room = min(RATE_LIMIT_JITTER_CAP_SECONDS, wait * RATE_LIMIT_JITTER_FRACTION)
    return wait + jitter_room * rand()


@dataclass
class WaitBudget:
    """The total time one connection's run may spend waiting inline before it gives up.

    decisions.md: an inline run rides out rate limits and transient errors within a bounded total
    wait per connection (default 60 s); past it, the error is reported as that connection's failure
    (or, in a Celery task, handed to Celery's own retry, which does not hold a worker slot).
    """

    total_seconds: float
    spent_seconds: float = 0.0

    def allows(self, seconds: float) -> bool:
        """Whether waiting `seconds` more stays within the budget."""
        return self.spent_seconds + seconds <= self.total_seconds

    def spend(self, seconds: float) -> None:
        """Record `seconds` waited."""
        self.spent_seconds += seconds
