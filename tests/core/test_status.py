"""The fleet summary of `closesync status`: literal glances, literal summaries."""

from __future__ import annotations

import random

from closesync.core.status import Glance, Listed, summarize

NOW = 10_000.0


def glance(conn_id: str, state: str = "active", **fields: object) -> Glance:
    values: dict[str, object] = {
        "id": conn_id,
        "name": f"name of {conn_id}",
        "state": state,
        "state_reason": None,
        "created_at": 0.0,
        "last_run_at": NOW - 10,
        "last_outcome": "ok",
    }
    values.update(fields)
    return Glance(**values)  # type: ignore[arg-type]


def within_a_minute(t: float) -> float:
    return t + 60


def test_summarize_counts_states_and_outcomes_and_lists_who_needs_someone() -> None:
    """Every state counted (zeros too); failing, needs_reauth and held listed with why."""
    summary = summarize(
        [
            glance("c1"),
            glance("c2", last_outcome="failed", last_error="Close 503"),
            glance("c3", last_outcome="partial", held=True, held_reason="8 of 10"),
            glance("c4", "needs_reauth", state_reason="Close refused", last_outcome="failed"),
            glance("c5", "paused", backfilling=True),
        ],
        now=NOW,
        deadline=within_a_minute,
    )
    assert summary.total == 5
    assert summary.states == {"active": 3, "paused": 1, "needs_reauth": 1}
    assert summary.outcomes == {"ok": 1, "failed": 1, "partial": 1}
    assert summary.failing == [Listed("c2", "name of c2", "Close 503")]
    assert summary.needs_reauth == [Listed("c4", "name of c4", "Close refused")]
    assert summary.held == [Listed("c3", "name of c3", "8 of 10")]
    assert summary.backfilling == 1
    assert (summary.behind, summary.lag) == (0, 0.0)


def test_summarize_oldest_never_run_counts_from_when_it_was_added() -> None:
    """A never-run connection's schedule starts when it was added; paused ones are not counted."""
    summary = summarize(
        [
            glance("c1", last_run_at=NOW - 500),
            glance("c2", last_run_at=None, last_outcome=None, created_at=NOW - 900),
            glance("c3", "paused", last_run_at=NOW - 5000),
        ],
        now=NOW,
        deadline=within_a_minute,
    )
    assert summary.oldest is not None
    assert summary.oldest.id == "c2"
    assert summary.outcomes == {"ok": 1, "never": 1}
    assert summary.behind == 2
    assert summary.lag == 900 - 60


def test_summarize_no_active_connection_has_no_oldest_and_no_lag() -> None:
    """Only paused connections: nothing is on or behind schedule."""
    summary = summarize([glance("c1", "paused")], now=NOW, deadline=within_a_minute)
    assert (summary.oldest, summary.behind, summary.lag) == (None, 0, 0.0)


def test_summarize_behind_count_equals_counting_one_by_one() -> None:
    """The binary search over sorted last syncs counts what checking each connection counts."""
    rng = random.Random(7)
    for _ in range(50):
        times = [rng.uniform(NOW - 1000, NOW) for _ in range(rng.randint(1, 60))]
        glances = [glance(f"c{i}", last_run_at=t) for i, t in enumerate(times)]
        summary = summarize(glances, now=NOW, deadline=lambda t: t + 300)
        assert summary.behind == sum(t + 300 < NOW for t in times)
