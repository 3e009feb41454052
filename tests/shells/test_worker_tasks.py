"""Task policy: which reports are retried and when; the tick fan-out claims each slot once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from pydantic import SecretStr

from closesync.core.connection import Connection, ConnectionState, Grant, Grants
from closesync.core.report import Outcome, RunMode, RunReport
from closesync.settings import Settings
from closesync.store.keys import Keys
from closesync.store.secretbox import generate_key
from closesync.wiring.services import Services
from closesync.worker.celery_app import create_app
from closesync.worker.tasks import (
    MAX_TRANSIENT_RETRIES,
    backfill,
    close_services,
    drain,
    fan_out,
    retry_verdict,
    sync_connection,
    use_services,
)
from tests._broker import queued
from tests._sandbox import running_sandbox
from tests.sync_harness import Harness


def report(
    outcome: Outcome, failure: str | None = None, retry_after: float | None = None
) -> RunReport:
    return RunReport(
        connection_id="conn_000000000001",
        started_at=0.0,
        outcome=outcome,
        failure=failure,
        retry_after=retry_after,
    )


def half() -> float:
    return 0.5


def test_verdict_ok_partial_skipped_not_retried() -> None:
    """Finished or skipped runs are never retried."""
    for outcome in (Outcome.OK, Outcome.PARTIAL, Outcome.SKIPPED):
        assert retry_verdict(report(outcome), 0, half).retry is False


def test_verdict_rate_limited_waits_what_api_asked_plus_jitter() -> None:
    """A 429 asking for 30 s comes back after 30 s plus half the 2 s jitter room."""
    decision = retry_verdict(report(Outcome.FAILED, "rate_limited", 30.0), 3, half)
    assert decision.retry is True
    assert decision.countdown == 31.0


def test_verdict_transient_backs_off_exponentially_with_jitter() -> None:
    """Transient retry 3: step 8 s, half fixed, half drawn: 6 s with rand 0.5."""
    decision = retry_verdict(report(Outcome.FAILED, "transient"), 3, half)
    assert decision == decision.__class__(True, 6.0, "transient error")


def test_verdict_transient_after_max_retries_gives_up() -> None:
    """Past the cap the task gives up; the next tick tries again."""
    assert (
        retry_verdict(report(Outcome.FAILED, "transient"), MAX_TRANSIENT_RETRIES, half).retry
        is False
    )


def test_verdict_auth_forbidden_rejected_locked_not_retried() -> None:
    """Errors a retry cannot fix are recorded, not retried."""
    for failure in ("auth", "forbidden", "rejected", "locked", "error"):
        assert retry_verdict(report(Outcome.FAILED, failure), 0, half).retry is False


def test_task_transient_failures_retry_up_to_the_module_cap_not_celerys(
    redis_url: str, keys: Keys
) -> None:
    """Run eagerly against real Redis, a failing task retries MAX_TRANSIENT_RETRIES times, then
    reports failed: Celery's own default of 3 retries does not end it first."""
    with running_sandbox() as sandbox:
        harness = Harness.build(sandbox, redis_url, keys.prefix, task_inline_wait_seconds=0)
        conn = harness.add(sandbox.users[0])
        sandbox.world.add_fault(api="close", kind="503", method="POST", count=1000)
        use_services(harness.services)
        try:
            result = sync_connection.apply(args=[conn, None])
        finally:
            use_services(None)
        assert result.get() == "failed"
        reports = harness.services.state.reports(conn)
        assert len(reports) == MAX_TRANSIENT_RETRIES + 1
        assert {r.failure for r in reports} == {"transient"}
        # Each retry held the sync marker while queued and cleared it as it started: none is
        # left behind to swallow the next ask.
        assert not harness.services.redis.exists(keys.queued(conn))


def test_task_sync_queued_meanwhile_replaces_the_retry(redis_url: str, keys: Keys) -> None:
    """A sync failing transiently is not retried when another sync of it is queued already:
    that one runs it, so the connection has one task owed, not two."""
    with running_sandbox() as sandbox:
        harness = Harness.build(sandbox, redis_url, keys.prefix, task_inline_wait_seconds=0)
        conn = harness.add(sandbox.users[0])
        sandbox.world.add_fault(api="close", kind="503", method="POST", count=1000)
        assert harness.services.state.ask_syncs({conn: "queued-meanwhile"}) == [conn]
        use_services(harness.services)
        try:
            result = sync_connection.apply(args=[conn, None], task_id="running-one")
        finally:
            use_services(None)
        assert result.get() == "failed"
        assert len(harness.services.state.reports(conn)) == 1
        assert harness.services.redis.get(keys.queued(conn)) == "queued:queued-meanwhile"


SLOT = "2026-03-04T10:05:00+00:00"
# Epoch seconds the fan-outs below run at: the schedule's due times are offsets from it.
T0 = 1_772_618_700.0


def services_on(client: redis.Redis, keys: Keys, **overrides: Any) -> Services:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        redis_prefix=keys.prefix,
        close_api_url="http://127.0.0.1:1/api/v1",
        close_oauth_url="http://127.0.0.1:1/oauth2",
        calendly_api_url="http://127.0.0.1:2",
        calendly_auth_url="http://127.0.0.1:2",
        closesync_encryption_keys=generate_key(),
        **overrides,
    )
    return Services.build(settings, redis_client=client)


@pytest.fixture
def broker(redis_url: str) -> Iterator[Callable[[Services], Celery]]:
    """A real Celery app publishing to the test Redis, for given services; closed at the end."""
    apps: list[Celery] = []

    def make(services: Services) -> Celery:
        apps.append(create_app(services.settings, broker_url=redis_url))
        return apps[-1]

    yield make
    for app in apps:
        app.close()


def add(services: Services, conn_id: str, state: ConnectionState) -> None:
    grant = Grant(access_token=SecretStr("x"))
    connection = Connection(
        id=conn_id,
        state=state,
        close_user_id=f"user_{conn_id}",
        calendly_user_uri=f"https://api.calendly.com/users/{conn_id}",
        created_at=1.0,
        updated_at=1.0,
    )
    services.connections.save(connection, Grants(close=grant, calendly=grant))


def seed_fleet(client: redis.Redis, keys: Keys, active: int, paused: int) -> set[str]:
    """Connection records straight into the store (no grants: a fan-out reads none); active ids."""
    ids = {}
    for n in range(active + paused):
        state = ConnectionState.ACTIVE if n < active else ConnectionState.PAUSED
        ids[f"conn_{n:012x}"] = state
    with client.pipeline(transaction=False) as pipe:
        for conn_id, state in ids.items():
            record = Connection(
                id=conn_id,
                state=state,
                close_user_id=f"user_{conn_id}",
                calendly_user_uri=f"https://api.calendly.com/users/{conn_id}",
                created_at=1.0,
                updated_at=1.0,
            )
            pipe.set(keys.conn(conn_id), record.model_dump_json())
            pipe.sadd(keys.connections(), conn_id)
        pipe.execute()
    return {conn_id for conn_id, state in ids.items() if state is ConnectionState.ACTIVE}


def test_fan_out_active_connections_scheduled_at_hashed_offsets_not_published_yet(
    redis_client: redis.Redis, keys: Keys, broker: Callable[[Services], Celery]
) -> None:
    """Each active connection is scheduled at its offset within half the 5-minute interval;
    nothing is due yet, so no run is published: only the next drain, a second away."""
    services = services_on(redis_client, keys)
    add(services, "conn_000000000001", ConnectionState.ACTIVE)
    add(services, "conn_abcdefabcdef", ConnectionState.ACTIVE)
    add(services, "conn_00000000000p", ConnectionState.PAUSED)
    count = fan_out(
        services, broker(services), tick="sync", slot=SLOT, cron="*/5 * * * *", clock=lambda: T0
    )
    assert count == 2
    assert redis_client.zrange(keys.schedule("sync"), 0, -1, withscores=True) == [
        ("conn_000000000001", pytest.approx(T0 + 39.104)),
        ("conn_abcdefabcdef", pytest.approx(T0 + 103.748)),
    ]
    assert queued(redis_client, keys.prefix, "sync") == []
    drains = queued(redis_client, keys.prefix, "fanout")
    assert [(d.task, d.args) for d in drains] == [("closesync.drain_schedule", ["sync", SLOT])]
    assert drains[0].headers["eta"] is not None


def test_drain_publishes_runs_as_they_fall_due_once_each_without_eta(
    redis_client: redis.Redis, keys: Keys, broker: Callable[[Services], Celery]
) -> None:
    """A drain publishes the due runs, each once with no ETA and its marker set, and keeps the
    later ones for the next drain; while a drain task has the turn, no second chain starts."""
    services = services_on(redis_client, keys)
    add(services, "conn_000000000001", ConnectionState.ACTIVE)
    add(services, "conn_abcdefabcdef", ConnectionState.ACTIVE)
    app = broker(services)
    fan_out(services, app, tick="sync", slot=SLOT, cron="*/5 * * * *", clock=lambda: T0)

    assert drain(services, app, kind="sync", slot=SLOT, clock=lambda: T0 + 60) == 1
    assert drain(services, app, kind="sync", slot=SLOT, clock=lambda: T0 + 60) == 0
    assert drain(services, app, kind="sync", slot=SLOT, clock=lambda: T0 + 200) == 1
    runs = queued(redis_client, keys.prefix, "sync")
    assert [(r.task, r.args) for r in runs] == [
        ("closesync.sync_connection", ["conn_000000000001", SLOT]),
        ("closesync.sync_connection", ["conn_abcdefabcdef", SLOT]),
    ]
    assert [r.headers["eta"] for r in runs] == [None, None]
    for run in runs:
        assert redis_client.get(keys.queued(run.args[0])) == f"queued:{run.task_id}"
    assert services.schedule.size("sync") == 0
    # The fan-out's own hand-over is the one drain task: these drains did not start another.
    assert len(queued(redis_client, keys.prefix, "fanout")) == 1


def test_fan_out_next_tick_while_runs_still_queued_publishes_nothing_more(
    redis_client: redis.Redis, keys: Keys, broker: Callable[[Services], Celery]
) -> None:
    """Workers that fell behind a tick find no second message per connection on the next one."""
    services = services_on(redis_client, keys, sync_spread_fraction=0.0)
    add(services, "conn_000000000001", ConnectionState.ACTIVE)
    add(services, "conn_abcdefabcdef", ConnectionState.ACTIVE)
    app = broker(services)
    for slot in (SLOT, "2026-03-04T10:10:00+00:00", "2026-03-04T10:15:00+00:00"):
        assert fan_out(services, app, tick="sync", slot=slot, cron="*/5 * * * *") == 2
    assert [r.args[1] for r in queued(redis_client, keys.prefix, "sync")] == [SLOT, SLOT]
    assert services.schedule.size("sync") == 0


def test_fan_out_same_slot_delivered_twice_schedules_once(
    redis_client: redis.Redis, keys: Keys, broker: Callable[[Services], Celery]
) -> None:
    """A redelivered tick finds its slot claimed and schedules nothing."""
    services = services_on(redis_client, keys)
    add(services, "conn_000000000001", ConnectionState.ACTIVE)
    app = broker(services)
    args: dict[str, Any] = {"tick": "sync", "slot": SLOT, "cron": "*/5 * * * *"}
    assert fan_out(services, app, **args) == 1
    redis_client.delete(keys.schedule("sync"))
    assert fan_out(services, app, **args) == 0
    assert services.schedule.size("sync") == 0
    ttl = redis_client.ttl(keys.tick("sync", SLOT))
    assert 590 <= ttl <= 600


def test_fan_out_ten_thousand_connections_one_message_each_without_countdown(
    redis_client: redis.Redis, keys: Keys, broker: Callable[[Services], Celery]
) -> None:
    """10,000 active connections (and paused ones) fanned out at once publish exactly one run
    per active connection, none with an ETA or countdown (benchmarks/fanout.py times it)."""
    active = seed_fleet(redis_client, keys, active=10_000, paused=50)
    services = services_on(redis_client, keys, sync_spread_fraction=0.0)
    assert fan_out(services, broker(services), tick="sync", slot=SLOT, cron="*/5 * * * *") == 10_000
    runs = queued(redis_client, keys.prefix, "sync")
    assert len(runs) == 10_000
    assert {r.args[0] for r in runs} == active
    assert {r.headers["eta"] for r in runs} == {None}
    assert not any("countdown" in r.headers for r in runs)
    assert services.schedule.size("sync") == 0


def test_enqueue_tick_two_enqueuers_same_tick_one_message_on_the_fanout_queue(
    redis_client: redis.Redis, keys: Keys, broker: Callable[[Services], Celery]
) -> None:
    """Two leaders (or a scheduler and a system cron) firing one tick enqueue it once, on the
    fan-out queue, where it never waits behind the runs queued on `sync`."""
    from datetime import UTC, datetime

    from closesync.worker.enqueue import enqueue_tick

    services = services_on(redis_client, keys)
    app = broker(services)
    now = datetime(2026, 3, 4, 10, 7, 30, tzinfo=UTC)
    later = datetime(2026, 3, 4, 10, 9, 59, tzinfo=UTC)
    assert enqueue_tick(services, app, "sync", now) == (SLOT, True)
    assert enqueue_tick(services, app, "sync", later) == (SLOT, False)
    assert [m.task for m in queued(redis_client, keys.prefix, "fanout")] == ["closesync.sync_all"]
    assert queued(redis_client, keys.prefix, "sync") == []


def test_verdict_busy_backfill_or_drift_comes_back_busy_sync_does_not() -> None:
    """A backfill or drift check that found a run in progress retries; a sync leaves it a rerun."""
    for mode, retried in ((RunMode.BACKFILL, True), (RunMode.DRIFT, True), (RunMode.SYNC, False)):
        busy = RunReport(
            connection_id="conn_x",
            mode=mode,
            started_at=0.0,
            outcome=Outcome.SKIPPED,
            failure="locked",
        )
        decision = retry_verdict(busy, 0, half)
        assert decision.retry is retried
        if retried:
            assert decision.countdown == 15.75


def test_verdict_removed_connection_not_retried_in_any_mode() -> None:
    """A run that found its connection being removed is never retried, backfill or not."""
    for mode in RunMode:
        removed = RunReport(
            connection_id="conn_x",
            mode=mode,
            started_at=0.0,
            outcome=Outcome.SKIPPED,
            failure="removed",
        )
        assert retry_verdict(removed, 0, half).retry is False


def test_task_of_connection_gone_returns_removed_writes_nothing(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A queued task whose connection is gone (its mark expired too) ends quietly, no key made."""
    use_services(services_on(redis_client, keys))
    try:
        results = [
            sync_connection.apply(args=["conn_00000000dead", None]).get(),
            backfill.apply(args=["conn_00000000dead"]).get(),
        ]
    finally:
        use_services(None)
    assert results == ["removed", "removed"]
    assert list(redis_client.scan_iter(f"{keys.prefix}:*")) == []


def test_close_services_at_worker_shutdown_closes_the_process_http_connections(
    redis_url: str, keys: Keys
) -> None:
    """The shutdown hook closes the kept-alive connections of the process's sessions; a later
    call gets a new session."""
    with running_sandbox() as sandbox:
        harness = Harness.build(sandbox, redis_url, keys.prefix)
        conn = harness.add(sandbox.users[0])
        use_services(harness.services)
        try:
            assert sync_connection.apply(args=[conn, None]).get() == "ok"
            session = harness.services.http.get("Calendly")
            manager = session.get_adapter(sandbox.calendly_api_url).poolmanager
            assert len(manager.pools) == 1
            close_services()
            assert len(manager.pools) == 0
            assert harness.services.http.get("Calendly") is not session
        finally:
            use_services(None)
