"""The sync engine against the sandbox over loopback HTTP and a real Redis."""

from __future__ import annotations

import uuid

import pytest

from closesync.core.connection import ConnectionState
from closesync.core.report import Outcome, RunMode
from closesync.core.retry import WaitBudget
from closesync.sandbox import Sandbox
from closesync.sync.parts import Deadline
from tests.sync_harness import Harness

UPSERT = "close POST /api/v1/scheduling_link/integration/"


def _types(harness: Harness, user_index: int = 0) -> list[str]:
    user = harness.sandbox.users[user_index]
    return [et.uuid for et in harness.calendly_types(user) if et.active]


def test_engine_first_run_creates_the_mapped_links(harness: Harness) -> None:
    """A first run makes Close hold exactly the mapping of the user's event types."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    report = harness.run(conn)
    assert report.outcome is Outcome.OK, report.errors
    assert report.created == len(harness.expected(user)) > 0
    assert harness.close_side(user) == harness.expected(user)


def test_engine_second_run_unchanged_makes_no_close_call(harness: Harness) -> None:
    """Nothing changed in Calendly: one listing call and zero Close calls."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.run(conn)
    harness.sandbox.world.reset_request_counts()
    report = harness.run(conn)
    assert report.outcome is Outcome.OK
    assert report.unchanged == len(harness.expected(user))
    assert harness.close_writes() == 0
    counts = harness.sandbox.world.request_counts()
    assert counts == {"calendly GET /event_types": 1}


def test_engine_listing_of_250_types_costs_three_calls(harness: Harness) -> None:
    """Unchanged runs cost one Calendly list call per 100 event types."""
    user = harness.sandbox.world.create_user()
    for i in range(250):
        harness.sandbox.world.create_event_type(user.calendly_user_uuid, name=f"Type {i:03}")
    conn = harness.add(user)
    first = harness.run(conn)
    assert first.created == 250
    harness.sandbox.world.reset_request_counts()
    harness.run(conn)
    assert harness.sandbox.world.request_counts() == {"calendly GET /event_types": 3}


def test_engine_rename_updates_only_that_link(harness: Harness) -> None:
    """A renamed event type is one update; the rest stay unchanged."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.run(conn)
    target = _types(harness)[0]
    harness.sandbox.world.update_event_type(target, name="Renamed call")
    report = harness.run(conn)
    assert (report.created, report.updated, report.deleted) == (0, 1, 0)
    assert harness.close_side(user) == harness.expected(user)


def test_engine_deleted_type_is_deleted_at_once(harness: Harness) -> None:
    """A deleted event type (direct fetch shows deleted_at) loses its link in the same run."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.run(conn)
    harness.sandbox.world.delete_event_type(_types(harness)[0])
    report = harness.run(conn)
    assert report.deleted == 1
    assert harness.close_side(user) == harness.expected(user)


def test_engine_purged_type_is_deleted_at_once(harness: Harness) -> None:
    """An event type whose direct fetch answers 404 loses its link in the same run."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.run(conn)
    harness.sandbox.world.delete_event_type(_types(harness)[0], purge=True)
    assert harness.run(conn).deleted == 1
    assert harness.close_side(user) == harness.expected(user)


def test_engine_deactivated_type_is_deleted(harness: Harness) -> None:
    """An event type listed as inactive is not synced, so its link goes."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.run(conn)
    harness.sandbox.world.update_event_type(_types(harness)[0], active=False)
    assert harness.run(conn).deleted == 1
    assert harness.close_side(user) == harness.expected(user)


def test_engine_listing_omitting_an_own_active_type_keeps_its_link(harness: Harness) -> None:
    """Listings that omit a type its fetch shows active and the user's keep the link, reported."""
    world = harness.sandbox.world
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.run(conn)
    target = _types(harness)[0]
    sid = f"{user.calendly_user_uuid}:{target}"
    world.add_fault(api="calendly", kind="omit", path_prefix="/event_types", omit=target, count=9)
    first = harness.run(conn)
    world.advance_clock(600)
    second = harness.run(conn)
    world.advance_clock(600)
    third = harness.run(conn)
    assert world.list_faults(), "the listing glitch should have lasted all three runs"
    assert (first.deleted, second.deleted, third.deleted) == (0, 0, 0)
    assert "a direct fetch shows it active and this user's" in third.kept[sid]
    assert harness.close_side(user) == harness.expected(user)
    stored = harness.services.state.last_report(conn)
    assert stored is not None
    assert stored.kept == third.kept


def test_engine_failing_page_deletes_nothing(harness: Harness) -> None:
    """A listing with a failed page is incomplete: the run fails and no link is deleted."""
    world = harness.sandbox.world
    user = world.create_user()
    for i in range(150):
        world.create_event_type(user.calendly_user_uuid, name=f"T{i:03}")
    conn = harness.add(user)
    harness.run(conn)
    for et in harness.calendly_types(user)[:3]:
        world.delete_event_type(et.uuid)
    world.add_fault(api="calendly", kind="502", path_prefix="/event_types", page=2, count=50)
    report = harness.engine(wait_budget=0).run(conn)
    assert report.outcome is Outcome.FAILED
    assert report.failure == "transient"
    assert "Calendly GET /event_types answered 502" in (report.error or "")
    assert len(harness.close_side(user)) == 150


def test_engine_mass_delete_is_held_then_allowed(harness: Harness) -> None:
    """Deleting most links is held and reported until --allow-mass-delete lets it through."""
    world = harness.sandbox.world
    user = world.create_user()
    uuids = [
        world.create_event_type(user.calendly_user_uuid, name=f"M{i}")["uri"].rsplit("/", 1)[-1]
        for i in range(10)
    ]
    conn = harness.add(user)
    harness.run(conn)
    for et_uuid in uuids[:8]:
        world.delete_event_type(et_uuid)
    held = harness.run(conn)
    assert held.outcome is Outcome.OK
    assert held.deleted == 0
    assert len(held.held_deletions) == 8
    assert "mass-delete" in (held.held_reason or "")
    stored = harness.services.state.held(conn)
    assert stored is not None
    assert len(stored.source_ids) == 8
    allowed = harness.run(conn, allow_mass_delete=True)
    assert allowed.deleted == 8
    assert harness.services.state.held(conn) is None
    assert harness.close_side(user) == harness.expected(user)


def test_engine_every_link_of_a_small_connection_is_held_then_allowed(harness: Harness) -> None:
    """A user with three links losing all three is held like a mass deletion until allowed."""
    world = harness.sandbox.world
    user = world.create_user()
    made = [world.create_event_type(user.calendly_user_uuid, name=f"S{i}") for i in range(3)]
    conn = harness.add(user)
    assert harness.run(conn).created == 3
    for event_type in made:
        world.delete_event_type(event_type["uri"].rsplit("/", 1)[-1])
    held = harness.run(conn)
    assert (held.outcome, held.deleted, len(held.held_deletions)) == (Outcome.OK, 0, 3)
    assert "would remove every link of this connection" in (held.held_reason or "")
    assert f"closesync sync --allow-mass-delete {conn}" in (held.held_reason or "")
    assert len(harness.close_side(user)) == 3
    allowed = harness.run(conn, allow_mass_delete=True)
    assert allowed.deleted == 3
    assert harness.close_side(user) == {}
    assert harness.services.state.held(conn) is None


def test_engine_refused_delete_is_recorded_and_the_other_deletes_go_on(harness: Harness) -> None:
    """A 400 on one DELETE is recorded against that link; the next deletion still happens."""
    world = harness.sandbox.world
    user = world.create_user()
    made = [world.create_event_type(user.calendly_user_uuid, name=f"D{i}") for i in range(3)]
    conn = harness.add(user)
    harness.run(conn)
    gone = sorted(f"{user.calendly_user_uuid}:{et['uri'].rsplit('/', 1)[-1]}" for et in made)[:2]
    for sid in gone:
        world.delete_event_type(sid.split(":")[1])
    world.add_fault(api="close", kind="400", method="DELETE", count=1)
    world.reset_request_counts()
    report = harness.run(conn)
    deletes = "close DELETE /api/v1/scheduling_link/integration/{source_id}/"
    assert world.request_counts()[deletes] == 2
    assert (report.outcome, report.deleted) == (Outcome.PARTIAL, 1)
    assert (
        "Close DELETE /scheduling_link/integration/{source_id}/ answered 400"
        in (report.failed[gone[0]])
    )
    assert set(harness.close_side(user)) == set(harness.expected(user)) | {gone[0]}
    assert gone[0] in harness.services.state.rejected_errors(conn)
    # Not asked again on the next sync: reported, no DELETE call.
    world.reset_request_counts()
    again = harness.run(conn)
    assert "Close refused to delete it before" in again.failed[gone[0]]
    assert deletes not in world.request_counts()
    # A backfill asks again; once Close accepts, the refusal is forgotten with the record.
    assert harness.backfill(conn).deleted == 1
    assert harness.close_side(user) == harness.expected(user)
    assert harness.services.state.rejected_errors(conn) == {}


def test_engine_rate_limit_stops_run_and_keeps_written_links(harness: Harness) -> None:
    """A 429 past the wait budget stops the run; what was written stays, nothing is rewritten."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    expected = harness.expected(user)
    harness.sandbox.world.add_fault(
        api="close", kind="429", method="POST", path_prefix="/api/v1/scheduling_link", reset=120
    )
    # Let the first two writes through by queueing the fault behind them is not possible; the
    # first write fails instead, so nothing is written in this run.
    failed = harness.engine(wait_budget=5).run(conn)
    assert failed.outcome is Outcome.FAILED
    assert failed.failure == "rate_limited"
    assert failed.retry_after == pytest.approx(120)
    assert "Close POST /scheduling_link/integration/ answered 429" in (failed.error or "")
    done = harness.run(conn)
    assert done.outcome is Outcome.OK
    assert done.created == len(expected)
    assert harness.close_side(user) == expected


def test_engine_transient_error_mid_run_resumes_without_rewrites(harness: Harness) -> None:
    """A run stopped by 503s after some writes resumes; every link is written exactly once."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    expected = harness.expected(user)
    world = harness.sandbox.world
    engine = harness.engine(wait_budget=0)
    # Fail the third write: the first two are accepted and recorded.
    world.add_fault(api="close", kind="503", method="POST", count=1, skip=2)
    first = engine.run(conn)
    assert first.outcome is Outcome.FAILED
    assert first.created == 2
    world.reset_request_counts()
    second = harness.run(conn)
    assert second.created == len(expected) - 2
    writes = world.request_counts()["close POST /api/v1/scheduling_link/integration/"]
    assert writes == len(expected) - 2
    assert harness.close_side(user) == expected


def test_engine_dry_run_writes_nothing(harness: Harness) -> None:
    """--dry-run plans the creates and writes nothing to Close or Redis."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    report = harness.run(conn, dry_run=True)
    assert report.created == len(harness.expected(user))
    assert all(line.startswith("create ") for line in report.planned)
    assert harness.close_side(user) == {}
    assert harness.services.state.records(conn) == {}
    assert harness.services.state.last_report(conn) is None


def test_engine_expired_close_token_is_refreshed_once(harness: Harness) -> None:
    """A 401 from Close refreshes the token once, stores the rotated grant and goes on."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.sandbox.world.expire_token(user.close_access_token)
    report = harness.run(conn)
    assert report.outcome is Outcome.OK, report.errors
    grants = harness.services.connections.grants(conn)
    assert grants.close.access_token.get_secret_value() != user.close_access_token
    assert grants.close.refresh_token is not None
    assert grants.close.refresh_token.get_secret_value() != user.close_refresh_token


def test_engine_revoked_refresh_token_needs_reauth(harness: Harness) -> None:
    """A refused refresh marks the connection needs_reauth; the others still sync."""
    user, other = harness.sandbox.users[0], harness.sandbox.users[1]
    conn, other_conn = harness.add(user), harness.add(other)
    harness.sandbox.world.revoke_token(user.close_refresh_token)
    harness.sandbox.world.expire_token(user.close_access_token)
    report = harness.run(conn)
    assert report.outcome is Outcome.FAILED
    assert report.failure == "auth"
    assert harness.services.connections.get(conn).state is ConnectionState.NEEDS_REAUTH
    assert harness.run(conn).outcome is Outcome.SKIPPED
    assert harness.run(other_conn).outcome is Outcome.OK


def test_engine_locked_connection_is_skipped_and_rerun_requested(harness: Harness) -> None:
    """A second run beside a running one does nothing and asks for one more run after it."""
    conn = harness.add(harness.sandbox.users[0])
    with harness.services.run_lock(conn, 30):
        report = harness.run(conn)
    assert report.outcome is Outcome.SKIPPED
    assert harness.services.state.pop_rerun(conn) is True


def test_engine_other_sources_are_never_touched(harness: Harness) -> None:
    """MANUAL and CALENDLY links of the user survive every sync and backfill untouched."""
    user = harness.sandbox.users[0]
    world = harness.sandbox.world
    manual = world.create_link(
        user.close_user_id, source="MANUAL", name="Mine", url="https://x.test/a"
    )
    native = world.create_link(
        user.close_user_id, source="CALENDLY", name="Native", url="https://x.test/b"
    )
    conn = harness.add(user)
    harness.run(conn)
    harness.backfill(conn)
    ids = {link["id"] for link in world.close_links(user.close_user_id)}
    assert {manual["id"], native["id"]} <= ids


def test_engine_backfill_heals_wiped_redis(harness: Harness) -> None:
    """After Redis lost the records, a backfill rebuilds them and leaves no duplicate."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.run(conn)
    harness.services.state.replace_records(conn, {})
    report = harness.backfill(conn)
    assert report.outcome is Outcome.OK
    assert harness.close_side(user) == harness.expected(user)
    assert set(harness.services.state.records(conn)) == set(harness.expected(user))
    harness.sandbox.world.reset_request_counts()
    assert harness.run(conn).unchanged == len(harness.expected(user))
    assert harness.close_writes() == 0


def test_engine_drift_repairs_links_changed_in_close(harness: Harness) -> None:
    """The drift check rewrites a link edited in Close and recreates one deleted there."""
    user = harness.sandbox.users[0]
    world = harness.sandbox.world
    conn = harness.add(user)
    harness.run(conn)
    ours = [
        link for link in world.close_links(user.close_user_id) if link["source"] == "THIRD_PARTY"
    ]
    world.update_link(ours[0]["id"], name="edited by hand")
    world.delete_link(ours[1]["id"])
    report = harness.engine().run(conn, mode=RunMode.DRIFT)
    assert (report.created, report.updated) == (1, 1)
    assert harness.close_side(user) == harness.expected(user)


def test_engine_drift_leaves_links_close_normalised_alone(harness: Harness) -> None:
    """A Close that trims, re-encodes and stores null as "" is not drift; a real edit still is."""
    world = harness.sandbox.world
    world.update_config(close_normalises=True)
    user = world.create_user()
    world.create_event_type(user.calendly_user_uuid, name="No description")
    world.create_event_type(user.calendly_user_uuid, name="Lines", description="One\nTwo")
    world.create_event_type(user.calendly_user_uuid, name="Caf\u00e9", slug="caf\u00e9-chat")
    conn = harness.add(user)
    assert harness.run(conn).created == 3
    stored = {link["name"]: link for link in world.close_links(user.close_user_id)}
    assert stored["No description"]["description"] == ""
    assert stored["Caf\u00e9"]["url"].endswith("/caf%C3%A9-chat")
    world.reset_request_counts()
    drift = harness.engine().run(conn, mode=RunMode.DRIFT)
    assert (drift.created, drift.updated, drift.unchanged) == (0, 0, 3), drift.planned
    assert "close POST /api/v1/scheduling_link/integration/" not in world.request_counts()
    assert harness.run(conn).unchanged == 3
    world.update_link(stored["Lines"]["id"], name="edited by hand")
    repaired = harness.engine().run(conn, mode=RunMode.DRIFT)
    assert (repaired.created, repaired.updated) == (0, 1)


def test_engine_interrupted_backfill_resumes_after_its_cursor(harness: Harness) -> None:
    """A backfill stopped after two pushes resumes without pushing those two again."""
    user = harness.sandbox.users[0]
    world = harness.sandbox.world
    conn = harness.add(user)
    harness.run(conn)
    total = len(harness.expected(user))
    world.add_fault(api="close", kind="503", method="POST", count=5, skip=2)
    stopped = harness.engine(wait_budget=0).run(conn, mode=RunMode.BACKFILL)
    assert stopped.outcome is Outcome.FAILED
    progress = harness.services.state.backfill_progress(conn)
    assert progress is not None
    assert (progress.done, progress.total) == (2, total)
    world.clear_faults()
    world.reset_request_counts()
    resumed = harness.backfill(conn)
    assert resumed.outcome is Outcome.OK
    assert world.request_counts()["close POST /api/v1/scheduling_link/integration/"] == total - 2
    assert harness.services.state.backfill_progress(conn) is None
    assert harness.close_side(user) == harness.expected(user)


def test_engine_removal_marked_mid_run_stops_before_next_write(harness: Harness) -> None:
    """A removal marked after the first write stops the run there; it leaves no report."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    assert len(harness.expected(user)) > 2

    def mark_after_first_write(done: int, total: int) -> None:
        if done == 1:
            harness.services.connections.mark_removing(conn)

    report = harness.engine().run(conn, progress=mark_after_first_write)
    assert (report.outcome, report.failure) == (Outcome.SKIPPED, "removed")
    assert len(harness.close_side(user)) == 1
    writes = harness.sandbox.world.request_counts()[
        "close POST /api/v1/scheduling_link/integration/"
    ]
    assert writes == 1
    assert harness.services.state.reports(conn) == []


def test_engine_marked_connection_skipped_writes_no_key(harness: Harness) -> None:
    """A run of a connection being removed calls no API and writes no key, lock held or not."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    services = harness.services
    services.connections.mark_removing(conn)
    before = sorted(services.redis.scan_iter(f"{services.keys.prefix}:*"))
    first = harness.run(conn)
    with services.run_lock(conn, 30):  # as `connections remove` holds it while it works
        second = harness.run(conn)
    for report in (first, second):
        assert (report.outcome, report.failure) == (Outcome.SKIPPED, "removed")
    assert harness.sandbox.world.request_counts() == {}
    assert sorted(services.redis.scan_iter(f"{services.keys.prefix}:*")) == before


def test_engine_run_past_its_deadline_stops_before_the_next_write_keeping_the_first(
    sandbox: Sandbox, redis_url: str
) -> None:
    """A hang holds the first write past the deadline: the run stops before the second write,
    the first link in Close and recorded, the report a deadline stop; the next run finishes."""
    # The hang lasts until the client's read timeout; its retry's wait moves the sandbox clock,
    # which is the deadline's clock here, so the deadline passes while that write is held.
    harness = Harness.build(
        sandbox, redis_url, f"test-{uuid.uuid4().hex[:8]}", http_read_timeout=1.0
    )
    user = sandbox.users[0]
    conn = harness.add(user)
    expected = harness.expected(user)
    assert len(expected) > 2
    sandbox.world.add_fault(api="close", kind="hang", method="POST", count=1)
    deadline = Deadline.after(0.25, "TASK_SOFT_TIME_LIMIT", clock=sandbox.world.now)
    report = harness.engine().run(conn, deadline=deadline)
    assert (report.outcome, report.failure) == (Outcome.FAILED, "deadline")
    assert report.error == (
        "run stopped at its deadline (TASK_SOFT_TIME_LIMIT, 0.25 s) before its next write; "
        "what it wrote is recorded"
    )
    assert report.created == 1
    assert sandbox.world.request_counts()[UPSERT] == 2  # the held write and its retry
    assert len(harness.close_side(user)) == 1
    assert set(harness.services.state.records(conn)) == set(harness.close_side(user))
    assert harness.services.state.last_report(conn) == report
    rest = harness.run(conn)
    assert (rest.outcome, rest.created) == (Outcome.OK, len(expected) - 1)
    assert harness.close_side(user) == expected


def test_engine_runs_share_one_keep_alive_session_per_api(harness: Harness) -> None:
    """Runs of two connections go out on the process's one session per API, over one kept-alive
    connection: no new connection (no TLS handshake on HTTPS) per run."""
    first, second = harness.sandbox.users[:2]
    a, b = harness.add(first), harness.add(second)
    services = harness.services
    assert harness.run(a).outcome is Outcome.OK
    assert harness.run(b).outcome is Outcome.OK
    one = services.clients_for(services.connections.get(a), WaitBudget(1))
    other = services.clients_for(services.connections.get(b), WaitBudget(1))
    assert one.calendly_http.session is other.calendly_http.session
    assert one.close_http.session is other.close_http.session
    assert one.calendly_http is not other.calendly_http  # budgets and counters stay per run
    manager = one.calendly_http.session.get_adapter(harness.sandbox.calendly_api_url).poolmanager
    pools = [manager.pools[key] for key in manager.pools.keys()]  # noqa: SIM118 - no __iter__
    assert [(p.num_connections, p.num_requests) for p in pools] == [(1, 2)]
