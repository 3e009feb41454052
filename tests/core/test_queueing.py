"""Who owes a connection its next sync, and when the next drain comes: literal cases."""

from __future__ import annotations

import pytest

from closesync.core.queueing import (
    DRAIN_AT_LEAST_SECONDS,
    DRAIN_EVERY_SECONDS,
    HOLDER,
    ask_publishes,
    holder_reruns,
    next_drain_in,
    queued_by,
    retry_takes_over,
    start_clears,
)


def test_ask_publishes_only_when_nobody_owes_the_sync() -> None:
    """No marker or a stale holder: publish; a queued task or a live holder: coalesce."""
    assert ask_publishes(None, run_lock_held=False) is True
    assert ask_publishes(queued_by("t1"), run_lock_held=False) is False
    assert ask_publishes(queued_by("t1"), run_lock_held=True) is False
    assert ask_publishes(HOLDER, run_lock_held=True) is False
    assert ask_publishes(HOLDER, run_lock_held=False) is True


def test_start_and_retry_and_holder_recognise_their_own_marker_only() -> None:
    """A task clears or keeps only a marker naming it; the holder reruns only for `holder`."""
    assert start_clears(queued_by("t1"), "t1") is True
    assert start_clears(queued_by("t2"), "t1") is False
    assert start_clears(HOLDER, "t1") is False
    assert retry_takes_over(None, "t1") is True
    assert retry_takes_over(HOLDER, "t1") is True
    assert retry_takes_over(queued_by("t1"), "t1") is True
    assert retry_takes_over(queued_by("t2"), "t1") is False
    assert holder_reruns(HOLDER) is True
    assert holder_reruns(queued_by("t1")) is False
    assert holder_reruns(None) is False


def test_next_drain_in_bounded_between_a_busy_loop_and_a_second() -> None:
    """The next drain comes when the earliest entry is due, within [0.05 s, 1 s]; none if empty."""
    assert next_drain_in(None, 100.0) is None
    assert next_drain_in(100.4, 100.0) == pytest.approx(0.4)
    assert next_drain_in(150.0, 100.0) == DRAIN_EVERY_SECONDS
    assert next_drain_in(90.0, 100.0) == DRAIN_AT_LEAST_SECONDS
