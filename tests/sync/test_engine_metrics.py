"""A run is counted in the metrics however it ends, an interrupted one included."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from closesync.core.report import Outcome
from tests.sync_harness import Harness


def counter(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


class Interrupted(Exception):
    """Stands in for a soft time limit or a bug: no closesync error, so the engine raises it."""


def test_run_interrupted_by_a_non_closesync_error_is_counted_failed_with_its_links(
    harness: Harness,
) -> None:
    """A run stopped by an error the engine does not catch still counts: one failed run, its
    duration, and the link it created before the interruption."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    assert len(harness.expected(user)) > 1
    failed = counter("closesync_runs_total", mode="sync", outcome="failed")
    durations = counter("closesync_run_duration_seconds_count", mode="sync")
    created = counter("closesync_links_total", action="created")

    def interrupt_after_first_write(done: int, total: int) -> None:
        if done == 1:
            raise Interrupted("soft time limit")

    with pytest.raises(Interrupted):
        harness.engine().run(conn, progress=interrupt_after_first_write)
    stored = harness.services.state.last_report(conn)
    assert stored is not None
    assert stored.outcome is Outcome.FAILED
    assert counter("closesync_runs_total", mode="sync", outcome="failed") == failed + 1
    assert counter("closesync_run_duration_seconds_count", mode="sync") == durations + 1
    assert counter("closesync_links_total", action="created") == created + stored.created
    assert stored.created == 1
