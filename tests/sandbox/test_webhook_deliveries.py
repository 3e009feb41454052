"""Webhook deliveries over loopback HTTP to a real receiver: signed envelopes of every event,
who gets them, retries with backoff, disabling, 410, the knobs, and a slow or dead receiver
that never holds up the admin API."""

from __future__ import annotations

import itertools
import json
import socket
import time
from typing import Any

import pytest

from closesync.core.webhooks import EVENT_TYPE_EVENTS
from closesync.sandbox import Sandbox, SandboxConfig
from closesync.sandbox.config import CALENDLY_WEBHOOK_SIGNING_KEY
from closesync.sandbox.deliveries import backoff_delay, sign
from tests.sandbox.conftest import admin, cal_call, calendly_oauth_token
from tests.sandbox.webhook_helpers import (
    KEY,
    await_idle,
    create_type,
    deliveries_of,
    envelope_of,
    subscribe,
    uuid_of,
)
from tests.sandbox.webhook_receiver import Receiver, verify


def test_backoff_delay_doubles_up_to_the_cap() -> None:
    """base·2^(attempt-1) seconds, never above the cap."""
    assert [backoff_delay(n, 0.5, 3.0) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_sign_is_hmac_sha256_of_timestamp_dot_body() -> None:
    """The header value is t=<unix>,v1=<hex>, verifiable with the key and the raw body."""
    value = sign("k", 1700000000, b'{"a":1}')
    assert value.startswith("t=1700000000,v1=")
    assert verify(value, "k", b'{"a":1}')
    assert not verify(value, "k", b'{"a":2}')


def test_every_event_is_delivered_signed_with_the_full_event_type(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """Create, rename and delete each arrive once, signed with the subscription's key at the
    sandbox clock's time, carrying the event type as the API renders it."""
    member = sandbox.users[1]
    sub = subscribe(sandbox, member, receiver.url())
    created = create_type(sandbox, member, name="Intro")
    sandbox.world.advance_clock(100)
    renamed = admin(
        sandbox, "PATCH", f"/calendly/event_types/{uuid_of(created['uri'])}", json={"name": "Hi"}
    ).json()
    deleted = admin(sandbox, "DELETE", f"/calendly/event_types/{uuid_of(created['uri'])}").json()
    await_idle(sandbox)
    got = receiver.wait_for(3)
    assert [envelope_of(r)["event"] for r in got] == list(EVENT_TYPE_EVENTS)
    assert [envelope_of(r)["payload"] for r in got] == [created, renamed, deleted]
    assert deleted["deleted_at"] is not None
    fetched = cal_call(
        sandbox, "GET", f"/event_types/{uuid_of(created['uri'])}", member.calendly_token
    )
    assert fetched.json()["resource"] == deleted
    for received in got:
        envelope = envelope_of(received)
        assert set(envelope) == {"event", "created_at", "created_by", "payload"}
        assert envelope["created_by"] == member.calendly_user_uri
        assert received.path == "/webhooks/calendly/k1"
        assert received.headers["content-type"] == "application/json"
        assert verify(received.headers["calendly-webhook-signature"], KEY, received.body)
    stamps = [r.headers["calendly-webhook-signature"].split(",")[0] for r in got]
    assert stamps[0] == f"t={int(sandbox.world.now()) - 100}"
    assert stamps[1] == f"t={int(sandbox.world.now())}"
    attempts = deliveries_of(sandbox)
    assert [(a["subscription"], a["outcome"], a["status"], a["attempt"]) for a in attempts] == [
        (sub["uri"], "delivered", 200, 1)
    ] * 3
    assert [a["event_type"] for a in attempts] == [created["uri"]] * 3


def test_oauth_subscription_is_signed_with_the_applications_key(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """Without signing_key an OAuth-made subscription is signed with the app's key, which the
    admin API can change."""
    member = sandbox.users[1]
    token = calendly_oauth_token(sandbox, member)
    subscribe(sandbox, member, receiver.url(), token=token, signing_key=None)
    create_type(sandbox, member)
    first = receiver.wait_for(1)[0]
    assert verify(
        first.headers["calendly-webhook-signature"], CALENDLY_WEBHOOK_SIGNING_KEY, first.body
    )
    assert admin(sandbox, "PUT", "/config", json={"calendly_webhook_signing_key": "new-app-key"}).ok
    create_type(sandbox, member)
    second = receiver.wait_for(2)[1]
    assert verify(second.headers["calendly-webhook-signature"], "new-app-key", second.body)


def test_pat_subscription_without_key_is_signed_with_a_key_nobody_knows(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """A PAT-made subscription without signing_key gets a random key: the app key fails."""
    member = sandbox.users[1]
    subscribe(sandbox, member, receiver.url(), signing_key=None)
    create_type(sandbox, member)
    got = receiver.wait_for(1)[0]
    signature = got.headers["calendly-webhook-signature"]
    assert not verify(signature, CALENDLY_WEBHOOK_SIGNING_KEY, got.body)
    assert admin(sandbox, "GET", "/webhooks/subscriptions").json()[0]["key_source"] == "random"


def test_organization_and_host_subscriptions_get_team_changes_strangers_none(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """An organization subscription gets every type; a user subscription gets its own and its
    team types' (hosts before and after a membership change), not another user's solo type."""
    owner, host, stranger = sandbox.users
    org = subscribe(sandbox, owner, receiver.url("/org"), "organization")
    host_sub = subscribe(sandbox, host, receiver.url("/host"))
    subscribe(sandbox, stranger, receiver.url("/stranger"))
    team = create_type(
        sandbox, owner, pooling_type="round_robin", members=[host.calendly_user_uuid]
    )
    create_type(sandbox, owner, name="Owner solo")
    changed = admin(
        sandbox,
        "POST",
        f"/calendly/event_types/{uuid_of(team['uri'])}/members",
        json={"remove": [host.calendly_user_uuid]},
    )
    assert changed.ok
    await_idle(sandbox)
    by_path: dict[str, list[tuple[str, str]]] = {}
    for received in receiver.received:
        envelope = envelope_of(received)
        by_path.setdefault(received.path, []).append(
            (envelope["event"], envelope["payload"]["uri"])
        )
    assert by_path["/host"] == [
        ("event_type.created", team["uri"]),
        ("event_type.updated", team["uri"]),
    ]
    assert len(by_path["/org"]) == 3
    assert "/stranger" not in by_path
    assert {a["subscription"] for a in deliveries_of(sandbox)} == {org["uri"], host_sub["uri"]}


def test_failures_retry_with_backoff_then_disable(sandbox: Sandbox, receiver: Receiver) -> None:
    """A receiver answering 500 gets retries at growing intervals, then the subscription is
    disabled (retry_started_at set) and gets nothing more."""
    member = sandbox.users[1]
    config = {"webhook_disable_after": 4, "webhook_backoff_base": 0.05, "webhook_backoff_cap": 1}
    assert admin(sandbox, "PUT", "/config", json=config).ok
    receiver.default_status = 500
    sub = subscribe(sandbox, member, receiver.url())
    create_type(sandbox, member)
    await_idle(sandbox)
    got = receiver.wait_for(4)
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(got)]
    assert all(gap >= 0.05 * 2**n * 0.9 for n, gap in enumerate(gaps)), gaps
    attempts = deliveries_of(sandbox)
    assert [(a["attempt"], a["outcome"], a["status"]) for a in attempts] == [
        (n, "failed", 500) for n in (1, 2, 3, 4)
    ]
    # The frozen sandbox clock says nothing of the gaps; the monotonic sent_at does.
    assert len({a["at"] for a in attempts}) == 1
    sent_gaps = [b["sent_at"] - a["sent_at"] for a, b in itertools.pairwise(attempts)]
    assert all(gap >= 0.05 * 2**n for n, gap in enumerate(sent_gaps)), sent_gaps
    assert all(abs(s - r) < 0.25 for s, r in zip(sent_gaps, gaps, strict=True)), (sent_gaps, gaps)
    resource = cal_call(
        sandbox, "GET", f"/webhook_subscriptions/{uuid_of(sub['uri'])}", member.calendly_token
    ).json()["resource"]
    assert resource["state"] == "disabled"
    assert resource["retry_started_at"] is not None
    create_type(sandbox, member)
    await_idle(sandbox)
    assert len(receiver.received) == 4
    assert len(deliveries_of(sandbox)) == 4


def test_a_retry_that_succeeds_clears_retry_started_at(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """503 then 200: two attempts of one delivery, the subscription stays active."""
    member = sandbox.users[1]
    receiver.answer(503)
    sub = subscribe(sandbox, member, receiver.url())
    create_type(sandbox, member)
    await_idle(sandbox)
    got = receiver.wait_for(2)
    assert got[0].body == got[1].body
    assert [(a["attempt"], a["status"]) for a in deliveries_of(sandbox)] == [(1, 503), (2, 200)]
    resource = admin(sandbox, "GET", "/webhooks/subscriptions").json()[0]
    assert resource["uri"] == sub["uri"]
    assert (resource["state"], resource["retry_started_at"], resource["failures"]) == (
        "active",
        None,
        0,
    )


@pytest.mark.parametrize("status", [302, 307, 308])
def test_a_redirect_is_a_failure_and_is_not_followed(
    sandbox: Sandbox, receiver: Receiver, status: int
) -> None:
    """A redirect (307/308 would keep the POST if followed) counts as failed and is retried at
    the same URL; nothing ever reaches its Location."""
    member = sandbox.users[1]
    receiver.answer(status)
    subscribe(sandbox, member, receiver.url())
    create_type(sandbox, member)
    await_idle(sandbox)
    assert [(r.method, r.path) for r in receiver.received] == [
        ("POST", "/webhooks/calendly/k1")
    ] * 2
    assert [(a["outcome"], a["status"]) for a in deliveries_of(sandbox)] == [
        ("failed", status),
        ("delivered", 200),
    ]


def test_410_deletes_the_subscription_without_retry(sandbox: Sandbox, receiver: Receiver) -> None:
    """One 410 answer and the subscription is gone (404), with no second attempt."""
    member = sandbox.users[1]
    receiver.default_status = 410
    sub = subscribe(sandbox, member, receiver.url())
    create_type(sandbox, member)
    await_idle(sandbox)
    assert [(a["outcome"], a["status"]) for a in deliveries_of(sandbox)] == [("gone", 410)]
    path = f"/webhook_subscriptions/{uuid_of(sub['uri'])}"
    assert cal_call(sandbox, "GET", path, member.calendly_token).status_code == 404
    create_type(sandbox, member)
    await_idle(sandbox)
    assert len(receiver.received) == 1


def test_drop_knob_loses_the_next_delivery_only(sandbox: Sandbox, receiver: Receiver) -> None:
    """drop_next=1: the first change never arrives, the second does."""
    member = sandbox.users[1]
    subscribe(sandbox, member, receiver.url())
    knobs = admin(sandbox, "PUT", "/webhooks/knobs", json={"drop_next": 1}).json()
    assert knobs["drop_next"] == 1
    first = create_type(sandbox, member, name="Lost")
    second = create_type(sandbox, member, name="Kept")
    await_idle(sandbox)
    assert [envelope_of(r)["payload"]["uri"] for r in receiver.received] == [second["uri"]]
    assert [(a["event_type"], a["outcome"]) for a in deliveries_of(sandbox)] == [
        (first["uri"], "dropped"),
        (second["uri"], "delivered"),
    ]
    assert admin(sandbox, "GET", "/webhooks/knobs").json()["drop_next"] == 0


def test_drop_rate_one_loses_every_delivery(sandbox: Sandbox, receiver: Receiver) -> None:
    """drop_rate=1 sends nothing at all."""
    member = sandbox.users[1]
    subscribe(sandbox, member, receiver.url())
    assert admin(sandbox, "PUT", "/webhooks/knobs", json={"drop_rate": 1}).ok
    for _ in range(3):
        create_type(sandbox, member)
    await_idle(sandbox)
    assert receiver.received == []
    assert [a["outcome"] for a in deliveries_of(sandbox)] == ["dropped"] * 3


def test_duplicate_knob_sends_the_same_delivery_twice(sandbox: Sandbox, receiver: Receiver) -> None:
    """duplicate_next=1: two identical bodies, each validly signed."""
    member = sandbox.users[1]
    subscribe(sandbox, member, receiver.url())
    assert admin(sandbox, "PUT", "/webhooks/knobs", json={"duplicate_next": 1}).ok
    create_type(sandbox, member)
    await_idle(sandbox)
    got = receiver.wait_for(2)
    assert len(receiver.received) == 2
    assert got[0].body == got[1].body
    assert all(verify(r.headers["calendly-webhook-signature"], KEY, r.body) for r in got)


def test_delay_knob_holds_each_delivery_and_idle_says_so(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """delay_seconds=1: the queue is not idle at once and the delivery arrives 1 s later."""
    member = sandbox.users[1]
    subscribe(sandbox, member, receiver.url())
    assert admin(sandbox, "PUT", "/webhooks/knobs", json={"delay_seconds": 1.0}).ok
    started = time.monotonic()
    create_type(sandbox, member)
    state = admin(sandbox, "GET", "/webhooks/idle").json()
    assert (state["idle"], state["queued"]) == (False, 1)
    got = receiver.wait_for(1)[0]
    assert got.at - started >= 1.0


def test_reorder_knob_sends_a_batch_reversed(sandbox: Sandbox, receiver: Receiver) -> None:
    """reorder_batch=3: three renames are held, then arrive last first."""
    member = sandbox.users[1]
    subscribe(sandbox, member, receiver.url())
    et = create_type(sandbox, member, name="v0")
    receiver.wait_for(1)
    assert admin(sandbox, "PUT", "/webhooks/knobs", json={"reorder_batch": 3}).ok
    for n in (1, 2):
        admin(
            sandbox, "PATCH", f"/calendly/event_types/{uuid_of(et['uri'])}", json={"name": f"v{n}"}
        )
    assert admin(sandbox, "GET", "/webhooks/idle").json()["held"] == 2
    admin(sandbox, "PATCH", f"/calendly/event_types/{uuid_of(et['uri'])}", json={"name": "v3"})
    await_idle(sandbox)
    names = [envelope_of(r)["payload"]["name"] for r in receiver.wait_for(4)]
    assert names == ["v0", "v3", "v2", "v1"]


def test_reorder_knob_set_to_zero_releases_a_held_batch(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """A batch that never fills is released, reversed, when the knob goes back to 0."""
    member = sandbox.users[1]
    subscribe(sandbox, member, receiver.url())
    assert admin(sandbox, "PUT", "/webhooks/knobs", json={"reorder_batch": 5}).ok
    create_type(sandbox, member, name="a")
    create_type(sandbox, member, name="b")
    assert admin(sandbox, "GET", "/webhooks/idle").json()["idle"] is False
    assert admin(sandbox, "PUT", "/webhooks/knobs", json={"reorder_batch": 0}).ok
    await_idle(sandbox)
    assert [envelope_of(r)["payload"]["name"] for r in receiver.received] == ["b", "a"]


def test_wrong_signature_knob_is_rejected_then_retried_correctly(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """wrong_signature_next=1: a verifying receiver refuses the first attempt; the retry is
    signed right and accepted."""
    member = sandbox.users[1]
    receiver.verify_with = KEY
    subscribe(sandbox, member, receiver.url())
    assert admin(sandbox, "PUT", "/webhooks/knobs", json={"wrong_signature_next": 1}).ok
    create_type(sandbox, member)
    await_idle(sandbox)
    got = receiver.wait_for(2)
    assert not verify(got[0].headers["calendly-webhook-signature"], KEY, got[0].body)
    assert verify(got[1].headers["calendly-webhook-signature"], KEY, got[1].body)
    assert [(a["signature"], a["status"]) for a in deliveries_of(sandbox)] == [
        ("wrong", 400),
        ("valid", 200),
    ]


@pytest.mark.parametrize(
    ("knobs", "word"),
    [
        ({"drop_next": -1}, "drop_next"),
        ({"shuffle": 1}, "shuffle"),
        ({"drop_rate": 2}, "drop_rate"),
    ],
)
def test_bad_knob_answers_400_naming_it(sandbox: Sandbox, knobs: dict[str, Any], word: str) -> None:
    """An unknown knob or a bad value is a 400 whose error names it."""
    answer = admin(sandbox, "PUT", "/webhooks/knobs", json=knobs)
    assert answer.status_code == 400
    assert word in answer.json()["error"]


def test_slow_receiver_never_holds_up_the_admin_api(sandbox: Sandbox, receiver: Receiver) -> None:
    """While a receiver holds every delivery, admin changes still answer at once."""
    member = sandbox.users[1]
    receiver.hold = True
    subscribe(sandbox, member, receiver.url())
    create_type(sandbox, member)
    receiver.wait_for(1)
    started = time.monotonic()
    for n in range(5):
        create_type(sandbox, member, name=f"Busy {n}")
    assert time.monotonic() - started < receiver.hold_seconds / 2
    state = admin(sandbox, "GET", "/webhooks/idle").json()
    assert (state["in_flight"], state["queued"]) == (1, 5)
    receiver.release()
    await_idle(sandbox)
    assert len(receiver.received) == 6


def test_parallel_mode_sends_one_subscriptions_deliveries_at_once(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """webhook_serial_per_subscription false: three held deliveries of one subscription are
    in flight together (one thread each)."""
    member = sandbox.users[1]
    assert admin(sandbox, "PUT", "/config", json={"webhook_serial_per_subscription": False}).ok
    receiver.hold = True
    subscribe(sandbox, member, receiver.url())
    for n in range(3):
        create_type(sandbox, member, name=f"parallel {n}")
    assert len(receiver.wait_for(3)) == 3
    assert admin(sandbox, "GET", "/webhooks/idle").json()["in_flight"] == 3
    receiver.release()
    await_idle(sandbox)
    assert [a["outcome"] for a in deliveries_of(sandbox)] == ["delivered"] * 3


def test_a_delivery_queued_for_a_deleted_subscription_is_skipped(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """Deleting a subscription while its next delivery waits: that delivery is never sent."""
    member = sandbox.users[1]
    receiver.hold = True
    sub = subscribe(sandbox, member, receiver.url())
    create_type(sandbox, member, name="first")
    receiver.wait_for(1)
    create_type(sandbox, member, name="second")
    path = f"/webhook_subscriptions/{uuid_of(sub['uri'])}"
    assert cal_call(sandbox, "DELETE", path, member.calendly_token).status_code == 204
    receiver.release()
    await_idle(sandbox)
    assert len(receiver.received) == 1
    assert [a["outcome"] for a in deliveries_of(sandbox)] == ["delivered", "skipped"]


def test_read_timeout_and_dead_receiver_are_failures(sandbox: Sandbox, receiver: Receiver) -> None:
    """A receiver slower than the read timeout, and a port that refuses connections, both
    count as failed, named by the error class only (no URL, no key)."""
    member, other = sandbox.users[1], sandbox.users[2]
    config = {"webhook_read_timeout": 0.3, "webhook_disable_after": 1}
    assert admin(sandbox, "PUT", "/config", json=config).ok
    receiver.hold = True
    subscribe(sandbox, member, receiver.url())
    # Bound but never listening: connections are refused, and no other socket can take the port.
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        subscribe(sandbox, other, f"http://127.0.0.1:{dead.getsockname()[1]}/webhooks/calendly/d")
        create_type(sandbox, member)
        create_type(sandbox, other)
        await_idle(sandbox)
    errors = sorted(a["error"] for a in deliveries_of(sandbox))
    assert errors == ["ConnectionError", "ReadTimeout"]
    listing = json.dumps(deliveries_of(sandbox))
    assert KEY not in listing
    assert "/webhooks/calendly/" not in listing


def test_stop_ends_delivery_threads_promptly_even_mid_attempt(receiver: Receiver) -> None:
    """stop() returns within seconds while a receiver holds a delivery, and sends no more."""
    sb = Sandbox.start(SandboxConfig(seed=1, freeze_clock=True))
    try:
        member = sb.users[1]
        receiver.hold = True
        subscribe(sb, member, receiver.url())
        create_type(sb, member)
        create_type(sb, member)
        receiver.wait_for(1)
    finally:
        started = time.monotonic()
        sb.stop()
    assert time.monotonic() - started < 3.0
    assert sb.world.deliverer.alive() == 0
    receiver.release()
    assert len(receiver.received) == 1
