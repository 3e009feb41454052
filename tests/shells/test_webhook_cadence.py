"""Polling stays: a connection whose webhooks are active is polled at SYNC_CRON_WITH_WEBHOOKS, the
others at SYNC_CRON; the arithmetic with literal crons, the fan-out against a real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from celery import Celery

from closesync.core.connection import ConnectionState
from closesync.core.webhooks import Subscription, WebhookState
from closesync.store.keys import Keys
from closesync.wiring.services import Services
from closesync.worker.schedule import polls_webhook_connections, webhook_run_deadline
from closesync.worker.tasks import fan_out
from tests.shells.test_worker_tasks import add, broker, seed_fleet, services_on  # noqa: F401

EVERY_5 = "*/5 * * * *"
HOURLY = "0 * * * *"


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def test_polls_webhook_connections_at_the_first_tick_after_each_hourly_fire() -> None:
    """Every 5 minutes with hourly webhooks: the :00 tick polls them, :05 to :55 do not."""
    assert polls_webhook_connections(EVERY_5, HOURLY, "2026-03-04T10:00:00+00:00") is True
    for minute in range(5, 60, 5):
        slot = f"2026-03-04T10:{minute:02}:00+00:00"
        assert polls_webhook_connections(EVERY_5, HOURLY, slot) is False


def test_polls_webhook_connections_when_the_crons_do_not_align() -> None:
    """SYNC_CRON every 7 minutes, webhooks at :30: the tick at :35 (first after :30) polls."""
    every_7 = "*/7 * * * *"
    assert polls_webhook_connections(every_7, "30 * * * *", "2026-03-04T10:28:00+00:00") is False
    assert polls_webhook_connections(every_7, "30 * * * *", "2026-03-04T10:35:00+00:00") is True
    assert polls_webhook_connections(every_7, "30 * * * *", "2026-03-04T10:42:00+00:00") is False


def test_polls_webhook_connections_every_tick_when_webhooks_cron_is_the_more_frequent() -> None:
    """A webhooks cron more frequent than SYNC_CRON polls them at every tick."""
    assert polls_webhook_connections(HOURLY, EVERY_5, "2026-03-04T10:00:00+00:00") is True


def test_webhook_run_deadline_waits_for_the_next_hourly_poll() -> None:
    """Synced at 10:07 with webhooks active: due by the 11:00 tick's window (half of 5 min)."""
    last = _epoch("2026-03-04T10:07:00+00:00")
    deadline = webhook_run_deadline(EVERY_5, HOURLY, last, 0.5, 3600)
    assert deadline == _epoch("2026-03-04T11:02:30+00:00")
    later = webhook_run_deadline(EVERY_5, HOURLY, last + 3000, 0.5, 3600)
    assert later >= deadline


def served(
    services: Services, connection_id: str | None, ref: str | None, state: WebhookState
) -> None:
    now = time.time()
    services.webhooks.save(
        Subscription(
            key=f"key-{connection_id or ref}",
            scope="user" if ref is None else "organization",
            organization_uri="https://api.calendly.com/organizations/o",
            connection_id=connection_id,
            grant_ref=ref,
            state=state,
            created_at=now,
            updated_at=now,
        )
    )


def org_member(services: Services, conn_id: str, ref: str) -> None:
    add(services, conn_id, ConnectionState.ACTIVE)
    record = services.connections.get(conn_id).model_copy(update={"calendly_grant_ref": ref})
    services.redis.set(services.keys.conn(conn_id), record.model_dump_json())


def scheduled(services: Services) -> set[str]:
    return {str(m) for m in services.redis.zrange(services.keys.schedule("sync"), 0, -1)}


def test_fan_out_skips_webhook_active_connections_between_their_hourly_polls(
    redis_client: redis.Redis,
    keys: Keys,
    broker: Callable[[Services], Celery],  # noqa: F811
) -> None:
    """At 10:05 only connections without active webhooks are scheduled (a pending or disabled
    subscription does not count); at 11:00 every one is."""
    services = services_on(redis_client, keys, sync_spread_fraction=0.5)
    for conn_id in ("conn_0000000000a1", "conn_0000000000b2", "conn_0000000000c3"):
        add(services, conn_id, ConnectionState.ACTIVE)
    org_member(services, "conn_0000000000d4", "org1")
    served(services, "conn_0000000000a1", None, WebhookState.ACTIVE)
    served(services, "conn_0000000000b2", None, WebhookState.DISABLED)
    served(services, None, "org1", WebhookState.ACTIVE)
    app = broker(services)
    clock = lambda: _epoch("2026-03-04T10:05:00+00:00")  # noqa: E731
    fan_out(services, app, tick="sync", slot="2026-03-04T10:05:00+00:00", cron=EVERY_5, clock=clock)
    assert scheduled(services) == {"conn_0000000000b2", "conn_0000000000c3"}
    services.redis.delete(services.keys.schedule("sync"))
    clock = lambda: _epoch("2026-03-04T11:00:00+00:00")  # noqa: E731
    fan_out(services, app, tick="sync", slot="2026-03-04T11:00:00+00:00", cron=EVERY_5, clock=clock)
    assert scheduled(services) == {
        "conn_0000000000a1",
        "conn_0000000000b2",
        "conn_0000000000c3",
        "conn_0000000000d4",
    }


def test_fan_out_with_webhooks_off_polls_everyone_at_sync_cron(
    redis_client: redis.Redis,
    keys: Keys,
    broker: Callable[[Services], Celery],  # noqa: F811
) -> None:
    """WEBHOOKS_ENABLED=false: an active subscription record changes nothing."""
    services = services_on(redis_client, keys, webhooks_enabled=False, sync_spread_fraction=0.5)
    add(services, "conn_0000000000a1", ConnectionState.ACTIVE)
    served(services, "conn_0000000000a1", None, WebhookState.ACTIVE)
    slot = "2026-03-04T10:05:00+00:00"
    fan_out(
        services, broker(services), tick="sync", slot=slot, cron=EVERY_5, clock=lambda: _epoch(slot)
    )
    assert scheduled(services) == {"conn_0000000000a1"}


def test_fan_out_ten_thousand_connections_reads_the_subscriptions_in_one_batch(
    redis_client: redis.Redis,
    keys: Keys,
    broker: Callable[[Services], Celery],  # noqa: F811
) -> None:
    """10,000 connections, half with active webhooks: half are scheduled, and the fan-out makes
    a bounded number of Redis calls whatever the fleet size (no read per connection)."""
    active = sorted(seed_fleet(redis_client, keys, active=10_000, paused=0))
    services = services_on(redis_client, keys, sync_spread_fraction=0.5)
    with_hooks = active[::2]
    now = time.time()
    with redis_client.pipeline(transaction=False) as pipe:
        for conn_id in with_hooks:
            sub = Subscription(
                key=f"k{conn_id}",
                scope="user",
                organization_uri="https://api.calendly.com/organizations/o",
                connection_id=conn_id,
                state=WebhookState.ACTIVE,
                created_at=now,
                updated_at=now,
            )
            pipe.sadd(keys.webhooks(), sub.key)
            pipe.set(keys.webhook(sub.key), sub.model_dump_json())
        pipe.execute()
    calls = 0
    original = services.redis.execute_command

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    services.redis.execute_command = counting  # type: ignore[method-assign]
    slot = "2026-03-04T10:05:00+00:00"
    count = fan_out(
        services, broker(services), tick="sync", slot=slot, cron=EVERY_5, clock=lambda: _epoch(slot)
    )
    assert count == 5_000
    assert scheduled(services) == set(active) - set(with_hooks)
    assert calls < 50
