"""Polling stays: a connection whose webhooks are active is polled at SYNC_CRON_WITH_WEBHOOKS, the
others at SYNC_CRON; the arithmetic with literal crons, the fan-out against a real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from itertools import pairwise

import redis
from celery import Celery

from closesync.core.connection import ConnectionState
from closesync.core.webhooks import Subscription, WebhookState
from closesync.store.keys import Keys
from closesync.wiring.services import Services
from closesync.worker.schedule import webhook_poll_due, webhook_poll_turn, webhook_run_deadline
from closesync.worker.tasks import fan_out
from tests.shells.test_worker_tasks import add, broker, seed_fleet, services_on  # noqa: F401

EVERY_5 = "*/5 * * * *"
HOURLY = "0 * * * *"


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def test_webhook_poll_turn_numbers_the_ticks_of_each_hourly_interval() -> None:
    """Every 5 minutes with hourly webhooks: :00 is turn 0 of 12, :55 turn 11."""
    for minute in range(0, 60, 5):
        slot = f"2026-03-04T10:{minute:02}:00+00:00"
        assert webhook_poll_turn(EVERY_5, HOURLY, slot) == (minute // 5, 12)


def test_webhook_poll_turn_when_the_crons_do_not_align() -> None:
    """SYNC_CRON every 7 minutes, webhooks at :30: 10:35 is the first tick of the interval
    10:30-11:30 (ticks 10:35 .. 10:56, 11:00 .. 11:28: 9 of them)."""
    every_7 = "*/7 * * * *"
    assert webhook_poll_turn(every_7, "30 * * * *", "2026-03-04T10:35:00+00:00") == (0, 9)
    assert webhook_poll_turn(every_7, "30 * * * *", "2026-03-04T10:42:00+00:00") == (1, 9)
    assert webhook_poll_turn(every_7, "30 * * * *", "2026-03-04T11:28:00+00:00") == (8, 9)


def test_webhook_poll_turn_every_tick_when_webhooks_cron_is_the_more_frequent() -> None:
    """A webhooks cron more frequent than SYNC_CRON: one tick per interval, everyone polled."""
    assert webhook_poll_turn(HOURLY, EVERY_5, "2026-03-04T10:00:00+00:00") == (0, 1)
    assert webhook_poll_due("conn_0000000000a1", 0, 1) is True


def _polls(
    sync_cron: str, webhooks_cron: str, ids: list[str], hours: int
) -> dict[str, list[float]]:
    """When each connection is polled over `hours` hours of ticks from 2026-03-04 10:00."""
    from datetime import UTC, datetime, timedelta

    from closesync.worker.schedule import cron_trigger, next_fire

    trigger = cron_trigger(sync_cron)
    start = datetime(2026, 3, 4, 10, tzinfo=UTC)
    polled: dict[str, list[float]] = {conn_id: [] for conn_id in ids}
    tick = next_fire(trigger, start - timedelta(seconds=1))
    while tick < start + timedelta(hours=hours):
        turn, ticks = webhook_poll_turn(sync_cron, webhooks_cron, tick.isoformat())
        for conn_id in ids:
            if webhook_poll_due(conn_id, turn, ticks):
                polled[conn_id].append(tick.timestamp())
        tick = next_fire(trigger, tick)
    return polled


def test_webhook_polls_spread_over_the_hour_once_each_an_hour_apart() -> None:
    """1,200 connections, 5-minute ticks, hourly webhooks: each is polled once per hour, exactly
    an hour apart, and every tick polls between a half and twice its even share (100)."""
    ids = [f"conn_{n:012x}" for n in range(1200)]
    polled = _polls(EVERY_5, HOURLY, ids, hours=3)
    per_tick: dict[float, int] = {}
    for conn_id, times in polled.items():
        assert len(times) == 3, conn_id
        assert {b - a for a, b in pairwise(times)} == {3600.0}
        for at in times:
            per_tick[at] = per_tick.get(at, 0) + 1
    assert len(per_tick) == 36  # every tick of the three hours polls some
    assert all(50 <= n <= 200 for n in per_tick.values()), per_tick


def test_no_webhook_connection_goes_unpolled_longer_than_the_interval_plus_one_tick() -> None:
    """Crons that do not divide each other (every 7 minutes, webhooks at :30; intervals of 8
    or 9 ticks): no gap between two polls exceeds an hour plus one 7-minute tick."""
    ids = [f"conn_{n:012x}" for n in range(500)]
    polled = _polls("*/7 * * * *", "30 * * * *", ids, hours=6)
    for conn_id, times in polled.items():
        assert len(times) >= 5, conn_id
        gaps = [b - a for a, b in pairwise(times)]
        assert max(gaps) <= 3600 + 7 * 60, (conn_id, gaps)


def test_webhook_run_deadline_waits_for_the_next_hourly_interval() -> None:
    """Synced at 10:07 with webhooks active: its next poll is at its own tick of 11:00-12:00,
    so it is due by the 11:55 tick's window (half of 5 min)."""
    last = _epoch("2026-03-04T10:07:00+00:00")
    deadline = webhook_run_deadline(EVERY_5, HOURLY, last, 0.5, 3600)
    assert deadline == _epoch("2026-03-04T11:57:30+00:00")
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


def test_fan_out_polls_webhook_active_connections_once_an_hour_at_their_own_tick(
    redis_client: redis.Redis,
    keys: Keys,
    broker: Callable[[Services], Celery],  # noqa: F811
) -> None:
    """Over the twelve 5-minute ticks of an hour, connections without active webhooks (a pending
    or disabled subscription does not count) are scheduled at every tick, and those with them
    (their own or their organization's) at exactly one tick, their own turn."""
    services = services_on(redis_client, keys, sync_spread_fraction=0.5)
    for conn_id in ("conn_0000000000a1", "conn_0000000000b2", "conn_0000000000c3"):
        add(services, conn_id, ConnectionState.ACTIVE)
    org_member(services, "conn_0000000000d4", "org1")
    served(services, "conn_0000000000a1", None, WebhookState.ACTIVE)
    served(services, "conn_0000000000b2", None, WebhookState.DISABLED)
    served(services, None, "org1", WebhookState.ACTIVE)
    app = broker(services)
    hooked = ("conn_0000000000a1", "conn_0000000000d4")
    polls = {conn_id: 0 for conn_id in hooked}
    for minute in range(0, 60, 5):
        slot = f"2026-03-04T11:{minute:02}:00+00:00"
        services.redis.delete(services.keys.schedule("sync"))
        fan_out(services, app, tick="sync", slot=slot, cron=EVERY_5, clock=partial(_epoch, slot))
        due = {c for c in hooked if webhook_poll_due(c, minute // 5, 12)}
        assert scheduled(services) == {"conn_0000000000b2", "conn_0000000000c3", *due}, slot
        for conn_id in due:
            polls[conn_id] += 1
    assert polls == {conn_id: 1 for conn_id in hooked}


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
    """10,000 connections, half with active webhooks: at 10:05 (turn 1 of 12) the other half
    and the hooked ones whose turn it is (about a twelfth) are scheduled, and the fan-out makes
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
            pipe.set(keys.webhook_of_connection(conn_id), sub.key)
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
    their_turn = {c for c in with_hooks if webhook_poll_due(c, 1, 12)}
    assert 5_000 / 24 < len(their_turn) < 5_000 / 6
    assert count == 5_000 + len(their_turn)
    assert scheduled(services) == (set(active) - set(with_hooks)) | their_turn
    assert calls < 50


def test_members_of_an_organization_whose_shared_credential_is_refused_are_polled_every_tick(
    redis_client: redis.Redis,
    keys: Keys,
    broker: Callable[[Services], Celery],  # noqa: F811
) -> None:
    """The organization's subscription is ACTIVE but Calendly refused its shared credential:
    its members are scheduled at every SYNC_CRON tick, not once an hour."""
    services = services_on(redis_client, keys, sync_spread_fraction=0.5)
    org_member(services, "conn_0000000000d4", "org1")
    org_member(services, "conn_0000000000e5", "org1")
    served(services, None, "org1", WebhookState.ACTIVE)
    assert services.connections.mark_shared_refused("org1", "Calendly answered 401")
    app = broker(services)
    for minute in range(0, 60, 5):
        slot = f"2026-03-04T11:{minute:02}:00+00:00"
        services.redis.delete(services.keys.schedule("sync"))
        fan_out(services, app, tick="sync", slot=slot, cron=EVERY_5, clock=partial(_epoch, slot))
        assert scheduled(services) == {"conn_0000000000d4", "conn_0000000000e5"}, slot
