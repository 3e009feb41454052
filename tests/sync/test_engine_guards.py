"""The engine against stale or doubtful state: reconnects to another Calendly user, team types a
listing misses, refusals that outlive their cause, interrupted backfills, skewed worker clocks.

Sandbox over loopback HTTP and a real Redis, as in test_engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from closesync.core.connection import Connection, Grants
from closesync.core.report import Outcome, RunMode, RunReport
from closesync.sandbox.connections import sandbox_connection
from closesync.sandbox.links import LinkBook
from closesync.sandbox.records import SeededUser
from tests.sync_harness import Harness

POSTS = "close POST /api/v1/scheduling_link/integration/"
DELETES = "close DELETE /api/v1/scheduling_link/integration/{source_id}/"


def test_backfill_interrupted_twice_does_not_push_the_first_attempts_links_again(
    harness: Harness,
) -> None:
    """A resume stopped before its first push keeps the cursor: the third attempt pushes 4 of 10."""
    world = harness.sandbox.world
    user = world.create_user()
    for i in range(10):
        world.create_event_type(user.calendly_user_uuid, name=f"B{i}")
    conn = harness.add(user)
    harness.run(conn)
    world.add_fault(api="close", kind="502", method="POST", skip=6, count=50)
    first = harness.engine(wait_budget=0).run(conn, mode=RunMode.BACKFILL)
    assert first.outcome is Outcome.FAILED
    world.clear_faults()
    world.add_fault(api="close", kind="502", method="POST", count=50)
    second = harness.engine(wait_budget=0).run(conn, mode=RunMode.BACKFILL)
    assert second.outcome is Outcome.FAILED
    progress = harness.services.state.backfill_progress(conn)
    assert progress is not None
    assert progress.cursor is not None
    world.clear_faults()
    world.reset_request_counts()
    third = harness.backfill(conn)
    assert third.outcome is Outcome.OK
    assert world.request_counts().get(POSTS) == 4
    assert harness.close_side(user) == harness.expected(user)


def test_refused_delete_of_a_link_that_came_back_is_asked_again_next_time(
    harness: Harness,
) -> None:
    """Refused DELETE, type reactivated unchanged, deactivated again: the DELETE is sent again."""
    world = harness.sandbox.world
    user = world.create_user()
    made = [world.create_event_type(user.calendly_user_uuid, name=f"R{i}") for i in range(3)]
    conn = harness.add(user)
    harness.run(conn)
    target = made[0]["uri"].rsplit("/", 1)[-1]
    sid = f"{user.calendly_user_uuid}:{target}"
    world.update_event_type(target, active=False)
    world.add_fault(api="close", kind="400", method="DELETE", count=1)
    refused = harness.run(conn)
    assert sid in refused.failed
    world.update_event_type(target, active=True)
    back = harness.run(conn)
    assert back.outcome is Outcome.OK
    assert back.unchanged == 3
    assert harness.services.state.rejected(conn) == {}
    world.update_event_type(target, active=False)
    world.reset_request_counts()
    again = harness.run(conn)
    assert again.outcome is Outcome.OK, again.failed
    assert world.request_counts().get(DELETES) == 1
    assert sid not in harness.close_side(user)


def _team_type(harness: Harness) -> tuple[str, str]:
    """A round-robin type made by users[1] with users[0] as member; (its uuid, users[0]'s sid)."""
    world = harness.sandbox.world
    user, other = harness.sandbox.users[0], harness.sandbox.users[1]
    team = world.create_event_type(
        other.calendly_user_uuid,
        name="Team intro",
        kind="group",
        pooling_type="round_robin",
        members=[user.calendly_user_uuid],
    )
    team_uuid = team["uri"].rsplit("/", 1)[-1]
    return team_uuid, f"{user.calendly_user_uuid}:{team_uuid}"


def test_listings_omitting_a_team_type_the_user_still_hosts_keep_its_link(
    harness: Harness,
) -> None:
    """Listings 600 s apart omitting a team type still hosted keep its link, reported why."""
    world = harness.sandbox.world
    user = harness.sandbox.users[0]
    team_uuid, sid = _team_type(harness)
    conn = harness.add(user)
    harness.run(conn)
    assert sid in harness.close_side(user)
    world.add_fault(
        api="calendly", kind="omit", path_prefix="/event_types", omit=team_uuid, count=9
    )
    first = harness.run(conn)
    world.advance_clock(600)
    second = harness.run(conn)
    world.advance_clock(600)
    third = harness.run(conn)
    assert (first.deleted, second.deleted, third.deleted) == (0, 0, 0)
    assert "team event type" in third.kept[sid]
    assert sid in harness.expected(user)
    assert harness.close_side(user) == harness.expected(user)


def test_left_team_type_link_stays_while_the_type_exists_and_goes_when_deactivated(
    harness: Harness,
) -> None:
    """A team type the user left keeps its link (nothing proves they left) until it is inactive."""
    world = harness.sandbox.world
    user = harness.sandbox.users[0]
    team_uuid, sid = _team_type(harness)
    conn = harness.add(user)
    harness.run(conn)
    world.change_members(team_uuid, add=[], remove=[user.calendly_user_uuid])
    for _ in range(3):
        assert harness.run(conn).deleted == 0
        world.advance_clock(900)
    assert sid in harness.close_side(user)
    world.update_event_type(team_uuid, active=False)
    gone = harness.run(conn)
    assert gone.deleted == 1
    assert harness.close_side(user) == harness.expected(user)


def _move(harness: Harness, conn_id: str, to: SeededUser) -> None:
    """Reconnect `conn_id` (same Close user) to the Calendly user of `to`, as `add` would."""
    services = harness.services
    existing = services.connections.get(conn_id)
    close = services.connections.grants(conn_id).close
    moved = existing.model_copy(
        update={"calendly_user_uri": to.calendly_user_uri, "calendly_email": to.email}
    )
    _, theirs = sandbox_connection(to, time.time())
    services.connections.save(moved, Grants(close=close, calendly=theirs.calendly))


def _pair(harness: Harness, close_of: SeededUser, calendly_of: SeededUser) -> str:
    """A new connection of `close_of`'s Close user with `calendly_of`'s Calendly user."""
    base, close = sandbox_connection(close_of, time.time())
    _, calendly = sandbox_connection(calendly_of, time.time())
    connection = Connection(
        **{
            **base.model_dump(),
            "calendly_user_uri": calendly_of.calendly_user_uri,
            "calendly_email": calendly_of.email,
        }
    )
    harness.services.connections.save(
        connection, Grants(close=close.close, calendly=calendly.calendly)
    )
    return connection.id


def _deleted(*reports: RunReport) -> list[str]:
    return [line.split()[1] for r in reports for line in r.planned if line.startswith("delete ")]


def test_reconnect_to_another_calendly_user_never_deletes_the_previous_users_source_ids(
    harness: Harness,
) -> None:
    """C0 moves from Calendly U0 to U1, C1 connects U0: C0's runs delete no `U0:*` link."""
    world = harness.sandbox.world
    u0, u1 = harness.sandbox.users[0], harness.sandbox.users[1]
    conn_1 = harness.add(u0)
    assert harness.run(conn_1).outcome is Outcome.OK
    made = set(harness.close_side(u0))
    assert made
    _move(harness, conn_1, u1)
    assert harness.services.state.records(conn_1) == {}
    conn_2 = _pair(harness, u1, u0)
    assert harness.run(conn_2).outcome is Outcome.OK
    first = harness.run(conn_1)
    world.advance_clock(601)
    second = harness.run(conn_1)
    assert (first.outcome, second.outcome) == (Outcome.OK, Outcome.OK)
    assert not [sid for sid in _deleted(first, second) if sid.startswith(u0.calendly_user_uuid)]
    # C0 keeps the links made for U0 (no longer its connection's) beside U1's new ones.
    assert made <= set(harness.close_side(u0))


def test_reconnect_with_source_ids_scoped_per_application_leaves_the_new_owners_links(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With source_id unique per app only, the moved connection leaves U0's new connection alone."""

    def per_app(self: LinkBook, client_id: str, user_id: str, source_id: str) -> Any:
        return next(
            (
                link
                for link in self.links.values()
                if (link.oauth_client_id, link.source_id) == (client_id, source_id)
                and link.source == "THIRD_PARTY"
            ),
            None,
        )

    monkeypatch.setattr(LinkBook, "_integration_link", per_app)
    world = harness.sandbox.world
    u0, u1 = harness.sandbox.users[0], harness.sandbox.users[1]
    conn_1 = harness.add(u0)
    harness.run(conn_1)
    _move(harness, conn_1, u1)
    conn_2 = _pair(harness, u1, u0)
    harness.run(conn_2)

    def u0_links() -> list[str]:
        return sorted(
            link["source_id"]
            for link in world.close_links()
            if link["source"] == "THIRD_PARTY"
            and link["source_id"].startswith(u0.calendly_user_uuid)
        )

    before = u0_links()
    assert before
    harness.run(conn_1)
    world.advance_clock(601)
    harness.run(conn_1)
    assert u0_links() == before


def test_record_of_another_calendly_user_is_forgotten_never_deleted(harness: Harness) -> None:
    """A record whose source_id names another Calendly user is dropped; its link is not deleted."""
    u0, u1 = harness.sandbox.users[0], harness.sandbox.users[1]
    conn_1 = harness.add(u0)
    harness.run(conn_1)
    records = harness.services.state.records(conn_1)
    _move(harness, conn_1, u1)
    # As a run of the old pairing still going during the reconnect would have left them.
    for sid, record in records.items():
        harness.services.state.record_write(conn_1, sid, record)
    harness.sandbox.world.reset_request_counts()
    report = harness.run(conn_1)
    assert report.outcome is Outcome.OK
    assert harness.sandbox.world.request_counts().get(DELETES, 0) == 0
    assert set(records) <= set(report.kept)
    assert set(harness.services.state.records(conn_1)) == set(harness.expected(u1))
    assert set(records) <= set(harness.close_side(u0))


def test_run_reads_the_connection_again_once_it_holds_the_lock(harness: Harness) -> None:
    """A reconnect while a run waits for its lock: the run syncs the new Calendly user."""
    u0, u1 = harness.sandbox.users[0], harness.sandbox.users[1]
    conn_1 = harness.add(u0)
    engine = harness.engine()
    real_lock = engine.run_lock

    @contextmanager
    def lock_after_a_reconnect(connection_id: str, ttl: int) -> Iterator[Any]:
        _move(harness, conn_1, u1)
        with real_lock(connection_id, ttl) as lock:
            yield lock

    engine.run_lock = lock_after_a_reconnect
    report = engine.run(conn_1)
    assert report.outcome is Outcome.OK, report.errors
    assert set(harness.services.state.records(conn_1)) == set(harness.expected(u1))
    # Close user C0's links are U1's only: none was made for U0 with U1's token.
    assert set(harness.close_side(u0)) == set(harness.expected(u1))


def test_misses_are_timed_by_redis_not_by_the_workers_own_clock(harness: Harness) -> None:
    """A worker whose clock is 15 min slow times a listing's miss by Redis, as every worker does."""
    world = harness.sandbox.world
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.run(conn)
    target = next(et.uuid for et in harness.calendly_types(user) if et.active)
    sid = f"{user.calendly_user_uuid}:{target}"
    world.add_fault(api="calendly", kind="omit", path_prefix="/event_types", omit=target, count=9)
    services = harness.services
    slow = services.engine(wait_budget=5, sleep=harness.sleep, clock=lambda: time.time() - 900)
    assert slow.run(conn).outcome is Outcome.OK
    seconds, micros = services.redis.time()
    since = services.state.records(conn)[sid].missing_since
    assert since is not None
    assert abs(seconds + micros / 1e6 - since) < 60


def test_fetch_answered_by_a_proxys_html_404_keeps_the_link(harness: Harness) -> None:
    """A listing misses a type and its fetch gets an HTML 404 (not Calendly's): kept, not gone."""
    world = harness.sandbox.world
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.run(conn)
    target = next(et.uuid for et in harness.calendly_types(user) if et.active)
    sid = f"{user.calendly_user_uuid}:{target}"
    world.add_fault(api="calendly", kind="omit", path_prefix="/event_types", omit=target)
    world.add_fault(
        api="calendly", kind="404", path_prefix=f"/event_types/{target}", json_body=False
    )
    report = harness.run(conn)
    assert report.deleted == 0
    assert "direct fetch failed" in report.kept[sid]
    assert sid in harness.close_side(user)
