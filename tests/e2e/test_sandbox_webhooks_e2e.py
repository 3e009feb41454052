"""The sandbox's own signed deliveries to the receiver, a real worker behind it: Calendly's
misbehaviour (duplicates, reordering, a wrong signature, a dropped delivery) ends at Calendly's
current state, a wrong signature is refused and retried, and nothing is ever answered 410."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import pytest
import requests
from pydantic import SecretStr

from closesync.core.webhooks import CALLBACK_PATH, EVENT_TYPE_EVENTS, Subscription, WebhookState
from closesync.core.webhooks import new_key as new_callback_key
from closesync.sandbox import Sandbox
from tests.e2e.conftest import Deployment, converged, our_links, wait_for
from tests.e2e.test_webhooks_e2e import quiet, receiving

pytestmark = pytest.mark.e2e


def test_sandbox_deliveries_with_duplicates_reorders_bad_signatures_and_drops_converge(
    deploy: Callable[..., Deployment], sandbox: Sandbox
) -> None:
    """Through the sandbox's deliveries alone (no tick runs), renames, a new type and a delete
    reach Close in seconds despite duplicated, reordered and wrongly signed deliveries; the one
    dropped is healed by the next poll."""
    deployment = deploy()
    user = sandbox.users[0]
    conn = deployment.add_connection(user)
    deployment.start("worker", "--concurrency", "2")
    world = sandbox.world
    signing_key = secrets.token_urlsafe(32)
    key = new_callback_key()
    with receiving(deployment) as server:
        created = requests.post(
            f"{sandbox.calendly_api_url}/webhook_subscriptions",
            json={
                "url": f"{server.url}{CALLBACK_PATH}{key}",
                "events": list(EVENT_TYPE_EVENTS),
                "organization": world.calendly_org_uri,
                "user": user.calendly_user_uri,
                "scope": "user",
                "signing_key": signing_key,
            },
            headers={"Authorization": f"Bearer {user.calendly_token}"},
            timeout=5,
        )
        assert created.status_code == 201, created.text
        deployment.services.webhooks.save(
            Subscription(
                key=key,
                scope="user",
                organization_uri=world.calendly_org_uri,
                user_uri=user.calendly_user_uri,
                connection_id=conn,
                uri=created.json()["resource"]["uri"],
                state=WebhookState.ACTIVE,
                own_signing_key=True,
                created_at=time.time(),
                updated_at=time.time(),
            ),
            SecretStr(signing_key),
        )
        with world.lock:
            mine = sorted(
                uuid
                for uuid, et in world.event_types.items()
                if et.members == [user.calendly_user_uuid]
                and et.active
                and et.deleted_at is None
                and et.type == "StandardEventType"
            )
        assert len(mine) >= 2

        def settled() -> bool:
            return bool(world.deliverer.wait_idle(0.2)) and quiet(deployment, conn)

        world.update_event_type(mine[0], name="First webhook rename")
        wait_for("the first delivery to reach Close", lambda: converged(sandbox, user), 30)

        # Misbehaviour: the next two sent twice, three held and sent reversed, one wrongly signed.
        world.deliverer.set_knobs(duplicate_next=2, reorder_batch=3, wrong_signature_next=1)
        began = time.monotonic()
        world.update_event_type(mine[0], name="Second webhook rename")
        world.create_event_type(user.calendly_user_uuid, name="Made while webhooks misbehave")
        world.delete_event_type(mine[1])
        wait_for("the three changes to reach Close", lambda: converged(sandbox, user), 30)
        took = time.monotonic() - began
        print(f"\nthree changes through misbehaving deliveries reached Close in {took:.2f} s")
        wait_for("deliveries and runs to settle", settled, 30)
        names = {link["name"] for link in our_links(sandbox, user)}
        assert {"Second webhook rename", "Made while webhooks misbehave"} <= names

        # A dropped delivery: Close lags until the poll (here one enqueued sync) heals it.
        world.deliverer.set_knobs(drop_next=1)
        world.update_event_type(mine[0], name="Rename whose delivery is lost")
        wait_for("the drop to be recorded", lambda: world.deliverer.wait_idle(0.2), 10)
        assert not converged(sandbox, user)
        polled = deployment.cli("sync", conn, "--enqueue")
        assert polled.returncode == 0, polled.stderr
        wait_for("the poll to heal the lost delivery", lambda: converged(sandbox, user), 30)

    attempts = world.deliverer.attempts()
    statuses = [a["status"] for a in attempts if a["status"] is not None]
    assert 410 not in statuses
    assert all(a["outcome"] != "gone" for a in attempts)
    assert 401 in statuses  # the wrongly signed attempt, refused, then retried and delivered
    assert {a["outcome"] for a in attempts} >= {"delivered", "dropped"}
