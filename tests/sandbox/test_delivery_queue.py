"""The delivery lanes with literal times: FIFO per lane, a busy lane's backlog never in the
way of another lane, a retry back at the head of its lane, the earliest-due head first."""

from __future__ import annotations

from closesync.sandbox.delivery_queue import LaneQueue


def test_take_gives_each_lanes_head_in_due_order_and_waits_for_the_earliest() -> None:
    """Heads leave earliest due first; before any is due, take says how long to wait."""
    queue: LaneQueue[str] = LaneQueue()
    queue.push("b", 2.0, "b1")
    queue.push("a", 1.0, "a1")
    assert queue.take(0.5) == (None, 0.5)
    assert queue.take(2.0) == (("a", "a1"), None)
    assert queue.take(2.0) == (("b", "b1"), None)
    assert queue.take(2.0) == (None, None)
    assert (len(queue), queue.in_flight()) == (0, 2)


def test_a_busy_lane_holds_its_backlog_and_lets_other_lanes_through() -> None:
    """While lane a is in flight, a thousand of its deliveries wait and b's leaves at once."""
    queue: LaneQueue[str] = LaneQueue()
    for n in range(1000):
        queue.push("a", 0.0, f"a{n}")
    assert queue.take(0.0) == (("a", "a0"), None)
    queue.push("b", 0.0, "b0")
    assert queue.take(0.0) == (("b", "b0"), None)
    assert queue.take(0.0) == (None, None)
    queue.done("a")
    assert queue.take(0.0) == (("a", "a1"), None)
    assert len(queue) == 998


def test_a_retry_goes_back_to_the_head_of_its_lane() -> None:
    """A failed item returned with its retry time leaves before the items queued behind it,
    and not before that time."""
    queue: LaneQueue[str] = LaneQueue()
    queue.push("a", 0.0, "first")
    queue.push("a", 0.0, "second")
    assert queue.take(0.0) == (("a", "first"), None)
    queue.done("a", retry_at=5.0, item="first")
    assert queue.take(1.0) == (None, 4.0)
    assert queue.take(5.0) == (("a", "first"), None)
    queue.done("a")
    assert queue.take(5.0) == (("a", "second"), None)
    queue.done("a")
    assert queue.empty()
