"""What `closesync status` says of a whole fleet at a glance. Pure data and decisions, no I/O.

A sales floor has thousands of connections: a person reads the counts, the connections that need
someone (failing, needing re-authorization), the oldest last sync and how far the schedule lags,
not one row each. The rows themselves are `status --all` and `status --json`.

"On schedule" is the caller's to define, as `deadline(t)`: the time by which a connection whose
last sync was at `t` should have run again (the shell derives it from SYNC_CRON and the fan-out
spread). It must not decrease as `t` grows, which lets `summarize` find how many connections are
behind with a binary search instead of one cron computation per connection. A connection whose
webhooks are active is polled at SYNC_CRON_WITH_WEBHOOKS instead, so it is judged by
`webhook_deadline` when one is given (binary-searched apart, the same way).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from closesync.core.connection import ConnectionState


@dataclass(frozen=True)
class Glance:
    """What the summary needs of one connection."""

    id: str
    name: str | None
    # The state as `status` shows it: needs_reauth while its organization's grant is refused.
    state: str
    state_reason: str | None
    created_at: float
    # When its last run finished (or started, if it never finished); None: never run.
    last_run_at: float | None = None
    last_outcome: str | None = None
    last_error: str | None = None
    held: bool = False
    held_reason: str | None = None
    backfilling: bool = False
    # Its webhook subscription's state (`core.webhooks.Served.state`: active, disabled, pending,
    # refused or none), and when it last brought a verified delivery.
    webhook: str = "none"
    last_delivery_at: float | None = None

    @property
    def synced_at(self) -> float:
        """The time its schedule counts from: its last run, else when it was added."""
        return self.created_at if self.last_run_at is None else self.last_run_at


@dataclass(frozen=True)
class Listed:
    """A connection the summary names, and why."""

    id: str
    name: str | None
    why: str


@dataclass(frozen=True)
class FleetSummary:
    total: int
    # Every state, zero counts included, so the line always reads the same.
    states: dict[str, int]
    # Active connections by their last run's outcome; "never" = not run yet.
    outcomes: dict[str, int]
    # Active connections whose last run failed, with that run's error.
    failing: list[Listed] = field(default_factory=list)
    needs_reauth: list[Listed] = field(default_factory=list)
    # Connections holding deletions back (the mass-delete guard), with the guard's reason.
    held: list[Listed] = field(default_factory=list)
    backfilling: int = 0
    # The active connection whose last sync is the oldest (never run: counted from when it was
    # added); None when no connection is active.
    oldest: Glance | None = None
    # Active connections past their deadline, and how far past it the oldest is (seconds).
    behind: int = 0
    lag: float = 0.0
    # Connections (every state) by their webhook state; empty when none has a subscription.
    webhooks: dict[str, int] = field(default_factory=dict)


def summarize(
    glances: Iterable[Glance],
    *,
    now: float,
    deadline: Callable[[float], float],
    webhook_deadline: Callable[[float], float] | None = None,
) -> FleetSummary:
    """Counts, the connections needing someone, the oldest last sync and the schedule's lag."""
    states = {state.value: 0 for state in ConnectionState}
    outcomes: dict[str, int] = {}
    failing: list[Listed] = []
    needs_reauth: list[Listed] = []
    held: list[Listed] = []
    backfilling = 0
    active: list[Glance] = []
    total = 0
    webhooks: dict[str, int] = {}
    for glance in glances:
        total += 1
        webhooks[glance.webhook] = webhooks.get(glance.webhook, 0) + 1
        states[glance.state] = states.get(glance.state, 0) + 1
        if glance.held:
            held.append(Listed(glance.id, glance.name, glance.held_reason or "-"))
        backfilling += glance.backfilling
        if glance.state == ConnectionState.NEEDS_REAUTH.value:
            needs_reauth.append(Listed(glance.id, glance.name, glance.state_reason or "-"))
        if glance.state != ConnectionState.ACTIVE.value:
            continue
        active.append(glance)
        outcome = glance.last_outcome or "never"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "failed":
            failing.append(Listed(glance.id, glance.name, glance.last_error or "-"))
    if set(webhooks) == {"none"}:
        webhooks = {}
    if not active:
        return FleetSummary(
            total, states, outcomes, failing, needs_reauth, held, backfilling, webhooks=webhooks
        )
    active.sort(key=lambda g: (g.synced_at, g.id))
    oldest = active[0]
    behind, lag = 0, 0.0
    rare = webhook_deadline or deadline
    for group, due in (
        ([g for g in active if g.webhook != "active" or webhook_deadline is None], deadline),
        ([g for g in active if g.webhook == "active" and webhook_deadline is not None], rare),
    ):
        if group:
            behind += _count_behind([g.synced_at for g in group], now, due)
            lag = max(lag, now - due(group[0].synced_at))
    return FleetSummary(
        total,
        states,
        outcomes,
        failing,
        needs_reauth,
        held,
        backfilling,
        oldest,
        behind,
        lag,
        webhooks,
    )


def _count_behind(times: list[float], now: float, deadline: Callable[[float], float]) -> int:
    """How many of the sorted `times` have their deadline before `now` (a prefix of them, since
    `deadline` does not decrease): a binary search, O(log n) calls of `deadline`."""
    low, high = 0, len(times)
    while low < high:
        middle = (low + high) // 2
        if deadline(times[middle]) < now:
            low = middle + 1
        else:
            high = middle
    return low
