"""The daily webhook reconciliation: scheduled on DRIFT_CRON, enqueued on the fan-out queue, and
its task re-creating a disabled subscription and queueing the sync, once per slot."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis
from celery import Celery

from closesync.connect.saving import save_connection
from closesync.sandbox import Sandbox
from closesync.sandbox.connections import sandbox_connection
from closesync.settings import Settings
from closesync.store.keys import Keys
from closesync.store.secretbox import generate_key
from closesync.wiring.services import Services
from closesync.worker.enqueue import enqueue_tick
from closesync.worker.scheduler import Leadership, TickScheduler
from closesync.worker.tasks import reconcile_webhooks, use_services
from tests._broker import queue_key, queued
from tests._oauth import sandbox_env
from tests._sandbox import running_sandbox
from tests.shells.test_worker_tasks import broker, services_on  # noqa: F401

SLOT = "2026-03-04T03:17:00+00:00"


def test_scheduler_runs_the_reconciliation_on_the_drift_cron_only_with_webhooks_on(
    redis_client: redis.Redis,
    keys: Keys,
    broker: Callable[[Services], Celery],  # noqa: F811
) -> None:
    """A job of its own beside the sync and drift ticks, firing with the drift check."""
    services = services_on(redis_client, keys)
    app = broker(services)
    jobs = {
        job.id: job for job in TickScheduler(services, app, Leadership(services)).build().get_jobs()
    }
    assert set(jobs) == {"closesync-sync", "closesync-drift", "closesync-webhooks"}
    assert str(jobs["closesync-webhooks"].trigger) == str(jobs["closesync-drift"].trigger)
    off = services_on(redis_client, keys, webhooks_enabled=False)
    jobs_off = TickScheduler(off, app, Leadership(off)).build().get_jobs()
    assert {job.id for job in jobs_off} == {"closesync-sync", "closesync-drift"}


def test_enqueue_webhooks_tick_puts_the_task_on_the_fanout_queue_once(
    redis_client: redis.Redis,
    keys: Keys,
    broker: Callable[[Services], Celery],  # noqa: F811
) -> None:
    """Two enqueuers of one slot: one reconcile_webhooks message, on `fanout`."""
    from datetime import UTC, datetime

    services = services_on(redis_client, keys)
    app = broker(services)
    now = datetime(2026, 3, 4, 3, 20, tzinfo=UTC)
    assert enqueue_tick(services, app, "webhooks", now)[1] is True
    assert enqueue_tick(services, app, "webhooks", now)[1] is False
    [message] = queued(redis_client, keys.prefix, "fanout")
    assert (message.task, message.args) == ("closesync.reconcile_webhooks", [SLOT])


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with running_sandbox(users=2) as sandbox:
        yield sandbox


def test_reconcile_task_recreates_a_disabled_subscription_and_queues_its_sync_once_per_slot(
    sb: Sandbox,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    broker: Callable[[Services], Celery],  # noqa: F811
) -> None:
    """The task mends a disabled subscription and publishes the sync; a redelivery of the same
    slot calls Calendly no more."""
    env = sandbox_env(sb, redis_url, keys.prefix, generate_key())
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})  # type: ignore[call-arg]
    services = Services.build(settings, redis_client=redis_client)
    broker(services)  # the current app: the task publishes the sync with it
    connection, grants = sandbox_connection(sb.users[1], time.time())
    save_connection(services, None, connection, grants)
    old = services.webhooks.for_connection(connection.id)
    assert old is not None
    assert old.uri is not None
    sb.world.disable_subscription(old.uri.rsplit("/", 1)[1])
    use_services(services)
    try:
        assert reconcile_webhooks.apply(args=[SLOT]).get() == 0
        calls = sb.world.request_counts()
        assert reconcile_webhooks.apply(args=[SLOT]).get() == 0
        assert sb.world.request_counts() == calls
    finally:
        use_services(None)
    new = services.webhooks.for_connection(connection.id)
    assert new is not None
    assert new.key != old.key
    assert [s["state"] for s in sb.world.subscription_details()] == ["active"]
    runs = queued(redis_client, keys.prefix, "sync")
    assert [(r.task, r.args[0]) for r in runs] == [("closesync.sync_connection", connection.id)]


def test_reconcile_task_runs_in_batches_each_resuming_after_the_last_owner(
    sb: Sandbox,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    broker: Callable[[Services], Celery],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One owner per task: the first task mends one disabled subscription and queues the next
    task (on `fanout`, resuming after that owner), which mends the other and queues none."""
    monkeypatch.setattr("closesync.worker.tasks.RECONCILE_BATCH", 1)
    env = sandbox_env(sb, redis_url, keys.prefix, generate_key())
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})  # type: ignore[call-arg]
    services = Services.build(settings, redis_client=redis_client)
    broker(services)
    olds = []
    for user in sb.users[:2]:
        connection, grants = sandbox_connection(user, time.time())
        save_connection(services, None, connection, grants)
        old = services.webhooks.for_connection(connection.id)
        assert old is not None
        assert old.uri is not None
        sb.world.disable_subscription(old.uri.rsplit("/", 1)[1])
        olds.append(old)
    use_services(services)
    try:
        assert reconcile_webhooks.apply(args=[SLOT]).get() == 0
        [resume] = queued(redis_client, keys.prefix, "fanout")
        assert resume.task == "closesync.reconcile_webhooks"
        assert resume.args[0] == SLOT
        states = sorted(s["state"] for s in sb.world.subscription_details())
        assert states == ["active", "disabled"]
        redis_client.delete(queue_key(keys.prefix, "fanout"))
        assert reconcile_webhooks.apply(args=resume.args).get() == 0
        assert queued(redis_client, keys.prefix, "fanout") == []
    finally:
        use_services(None)
    assert [s["state"] for s in sb.world.subscription_details()] == ["active", "active"]
    for old in olds:
        assert old.connection_id is not None
        new = services.webhooks.for_connection(old.connection_id)
        assert new is not None
        assert new.key != old.key
