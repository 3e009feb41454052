"""Task policy: which reports are retried and when; the tick fan-out claims each slot once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis
from pydantic import SecretStr

from closesync.core.connection import Connection, ConnectionState, Grant, Grants
from closesync.core.report import Outcome, RunMode, RunReport
from closesync.settings import Settings
from closesync.store.keys import Keys
from closesync.store.secretbox import generate_key
from closesync.wiring.services import Services
from closesync.worker.tasks import (
    MAX_TRANSIENT_RETRIES,
    backfill,
    close_services,
    fan_out,
    retry_verdict,
    sync_connection,
    use_services,
)
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


@dataclass
class RecordingApp:
    """Stands in for the Celery app as the fan-out's publisher: records what would be sent."""

    sent: list[tuple[str, list[Any], float]] = field(default_factory=list)

    def send_task(self, name: str, args: list[Any], countdown: float = 0.0) -> None:
        self.sent.append((name, args, countdown))


def services_on(client: redis.Redis, keys: Keys) -> Services:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        redis_prefix=keys.prefix,
        close_api_url="http://127.0.0.1:1/api/v1",
        close_oauth_url="http://127.0.0.1:1/oauth2",
        calendly_api_url="http://127.0.0.1:2",
        calendly_auth_url="http://127.0.0.1:2",
        closesync_encryption_keys=generate_key(),
    )
    return Services.build(settings, redis_client=client)


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


def test_fan_out_active_connections_each_once_with_hashed_countdown(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """One sync per active connection, at its hashed offset within half the 5-minute interval."""
    services = services_on(redis_client, keys)
    add(services, "conn_000000000001", ConnectionState.ACTIVE)
    add(services, "conn_abcdefabcdef", ConnectionState.ACTIVE)
    add(services, "conn_00000000000p", ConnectionState.PAUSED)
    app = RecordingApp()
    slot = "2026-03-04T10:05:00+00:00"
    count = fan_out(
        services,
        app,
        tick="sync",
        slot=slot,
        cron="*/5 * * * *",
        task="closesync.sync_connection",  # type: ignore[arg-type]
    )
    assert count == 2
    assert sorted(app.sent) == [
        ("closesync.sync_connection", ["conn_000000000001", slot], 39.104),
        ("closesync.sync_connection", ["conn_abcdefabcdef", slot], 103.748),
    ]


def test_fan_out_same_slot_delivered_twice_enqueues_once(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A redelivered tick finds its slot claimed and enqueues nothing."""
    services = services_on(redis_client, keys)
    add(services, "conn_000000000001", ConnectionState.ACTIVE)
    app = RecordingApp()
    args: dict[str, Any] = {
        "tick": "sync",
        "slot": "2026-03-04T10:05:00+00:00",
        "cron": "*/5 * * * *",
        "task": "closesync.sync_connection",
    }
    assert fan_out(services, app, **args) == 1  # type: ignore[arg-type]
    assert fan_out(services, app, **args) == 0  # type: ignore[arg-type]
    assert len(app.sent) == 1
    ttl = redis_client.ttl(keys.tick("sync", "2026-03-04T10:05:00+00:00"))
    assert 590 <= ttl <= 600


def test_enqueue_tick_two_enqueuers_same_tick_one_message(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """Two leaders (or a scheduler and a system cron) firing one tick enqueue it once."""
    from datetime import UTC, datetime

    from closesync.worker.enqueue import enqueue_tick

    services = services_on(redis_client, keys)
    app = RecordingApp()
    now = datetime(2026, 3, 4, 10, 7, 30, tzinfo=UTC)
    later = datetime(2026, 3, 4, 10, 9, 59, tzinfo=UTC)
    assert enqueue_tick(services, app, "sync", now) == ("2026-03-04T10:05:00+00:00", True)  # type: ignore[arg-type]
    assert enqueue_tick(services, app, "sync", later) == ("2026-03-04T10:05:00+00:00", False)  # type: ignore[arg-type]
    assert [name for name, _, _ in app.sent] == ["closesync.sync_all"]


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
