"""The engine against stale or doubtful state: reconnects to another Calendly user, team types a
listing misses, refusals that outlive their cause, interrupted backfills, skewed worker clocks.

Sandbox over loopback HTTP and a real Redis, as in test_engine.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from closesync.core.report import Outcome, RunMode
from closesync.sandbox import Sandbox, SandboxConfig
from tests.sync_harness import Harness

POSTS = "close POST /api/v1/scheduling_link/integration/"
DELETES = "close DELETE /api/v1/scheduling_link/integration/{source_id}/"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    sb = Sandbox.start(SandboxConfig(seed=7, users=3, event_types=8, freeze_clock=True))
    try:
        yield sb
    finally:
        sb.stop()


@pytest.fixture
def harness(sandbox: Sandbox, redis_url: str) -> Harness:
    return Harness.build(sandbox, redis_url, f"test-{uuid.uuid4().hex[:8]}")


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
