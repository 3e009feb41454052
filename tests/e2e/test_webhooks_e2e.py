"""Webhook deliveries end to end: the receiver (in the test process, over loopback HTTP), a real
`closesync worker`, real Redis and the sandbox. A delivery only asks for a sync, so bursts,
duplicates and deliveries out of order all end at Calendly's current state, in seconds."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests
from pydantic import SecretStr

from closesync.core.webhooks import Subscription, WebhookState, new_key
from closesync.sandbox import Sandbox
from closesync.web.webhooks import WebhookReceiver
from closesync.worker.celery_app import SYNC_QUEUE, create_app
from closesync.worker.webhook_asks import webhook_asker
from tests._broker import queue_key
from tests.e2e.conftest import Deployment, converged, our_links, wait_for
from tests.webhook_helpers import ReceiverServer, serving, signed

pytestmark = pytest.mark.e2e

SIGNING_KEY = "e2e-own-signing-key-1f2e3d"


@contextmanager
def receiving(deployment: Deployment) -> Iterator[ReceiverServer]:
    """The deployment's receiver on a loopback port, asking its syncs as the web process will."""
    app = create_app(deployment.settings)
    try:
        receiver = WebhookReceiver(deployment.services, webhook_asker(deployment.services, app))
        with serving(receiver) as server:
            yield server
    finally:
        app.close()


def subscribe(deployment: Deployment, conn_id: str, user_uri: str) -> str:
    """A user subscription of `conn_id` with a signing key of its own; its callback key."""
    sub = Subscription(
        key=new_key(),
        scope="user",
        organization_uri="https://api.calendly.com/organizations/SANDBOX",
        user_uri=user_uri,
        connection_id=conn_id,
        state=WebhookState.ACTIVE,
        own_signing_key=True,
        created_at=time.time(),
        updated_at=time.time(),
    )
    deployment.services.webhooks.save(sub, SecretStr(SIGNING_KEY))
    return sub.key


def delivery(event: str, event_type: dict[str, Any]) -> bytes:
    """A delivery as Calendly sends it: the full event type as payload."""
    return json.dumps(
        {
            "event": event,
            "created_at": "2026-12-02T05:00:00.000000Z",
            "created_by": event_type["profile"]["owner"],
            "payload": event_type,
        }
    ).encode()


def quiet(deployment: Deployment, conn_id: str) -> bool:
    """No sync of the connection is scheduled by a delivery, queued, held or owed by a run."""
    client, prefix = deployment.services.redis, deployment.settings.redis_prefix
    return (
        client.zscore(deployment.services.keys.schedule("webhook"), conn_id) is None
        and not client.exists(deployment.services.keys.queued(conn_id))
        and not client.exists(deployment.services.keys.run_lock(conn_id))
        and client.llen(queue_key(prefix, SYNC_QUEUE)) == 0
        and client.hlen(f"{prefix}:celery:unacked") == 0
    )


def runs(deployment: Deployment, conn_id: str) -> int:
    return len(deployment.services.state.reports(conn_id, limit=100))


def test_webhook_burst_duplicates_and_reordering_converge_with_one_run_per_burst(
    deploy: Callable[..., Deployment], sandbox: Sandbox
) -> None:
    """A burst of deliveries (renames, duplicates, an older one last) makes one run, and Close
    ends with Calendly's current names; a delete reaches Close in seconds, and a stale update
    delivered after it does not bring the link back."""
    deployment = deploy()
    user = sandbox.users[0]
    conn = deployment.add_connection(user)
    key = subscribe(deployment, conn, f"https://api.calendly.com/users/{user.calendly_user_uuid}")
    deployment.start("worker", "--concurrency", "2")
    world = sandbox.world
    with world.lock:
        mine = sorted(
            uuid
            for uuid, et in world.event_types.items()
            if et.members == [user.calendly_user_uuid]
            and et.active
            and et.deleted_at is None
            and et.type == "StandardEventType"
        )
    assert len(mine) >= 2, "the seeded user needs two plain event types"
    renamed, deleted = mine[0], mine[1]

    with receiving(deployment) as server, requests.Session() as session:

        def post(body: bytes) -> dict[str, Any]:
            answer = server.post(key, body, signed(SIGNING_KEY, body), session)
            assert answer.status_code == 200, answer.text
            result: dict[str, Any] = answer.json()
            return result

        first = world.get_event_type(renamed)
        assert first is not None
        post(delivery("event_type.updated", first))
        wait_for("the first delivery's sync", lambda: converged(sandbox, user), 30)
        wait_for("the first run to settle", lambda: quiet(deployment, conn), 15)
        assert runs(deployment, conn) == 1

        # A burst: five renames, each delivered twice, then the oldest again (out of order).
        bodies = []
        for n in range(5):
            current = world.update_event_type(renamed, name=f"Renamed {n}")
            bodies.append(delivery("event_type.updated", current))
        answers = [post(body) for body in bodies]
        # Each again as Calendly's retry would send it: the same body signed anew.
        duplicates = [
            server.post(key, body, signed(SIGNING_KEY, body, t=time.time() - 30), session).json()
            for body in bodies
        ]
        post(bodies[0])  # the oldest rename, re-signed: a retry, not a replay
        assert [a["status"] for a in answers] == ["accepted"] * 5
        assert all(d["status"] == "accepted" for d in duplicates)
        wait_for(
            "Close to show the last rename",
            lambda: (
                converged(sandbox, user)
                and "Renamed 4" in {link["name"] for link in our_links(sandbox, user)}
            ),
            30,
        )
        wait_for("the burst's run to settle", lambda: quiet(deployment, conn), 15)
        assert runs(deployment, conn) == 2  # the whole burst: one run

        # A delete, its delivery twice (a replay of the very same request), then a stale update.
        stale = world.get_event_type(deleted)
        assert stale is not None
        gone_at = time.monotonic()
        removed = world.delete_event_type(deleted)
        assert removed is not None
        body = delivery("event_type.deleted", removed)
        headers = signed(SIGNING_KEY, body)
        assert server.post(key, body, headers, session).json()["status"] == "accepted"
        assert server.post(key, body, headers, session).json() == {"status": "duplicate"}
        post(delivery("event_type.updated", stale))
        wait_for("the deletion to reach Close", lambda: converged(sandbox, user), 30)
        took = time.monotonic() - gone_at
        print(f"\ndeletion reached Close {took:.2f} s after it was made")
        assert took < 10
        wait_for("the delete's run to settle", lambda: quiet(deployment, conn), 15)
        assert converged(sandbox, user)
        last = deployment.services.state.last_report(conn)
        assert last is not None
        assert last.deleted == 1
