"""A team type no connection holds, at scale: the request stays O(1) in the organization's size
(Redis commands, publishes), and the one fan-out task it publishes backfills the holders index,
asks the holders it finds, or else a capped number of connections spread over a window."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from closesync.core.connection import Connection
from closesync.core.plan import LinkRecord
from closesync.worker import celery_app as names
from tests.webhook_helpers import event_body, signed
from tests.webhooks.conftest import APP_KEY, C1, C2, C3, World, build_world

CREATED = "event_type.created"


def seed_members(world: World, count: int) -> list[str]:
    """`count` more connections of ORG1, written straight into Redis as saves would write their
    records and indexes (no grants: nothing here reads them); their ids."""
    keys, ids = world.services.keys, []
    with world.services.redis.pipeline(transaction=False) as pipe:
        for n in range(count):
            conn_id, user = f"conn_9{n:011d}", f"M{n:05d}"
            record = Connection(
                id=conn_id,
                close_user_id=f"user_{user}",
                calendly_user_uri=f"https://api.calendly.com/users/{user}",
                calendly_grant_ref="ORG1",
                created_at=1.0,
                updated_at=1.0,
            )
            pipe.set(keys.conn(conn_id), record.model_dump_json())
            pipe.set(keys.calendly_user(user), conn_id)
            pipe.sadd(keys.connections(), conn_id)
            pipe.sadd(keys.calendly_org_connections("ORG1"), conn_id)
            ids.append(conn_id)
        pipe.execute()
    return ids


def commands(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def deliver_counting(world: World, body: bytes) -> tuple[int, int]:
    """Post `body` to the organization subscription: (Redis commands it took, its status)."""
    client = world.services.redis
    before = commands(client)
    reply = world.receiver.receive(world.org_sub.key, signed(APP_KEY, body), body)
    # Less the INFO that reads the counter (it counts itself).
    return commands(client) - before - 1, reply.status


@pytest.fixture
def make_world(redis_client: redis.Redis, redis_url: str) -> Iterator[Callable[..., World]]:
    """Worlds with settings of the test's choosing, closed at the end."""
    opened: list[Iterator[World]] = []

    def make(**overrides: object) -> World:
        redis_client.flushdb()
        opened.append(build_world(redis_url, **overrides))
        return next(opened[-1])

    yield make
    for worlds in opened:
        worlds.close()


def test_new_team_type_request_is_constant_in_the_organizations_size(
    make_world: Callable[..., World],
) -> None:
    """With 3 or 403 connections in the organization, a delivery for a team type nobody holds
    takes the same number of Redis commands, publishes one fan-out task and no sync."""
    cost = {}
    for extra in (0, 400):
        world = make_world()
        seed_members(world, extra)
        body = event_body(CREATED, "NEWTEAM", "U9", team=True)
        cost[extra], status = deliver_counting(world, body)
        assert status == 200
        fan_outs = [m for m in world.fanout_queue() if m.task == names.WEBHOOK_FAN_OUT]
        assert [m.args for m in fan_outs] == [["ORG1", "NEWTEAM"]]
        assert world.queued() == []
        assert world.scheduled() == {}
    assert cost[400] == cost[0]
    assert cost[0] < 40  # a few reads, the replay mark, one publish (kombu: a handful)


def test_burst_for_one_new_team_type_publishes_one_fan_out(
    make_world: Callable[..., World],
) -> None:
    """Ten deliveries of one new team type within the window: one fan-out task."""
    world = make_world()
    for n in range(10):
        body = event_body("event_type.updated", "NEWTEAM", "U9", team=True, name=f"v{n}")
        assert deliver_counting(world, body)[1] == 200
    assert [m.task for m in world.fanout_queue()].count(names.WEBHOOK_FAN_OUT) == 1


def test_fan_out_task_caps_and_spreads_the_organizations_syncs(
    make_world: Callable[..., World],
) -> None:
    """The fan-out schedules at most WEBHOOK_FANOUT_MAX connections, spread over the window,
    and publishes none of their syncs before they fall due."""
    world = make_world(webhook_fanout_max=100, webhook_fanout_window_seconds=30.0)
    seed_members(world, 300)
    body = event_body(CREATED, "NEWTEAM", "U9", team=True)
    world.receiver.receive(world.org_sub.key, signed(APP_KEY, body), body)
    assert world.run_fan_outs() == 100
    due = sorted(world.scheduled().values())
    assert len(due) == 100
    assert due[-1] - due[0] > 15  # spread, not a burst of 100
    assert due[-1] - due[0] < 30
    assert world.queued() == []
    assert len(world.asked()) == 100


def test_fan_out_task_backfills_the_holders_and_asks_only_them(
    make_world: Callable[..., World],
) -> None:
    """Links written before the holders index existed: the fan-out's one-time backfill finds
    their holders, and only they are asked, not the whole organization."""
    world = make_world()
    seed_members(world, 50)
    keys, client = world.services.keys, world.services.redis
    uri = "https://api.calendly.com/event_types/OLDTEAM"
    for conn_id, user in ((C2, "U2"), (C3, "U3")):
        world.services.state.record_write(
            conn_id, f"{user}:OLDTEAM", LinkRecord(fingerprint="fp", event_type_uri=uri)
        )
    # As an older release left it: link records, no holders entries, no flag.
    client.delete(keys.event_type_holders("OLDTEAM"), keys.event_type_holders_index_complete())
    body = event_body("event_type.updated", "OLDTEAM", "U9", team=True)
    world.receiver.receive(world.org_sub.key, signed(APP_KEY, body), body)
    assert world.run_fan_outs() == 2
    assert sorted(world.scheduled()) == [C2, C3]
    assert world.services.state.holders("OLDTEAM") == {C2, C3}
    assert client.get(keys.event_type_holders_index_complete()) == "1"
    # From now on the request itself finds the holders: no fan-out.
    again = event_body("event_type.updated", "OLDTEAM", "U9", team=True, name="again")
    before = [m.task for m in world.fanout_queue()].count(names.WEBHOOK_FAN_OUT)
    world.receiver.receive(world.org_sub.key, signed(APP_KEY, again), again)
    assert [m.task for m in world.fanout_queue()].count(names.WEBHOOK_FAN_OUT) == before
    assert sorted(world.asked()) == [C2, C3]


def test_fan_out_task_skips_a_member_that_moved_to_another_organization(
    make_world: Callable[..., World],
) -> None:
    """A stale member of the organization's set (its record names another organization now) is
    not asked, and is dropped from the set."""
    world = make_world()
    keys, client = world.services.keys, world.services.redis
    client.sadd(keys.calendly_org_connections("ORG1"), "conn_000000000004")  # C4 is of ORG2
    body = event_body(CREATED, "NEWTEAM", "U9", team=True)
    world.receiver.receive(world.org_sub.key, signed(APP_KEY, body), body)
    world.run_fan_outs()
    assert sorted(world.scheduled()) == [C1, C2, C3]
    assert not client.sismember(keys.calendly_org_connections("ORG1"), "conn_000000000004")
