"""What a delivery carries and how it is signed: one envelope per subscription, created_by its
creator, created_at the sandbox time of the change, and the OAuth application's key for every
OAuth-made subscription."""

from __future__ import annotations

from closesync.core.webhooks import EVENT_TYPE_EVENTS
from closesync.sandbox import Sandbox
from closesync.sandbox.config import CALENDLY_WEBHOOK_SIGNING_KEY
from closesync.sandbox.records import iso
from tests.sandbox.conftest import admin, calendly_oauth_token
from tests.sandbox.webhook_helpers import (
    KEY,
    await_idle,
    create_type,
    envelope_of,
    subscribe,
    uuid_of,
)
from tests.sandbox.webhook_receiver import Receiver, verify

OTHER_KEY = "another-signing-key-fedcba9876543210"


def test_created_by_is_each_subscriptions_creator_not_the_types_owner(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """A member's change reaches the owner's organization subscription saying the owner, and
    the member's own subscription saying the member; each body verifies with its own key."""
    owner, member = sandbox.users[0], sandbox.users[1]
    subscribe(sandbox, owner, receiver.url("/org"), "organization", signing_key=KEY)
    subscribe(sandbox, member, receiver.url("/member"), signing_key=OTHER_KEY)
    created = create_type(sandbox, member, name="Member's type")
    await_idle(sandbox)
    by_path = {r.path: r for r in receiver.wait_for(2)}
    assert set(by_path) == {"/org", "/member"}
    assert envelope_of(by_path["/org"])["created_by"] == owner.calendly_user_uri
    assert envelope_of(by_path["/member"])["created_by"] == member.calendly_user_uri
    for path, key in (("/org", KEY), ("/member", OTHER_KEY)):
        got = by_path[path]
        assert envelope_of(got)["payload"]["uri"] == created["uri"]
        assert verify(got.headers["calendly-webhook-signature"], key, got.body), path


def test_owner_made_user_subscription_of_a_member_says_the_owner(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """An admin subscribing a member (user scope) is that subscription's creator and the
    envelope's created_by, though the member owns the event type."""
    owner, member = sandbox.users[0], sandbox.users[1]
    sub = subscribe(sandbox, member, receiver.url("/x"), token=owner.calendly_token)
    assert (sub["user"], sub["creator"]) == (member.calendly_user_uri, owner.calendly_user_uri)
    create_type(sandbox, member)
    got = receiver.wait_for(1)[0]
    assert envelope_of(got)["created_by"] == owner.calendly_user_uri


def test_oauth_subscription_ignores_a_passed_signing_key(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """An OAuth-made subscription that passed signing_key is still signed with the
    application's key (one key for all of an app's subscriptions), never the passed one."""
    member = sandbox.users[1]
    token = calendly_oauth_token(sandbox, member)
    subscribe(sandbox, member, receiver.url(), token=token, signing_key=KEY)
    create_type(sandbox, member)
    got = receiver.wait_for(1)[0]
    signature = got.headers["calendly-webhook-signature"]
    assert verify(signature, CALENDLY_WEBHOOK_SIGNING_KEY, got.body)
    assert not verify(signature, KEY, got.body)
    listed = admin(sandbox, "GET", "/webhooks/subscriptions").json()
    assert [s["key_source"] for s in listed] == ["application"]


def test_created_at_is_the_sandbox_time_of_each_change(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """Each envelope's created_at is the sandbox clock's time of its change (the clock moved
    between them), and the subscription's created_at the time it was made."""
    member = sandbox.users[1]
    made_at = sandbox.world.now()
    sub = subscribe(sandbox, member, receiver.url())
    assert sub["created_at"] == iso(made_at)
    sandbox.world.advance_clock(61.5)
    created_at = sandbox.world.now()
    et = create_type(sandbox, member, name="Timed")
    sandbox.world.advance_clock(30.25)
    updated_at = sandbox.world.now()
    path = f"/calendly/event_types/{uuid_of(et['uri'])}"
    assert admin(sandbox, "PATCH", path, json={"name": "Timed again"}).ok
    sandbox.world.advance_clock(3600)
    deleted_at = sandbox.world.now()
    assert admin(sandbox, "DELETE", path).ok
    sandbox.world.advance_clock(5)  # deliveries are built at the change, not when sent
    await_idle(sandbox)
    got = [envelope_of(r) for r in receiver.wait_for(3)]
    assert [(e["event"], e["created_at"]) for e in got] == list(
        zip(EVENT_TYPE_EVENTS, [iso(created_at), iso(updated_at), iso(deleted_at)], strict=True)
    )
