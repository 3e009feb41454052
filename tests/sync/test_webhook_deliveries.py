"""What deliveries lead to, with the engine run inline on what they asked (the sandbox, real
Redis): a delivery only asks for a sync, so deletes follow the engine's rules, never the payload,
and duplicates or deliveries out of order end at Calendly's current state."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import uuid4

from pydantic import SecretStr

from closesync.core.mapping import source_id_for
from closesync.core.webhooks import Subscription, WebhookState, new_key
from closesync.sandbox import Sandbox
from closesync.sandbox.records import SeededUser
from closesync.web.webhooks import WebhookReceiver
from tests.sync_harness import Harness
from tests.webhook_helpers import ReceiverServer, event_body, serving, signed

KEY = "sync-test-signing-key-77a1"


@contextmanager
def delivering(harness: Harness, asked: list[str]) -> Iterator[ReceiverServer]:
    """The receiver on loopback, recording whom it asks (the test then runs them inline)."""

    def ask(ids: list[str]) -> list[str]:
        asked.extend(ids)
        return ids

    with serving(WebhookReceiver(harness.services, ask)) as server:
        yield server


def subscribe(harness: Harness, conn_id: str, user: SeededUser) -> str:
    sub = Subscription(
        key=new_key(),
        scope="user",
        organization_uri="https://api.calendly.com/organizations/SANDBOX",
        user_uri=user.calendly_user_uri,
        connection_id=conn_id,
        state=WebhookState.ACTIVE,
        own_signing_key=True,
        created_at=time.time(),
        updated_at=time.time(),
    )
    harness.services.webhooks.save(sub, SecretStr(KEY))
    return sub.key


def plain_types(harness: Harness, user: SeededUser) -> list[str]:
    """Uuids of the user's own active standard event types, which each have a link."""
    world = harness.sandbox.world
    with world.lock:
        return sorted(
            uuid
            for uuid, et in world.event_types.items()
            if et.members == [user.calendly_user_uuid]
            and et.active
            and et.deleted_at is None
            and et.type == "StandardEventType"
            and not et.secret
        )


def run_asked(harness: Harness, asked: list[str]) -> list[int]:
    """Run each connection asked, once (the marker coalesces repeats); deletions per run."""
    reports = [harness.run(conn) for conn in dict.fromkeys(asked)]
    asked.clear()
    return [report.deleted for report in reports]


def _setup(harness: Harness) -> tuple[SeededUser, str, str, list[str]]:
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.run(conn)
    assert harness.close_side(user) == harness.expected(user)
    return user, conn, subscribe(harness, conn, user), plain_types(harness, user)


def test_deleted_delivery_for_a_live_type_deletes_nothing(harness: Harness) -> None:
    """An event_type.deleted whose type the run finds alive (a wrong or misrouted payload)
    changes nothing: the listing and the direct fetch decide, not the delivery."""
    user, conn, key, types = _setup(harness)
    before = harness.close_side(user)
    body = event_body("event_type.deleted", types[0], user.calendly_user_uuid, deleted=True)
    asked: list[str] = []
    with delivering(harness, asked) as server:
        assert server.post(key, body, signed(KEY, body)).status_code == 200
    assert asked == [conn]
    assert run_asked(harness, asked) == [0]
    assert harness.close_side(user) == before


def test_deleted_delivery_deletes_once_calendly_confirms(harness: Harness) -> None:
    """A type really deleted in Calendly: the run its delivery asked deletes the link at once,
    after the direct fetch confirmed it (no wait of DELETE_CONFIRM_SECONDS)."""
    user, _, key, types = _setup(harness)
    sid = source_id_for(user.calendly_user_uuid, types[0])
    harness.sandbox.world.delete_event_type(types[0])
    body = event_body("event_type.deleted", types[0], user.calendly_user_uuid, deleted=True)
    asked: list[str] = []
    with delivering(harness, asked) as server:
        server.post(key, body, signed(KEY, body))
    assert run_asked(harness, asked) == [1]
    assert sid not in harness.close_side(user)
    assert harness.close_side(user) == harness.expected(user)
    assert harness.calendly_calls("/event_types/{uuid}") == 1  # the confirming fetch


def test_deleted_deliveries_still_meet_the_mass_delete_guard(
    sandbox: Sandbox, redis_url: str
) -> None:
    """Several types deleted at once: the deliveries ask a run, whose deletions the guard holds
    (here tightened to hold any two)."""
    harness = Harness.build(
        sandbox, redis_url, f"test-{uuid4().hex[:8]}", mass_delete_min=1, mass_delete_fraction=0.0
    )
    user, conn, key, types = _setup(harness)
    links = len(harness.close_side(user))
    asked: list[str] = []
    with delivering(harness, asked) as server:
        for gone in types:
            harness.sandbox.world.delete_event_type(gone)
            body = event_body("event_type.deleted", gone, user.calendly_user_uuid, deleted=True)
            server.post(key, body, signed(KEY, body))
    assert asked == [conn] * len(types)
    run_asked(harness, asked)
    report = harness.services.state.last_report(conn)
    assert report is not None
    assert report.deleted == 0
    assert len(report.held_deletions) == len(types)
    assert len(harness.close_side(user)) == links


def test_out_of_order_and_duplicate_deliveries_converge_to_calendly(harness: Harness) -> None:
    """A delete delivered before the older update, and each twice: Close ends as Calendly is."""
    user, _, key, types = _setup(harness)
    world = harness.sandbox.world
    renamed = world.update_event_type(types[1], name="Renamed last")
    world.delete_event_type(types[0])
    deleted = event_body("event_type.deleted", types[0], user.calendly_user_uuid, deleted=True)
    older = event_body("event_type.updated", types[0], user.calendly_user_uuid)
    rename = event_body("event_type.updated", types[1], user.calendly_user_uuid, **renamed)
    asked: list[str] = []
    with delivering(harness, asked) as server:
        for body in (rename, deleted, deleted, older, rename):
            server.post(key, body, signed(KEY, body, t=time.time() - len(asked)))
    run_asked(harness, asked)
    assert harness.close_side(user) == harness.expected(user)
    assert "Renamed last" in {view[0] for view in harness.close_side(user).values()}
