"""The sync marker and the tick schedule against real Redis: asks coalesce, turns are single."""

from __future__ import annotations

import pytest
import redis

from closesync.store.keys import Keys
from closesync.store.schedule import Schedule
from closesync.store.sync_state import SyncState

CONN = "conn_000000000001"


@pytest.fixture
def sync(redis_client: redis.Redis, keys: Keys) -> SyncState:
    return SyncState(redis_client, keys, queued_ttl=900)


@pytest.fixture
def schedule(redis_client: redis.Redis, keys: Keys) -> Schedule:
    return Schedule(redis_client, keys)


def test_ask_syncs_three_asks_while_queued_one_publishes(
    sync: SyncState, redis_client: redis.Redis, keys: Keys
) -> None:
    """Of three asks before the task starts only the first publishes; the marker names it and
    lives the TTL it was given (the visibility timeout)."""
    assert sync.ask_syncs({CONN: "t1"}) == [CONN]
    assert sync.ask_syncs({CONN: "t2"}) == []
    assert sync.ask_syncs({CONN: "t3", "conn_000000000002": "t4"}) == ["conn_000000000002"]
    assert redis_client.get(keys.queued(CONN)) == "queued:t1"
    assert 890 <= redis_client.ttl(keys.queued(CONN)) <= 900


def test_sync_started_then_asks_queue_exactly_one_more(sync: SyncState) -> None:
    """Once the queued task starts, asks during its run publish one task more, not three."""
    sync.ask_syncs({CONN: "t1"})
    sync.sync_started(CONN, "t1")
    published = [sync.ask_syncs({CONN: f"t{n}"}) for n in (2, 3, 4)]
    assert published == [[CONN], [], []]


def test_sync_started_by_another_task_leaves_the_marker_of_the_queued_one(
    sync: SyncState, redis_client: redis.Redis, keys: Keys
) -> None:
    """A redelivered copy of an earlier task, or a task sent without a marker, does not clear
    the marker of the task queued after it: a fourth ask is still coalesced."""
    sync.ask_syncs({CONN: "t2"})
    sync.sync_started(CONN, "t1")
    assert redis_client.get(keys.queued(CONN)) == "queued:t2"
    assert sync.ask_syncs({CONN: "t3"}) == []


def test_holder_marker_coalesces_while_the_lock_is_held_then_is_stale(
    sync: SyncState, redis_client: redis.Redis, keys: Keys
) -> None:
    """Asks coalesce into the holder's rerun while a run holds the lock; once no run does (an
    inline sync does not rerun, a holder may die), the next ask publishes."""
    redis_client.set(keys.run_lock(CONN), "token", px=60_000)
    sync.request_rerun(CONN)
    assert sync.ask_syncs({CONN: "t1"}) == []
    redis_client.delete(keys.run_lock(CONN))
    assert sync.ask_syncs({CONN: "t2"}) == [CONN]
    assert redis_client.get(keys.queued(CONN)) == "queued:t2"
    # The holder coming back to pop its rerun finds a task queued instead: no second run.
    assert sync.pop_rerun(CONN) is False


def test_request_rerun_with_a_task_queued_leaves_the_task_the_run(
    sync: SyncState, redis_client: redis.Redis, keys: Keys
) -> None:
    """A task that met the lock while another is queued asks nothing of the holder."""
    sync.ask_syncs({CONN: "t1"})
    sync.request_rerun(CONN)
    assert redis_client.get(keys.queued(CONN)) == "queued:t1"
    assert sync.pop_rerun(CONN) is False


def test_requeue_sync_takes_over_or_gives_way_to_a_queued_task(
    sync: SyncState, redis_client: redis.Redis, keys: Keys
) -> None:
    """A retry owes the sync when none is queued (or the holder's rerun was asked), and gives
    way to a task queued meanwhile."""
    assert sync.requeue_sync(CONN, "t1") is True
    assert sync.requeue_sync(CONN, "t1") is True
    assert sync.ask_syncs({CONN: "t2"}) == []
    sync.sync_started(CONN, "t1")
    redis_client.set(keys.queued(CONN), "holder")
    assert sync.requeue_sync(CONN, "t1") is True
    assert redis_client.get(keys.queued(CONN)) == "queued:t1"
    sync.sync_started(CONN, "t1")
    sync.ask_syncs({CONN: "t3"})
    assert sync.requeue_sync(CONN, "t1") is False
    assert redis_client.get(keys.queued(CONN)) == "queued:t3"


def test_withdraw_sync_lets_the_next_ask_publish(sync: SyncState) -> None:
    """A task that could not be published gives its marker back."""
    sync.ask_syncs({CONN: "t1"})
    sync.withdraw_sync(CONN, "t1")
    assert sync.ask_syncs({CONN: "t2"}) == [CONN]


def test_ask_syncs_for_a_removed_connection_publishes_nothing_leaves_no_key(
    sync: SyncState, redis_client: redis.Redis, keys: Keys
) -> None:
    """A connection being removed is asked nothing, and gets no marker back."""
    redis_client.set(keys.removed(CONN), '{"at": 1}')
    assert sync.ask_syncs({CONN: "t1"}) == []
    assert not redis_client.exists(keys.queued(CONN))


def test_schedule_add_keeps_the_earlier_due_time_and_drains_in_order(
    schedule: Schedule,
) -> None:
    """A run still waiting from the last tick keeps its earlier time; due() is earliest first."""
    schedule.add("sync", {"c1": 10.0, "c2": 20.0})
    schedule.add("sync", {"c1": 15.0, "c2": 5.0, "c3": 30.0})
    assert schedule.due("sync", 12.0, limit=10) == ["c2", "c1"]
    assert schedule.due("sync", 100.0, limit=2) == ["c2", "c1"]
    schedule.remove("sync", ["c2", "c1"])
    assert schedule.next_due("sync") == 30.0
    assert schedule.size("drift") == 0
    assert schedule.next_due("drift") is None


def test_schedule_drain_turn_one_chain_at_a_time(schedule: Schedule) -> None:
    """One drain has the turn; only it can end it, and then hand it to the next."""
    assert schedule.pass_drain("sync", "d1", ttl_seconds=30) is True
    assert schedule.pass_drain("sync", "d2", ttl_seconds=30) is False
    schedule.take_drain("sync", "d2")
    assert schedule.pass_drain("sync", "d3", ttl_seconds=30) is False
    schedule.take_drain("sync", "d1")
    assert schedule.pass_drain("sync", "d3", ttl_seconds=30) is True


def test_sync_started_marker_changed_after_the_read_is_judged_again(
    sync: SyncState, redis_client: redis.Redis, keys: Keys
) -> None:
    """A marker replaced between the read and the delete is not deleted: the new value is read
    and judged again, as an aborted WATCH transaction would retry."""
    key = keys.queued(CONN)
    redis_client.set(key, "queued:t1")
    seen: list[str | None] = []

    def clears(marker: str | None) -> bool:
        seen.append(marker)
        if len(seen) == 1:
            # Another worker's write lands after the read, before the delete.
            redis_client.set(key, "queued:t2")
        return marker == "queued:t1"

    assert sync._clear_if(CONN, clears) is False
    assert seen == ["queued:t1", "queued:t2"]
    assert redis_client.get(key) == "queued:t2"
