"""Webhook subscriptions made as connections and organizations connect, deleted as they leave or
pause, and the reconciliation; against the sandbox over loopback HTTP and a real Redis."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests

from closesync.connect.leaving import remove_connection
from closesync.connect.saving import save_connection
from closesync.connect.webhook_reconcile import Reconciler, targets
from closesync.connect.webhooks import NO_APP_KEY, Subscriptions
from closesync.core.connection import Connection, ConnectionState
from closesync.core.errors import RemovalIncomplete
from closesync.core.retry import WaitBudget
from closesync.core.webhooks import CALLBACK_PATH, WebhookState, callback_url
from closesync.sandbox import Sandbox
from closesync.sandbox.config import CALENDLY_WEBHOOK_SIGNING_KEY
from closesync.sandbox.connections import sandbox_connection
from closesync.settings import Settings
from closesync.store.key_rotation import check_keys, rotate_keys
from closesync.store.keys import Keys
from closesync.store.secretbox import FernetBox, generate_key
from closesync.store.webhooks import WebhookStore
from closesync.wiring.services import Services
from tests._oauth import all_redis_text, follow, sandbox_env, web_process
from tests._sandbox import running_sandbox

# Refused at once, should the sandbox deliver: no DNS lookup, no wait.
BASE = "http://127.0.0.1:9/closesync"


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with running_sandbox(users=3) as sandbox:
        yield sandbox


def make_services(
    sb: Sandbox,
    client: redis.Redis,
    redis_url: str,
    prefix: str,
    key: str | None = None,
    **extra: Any,
) -> Services:
    env = sandbox_env(sb, redis_url, prefix, key or generate_key())
    values: dict[str, Any] = {k.lower(): v for k, v in env.items()}
    values.update({"public_base_url": BASE, **extra})
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    return Services.build(settings, redis_client=client)


@pytest.fixture
def services(sb: Sandbox, redis_client: redis.Redis, redis_url: str, keys: Keys) -> Services:
    return make_services(
        sb, redis_client, redis_url, keys.prefix, calendly_webhook_signing_key="app-key-123"
    )


def at_calendly(sb: Sandbox) -> list[dict[str, Any]]:
    details: list[dict[str, Any]] = sb.world.subscription_details()
    return details


def add_pat_connection(services: Services, sb: Sandbox, index: int) -> Connection:
    connection, grants = sandbox_connection(sb.users[index], time.time())
    save_connection(services, None, connection, grants)
    return connection


def test_pat_connection_gets_a_user_subscription_signed_with_its_own_sealed_key(
    sb: Sandbox, services: Services, redis_client: redis.Redis
) -> None:
    """A personal-access-token connection gets one active user-scope subscription to the three
    events, at its own URL, with a key closesync generated, stored sealed only."""
    connection = add_pat_connection(services, sb, 1)
    sub = services.webhooks.for_connection(connection.id)
    assert sub is not None
    assert (sub.state, sub.scope, sub.own_signing_key) == (WebhookState.ACTIVE, "user", True)
    [there] = at_calendly(sb)
    assert there["uri"] == sub.uri
    assert there["callback_url"] == callback_url(BASE, sub.key)
    assert there["scope"] == "user"
    assert there["user"] == sb.users[1].calendly_user_uri
    assert there["key_source"] == "given"
    assert sorted(there["events"]) == [
        "event_type.created",
        "event_type.deleted",
        "event_type.updated",
    ]
    signing_key = services.webhooks.signing_key(sub.key)
    assert signing_key is not None
    assert len(signing_key.get_secret_value()) >= 32
    assert signing_key.get_secret_value() not in all_redis_text(redis_client)


def test_reconnect_of_the_same_user_keeps_its_active_subscription(
    sb: Sandbox, services: Services
) -> None:
    """Connecting the same user again makes no second subscription."""
    connection = add_pat_connection(services, sb, 1)
    first = services.webhooks.for_connection(connection.id)
    again, grants = sandbox_connection(sb.users[1], time.time(), connection_id=connection.id)
    save_connection(services, connection, again, grants)
    assert services.webhooks.for_connection(connection.id) == first
    assert len(at_calendly(sb)) == 1


def test_oauth_connection_is_signed_by_the_application_key_and_keeps_none(
    sb: Sandbox, services: Services
) -> None:
    """Connected through OAuth: the subscription has no key of its own (the app's signs it)."""
    user = sb.users[1]
    with web_process(services) as web, requests.Session() as browser:
        sb.world.set_oauth_next("close", user_email=user.email)
        sb.world.set_oauth_next("calendly", user_email=user.email)
        answer, _ = follow(browser, web.url + "/connect")
        assert answer is not None
        assert answer.status_code == 200, answer.text
    [connection] = services.connections.list()
    sub = services.webhooks.for_connection(connection.id)
    assert sub is not None
    assert sub.state is WebhookState.ACTIVE
    assert sub.own_signing_key is False
    assert services.webhooks.signing_key(sub.key) is None
    [there] = at_calendly(sb)
    assert there["key_source"] == "application"
    assert sb.world.config.calendly_webhook_signing_key == CALENDLY_WEBHOOK_SIGNING_KEY


def test_oauth_connection_without_the_application_key_is_refused_and_not_subscribed(
    sb: Sandbox, redis_client: redis.Redis, redis_url: str, keys: Keys
) -> None:
    """No CALENDLY_WEBHOOK_SIGNING_KEY: nothing is made at Calendly; the record says why."""
    services = make_services(sb, redis_client, redis_url, keys.prefix)
    user = sb.users[1]
    with web_process(services) as web, requests.Session() as browser:
        sb.world.set_oauth_next("close", user_email=user.email)
        sb.world.set_oauth_next("calendly", user_email=user.email)
        answer, _ = follow(browser, web.url + "/connect")
        assert answer is not None
        assert answer.status_code == 200, answer.text
    [connection] = services.connections.list()
    sub = services.webhooks.for_connection(connection.id)
    assert sub is not None
    assert (sub.state, sub.reason) == (WebhookState.REFUSED, NO_APP_KEY)
    assert at_calendly(sb) == []


def test_missing_webhooks_scope_is_recorded_refused_and_the_connection_still_syncs(
    sb: Sandbox, services: Services
) -> None:
    """A token without webhooks:write: REFUSED naming the scope; the connect and the poll work."""
    sb.world.update_config(calendly_withheld_scopes="webhooks:write")
    connection = add_pat_connection(services, sb, 1)
    sub = services.webhooks.for_connection(connection.id)
    assert sub is not None
    assert sub.state is WebhookState.REFUSED
    assert sub.reason is not None
    assert "403" in sub.reason
    assert "scope" in sub.reason.lower()
    assert at_calendly(sb) == []
    report = services.engine(wait_budget=5).run(connection.id)
    assert report.outcome.value == "ok"
    assert report.created > 0


def test_calendly_down_leaves_the_subscription_pending_and_reconciliation_makes_it(
    sb: Sandbox, services: Services
) -> None:
    """A 5xx on create: the connect succeeds, PENDING; the daily pass creates it, same key."""
    sb.world.update_config(api="calendly", error_rate=1.0)
    connection = add_pat_connection(services, sb, 1)
    sb.world.update_config(api="calendly", error_rate=0.0)
    pending = services.webhooks.for_connection(connection.id)
    assert pending is not None
    assert pending.state is WebhookState.PENDING
    assert services.connections.get(connection.id).state is ConnectionState.ACTIVE
    asked: list[list[str]] = []
    [outcome] = Reconciler(services, asked.append).run([connection], [])
    assert (outcome.action, outcome.state) == ("retried", "active")
    made = services.webhooks.for_connection(connection.id)
    assert made is not None
    assert made.key == pending.key
    assert [s["uri"] for s in at_calendly(sb)] == [made.uri]


def test_webhooks_disabled_makes_nothing(
    sb: Sandbox, redis_client: redis.Redis, redis_url: str, keys: Keys
) -> None:
    """WEBHOOKS_ENABLED=false: a connection gets no subscription and no record."""
    services = make_services(sb, redis_client, redis_url, keys.prefix, webhooks_enabled=False)
    connection = add_pat_connection(services, sb, 1)
    assert services.webhooks.for_connection(connection.id) is None
    assert at_calendly(sb) == []


def test_remove_deletes_the_subscription_at_calendly_then_the_record(
    sb: Sandbox, services: Services
) -> None:
    """`connections remove` (with --revoke) deletes the subscription first, then forgets it."""
    connection = add_pat_connection(services, sb, 1)
    assert len(at_calendly(sb)) == 1
    remove_connection(services, connection, delete_links=False, revoke=True)
    assert at_calendly(sb) == []
    assert services.webhooks.all() == []


def test_pause_deletes_the_subscription_and_resume_makes_a_new_one(
    sb: Sandbox, services: Services
) -> None:
    """Paused: no subscription at Calendly or in Redis; resumed: a fresh one."""
    connection = add_pat_connection(services, sb, 1)
    old = services.webhooks.for_connection(connection.id)
    assert old is not None
    subs = Subscriptions(services)
    subs.after_state_change(services.connections.set_state(connection.id, ConnectionState.PAUSED))
    assert at_calendly(sb) == []
    assert services.webhooks.for_connection(connection.id) is None
    subs.after_state_change(services.connections.set_state(connection.id, ConnectionState.ACTIVE))
    new = services.webhooks.for_connection(connection.id)
    assert new is not None
    assert new.state is WebhookState.ACTIVE
    assert new.key != old.key
    assert [s["uri"] for s in at_calendly(sb)] == [new.uri]


def test_reconcile_recreates_a_disabled_subscription_then_asks_a_sync(
    sb: Sandbox, services: Services
) -> None:
    """Disabled at Calendly: deleted, made again (new key), and the connection's sync asked."""
    connection = add_pat_connection(services, sb, 1)
    old = services.webhooks.for_connection(connection.id)
    assert old is not None
    assert old.uri is not None
    sb.world.disable_subscription(old.uri.rsplit("/", 1)[1])
    asked: list[list[str]] = []
    [outcome] = Reconciler(services, asked.append).run([connection], [])
    assert outcome.action == "recreated"
    assert outcome.resynced == [connection.id]
    assert asked == [[connection.id]]
    new = services.webhooks.for_connection(connection.id)
    assert new is not None
    assert new.state is WebhookState.ACTIVE
    assert new.key != old.key
    [there] = at_calendly(sb)
    assert (there["uri"], there["state"]) == (new.uri, "active")


def test_reconcile_recreates_one_deleted_at_calendly(sb: Sandbox, services: Services) -> None:
    """Gone from Calendly (deleted there, a 410): made again and a sync asked."""
    connection = add_pat_connection(services, sb, 1)
    old = services.webhooks.for_connection(connection.id)
    assert old is not None
    assert old.uri is not None
    sb.world.delete_subscription(old.uri.rsplit("/", 1)[1])
    asked: list[list[str]] = []
    [outcome] = Reconciler(services, asked.append).run([connection], [])
    assert (outcome.action, asked) == ("recreated", [[connection.id]])
    assert len(at_calendly(sb)) == 1


def test_reconcile_keeps_an_active_one_and_asks_nothing(sb: Sandbox, services: Services) -> None:
    """Nothing to mend: one listing, no create, no sync asked."""
    connection = add_pat_connection(services, sb, 1)
    before = sb.world.request_counts()
    asked: list[list[str]] = []
    [outcome] = Reconciler(services, asked.append).run([connection], [])
    assert outcome.action == "kept"
    assert asked == []
    after = sb.world.request_counts()
    made = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert made == {"calendly GET /webhook_subscriptions": 1}


def test_reconcile_deletes_an_orphan_of_ours_but_never_a_foreign_subscription(
    sb: Sandbox, services: Services
) -> None:
    """A subscription to our URL with no record goes; one to another URL stays."""
    connection = add_pat_connection(services, sb, 1)
    user = sb.users[1]
    client = services.clients_for(connection, WaitBudget(5)).calendly
    orphan = client.create_webhook_subscription(
        url=f"{BASE}{CALLBACK_PATH}left-behind",
        events=["event_type.updated"],
        organization=user.calendly_organization_uri,
        scope="user",
        user=user.calendly_user_uri,
    )
    foreign = client.create_webhook_subscription(
        url="http://127.0.0.1:9/someone-else/webhooks/calendly/not-ours",
        events=["event_type.updated"],
        organization=user.calendly_organization_uri,
        scope="user",
        user=user.calendly_user_uri,
    )
    [outcome] = Reconciler(services, lambda ids: None).run([connection], [])
    assert outcome.orphans_deleted == 1
    uris = {s["uri"] for s in at_calendly(sb)}
    assert orphan.uri not in uris
    assert foreign.uri in uris
    mine = services.webhooks.for_connection(connection.id)
    assert mine is not None
    assert mine.uri in uris


def test_targets_of_ids_bring_their_organization(sb: Sandbox, services: Services) -> None:
    """`ensure ID` of a personal connection reconciles it alone, and no organization."""
    connection = add_pat_connection(services, sb, 1)
    assert targets(services, [connection.id]) == ([connection], [])


def connect_organization_and_members(
    sb: Sandbox, services: Services, *members: int
) -> list[Connection]:
    """The owner connects the organization, then each member's Close user connects."""
    with web_process(services) as web, requests.Session() as browser:
        sb.world.set_oauth_next("calendly", user_email=sb.users[0].email)
        answer, _ = follow(browser, web.url + "/connect/organization")
        assert answer is not None
        assert "Organization connected" in answer.text
        for index in members:
            sb.world.set_oauth_next("close", user_email=sb.users[index].email)
            answer, _ = follow(browser, web.url + "/connect")
            assert answer is not None
            assert "Connected" in answer.text
    return services.connections.list()


def test_organization_gets_one_organization_subscription_serving_every_member(
    sb: Sandbox, services: Services
) -> None:
    """Organization mode: one organization-scope subscription, no user-scope one per member."""
    members = connect_organization_and_members(sb, services, 1, 2)
    assert len(members) == 2
    [ref] = {c.calendly_grant_ref for c in members}
    assert ref is not None
    sub = services.webhooks.for_organization(ref)
    assert sub is not None
    assert (sub.scope, sub.state, sub.own_signing_key) == (
        "organization",
        WebhookState.ACTIVE,
        False,
    )
    assert all(services.webhooks.for_connection(c.id) is None for c in members)
    [there] = at_calendly(sb)
    assert (there["scope"], there["uri"], there["key_source"]) == (
        "organization",
        sub.uri,
        "application",
    )


def test_organization_subscription_recreated_when_disabled_asks_every_member_a_sync(
    sb: Sandbox, services: Services
) -> None:
    """Disabled: the reconciliation makes it again and asks a sync of every member."""
    members = connect_organization_and_members(sb, services, 1, 2)
    [ref] = {c.calendly_grant_ref for c in members}
    assert ref is not None
    old = services.webhooks.for_organization(ref)
    assert old is not None
    assert old.uri is not None
    sb.world.disable_subscription(old.uri.rsplit("/", 1)[1])
    asked: list[list[str]] = []
    outcomes = Reconciler(services, asked.append).run(*targets(services, None))
    by_scope = {o.scope: o for o in outcomes if o.action != "skipped"}
    assert by_scope["organization"].action == "recreated"
    assert sorted(asked[0]) == sorted(c.id for c in members)
    assert [s["state"] for s in at_calendly(sb)] == ["active"]


def test_last_member_leaving_with_revoke_deletes_the_organization_subscription(
    sb: Sandbox, services: Services
) -> None:
    """When the organization credential goes, its subscription goes first."""
    [member] = connect_organization_and_members(sb, services, 1)
    assert len(at_calendly(sb)) == 1
    remove_connection(services, member, delete_links=False, revoke=True)
    assert at_calendly(sb) == []
    assert services.webhooks.all() == []


def test_key_rotation_reseals_the_webhook_signing_keys(
    sb: Sandbox, redis_client: redis.Redis, redis_url: str, keys: Keys
) -> None:
    """`keys rotate` re-seals a generated signing key too; `keys check` counts it."""
    old = generate_key()
    services = make_services(sb, redis_client, redis_url, keys.prefix, old)
    connection = add_pat_connection(services, sb, 1)
    sub = services.webhooks.for_connection(connection.id)
    assert sub is not None
    before = services.webhooks.signing_key(sub.key)
    new = generate_key()
    both, first = FernetBox([new, old]), FernetBox([new])
    assert check_keys(redis_client, keys, both, first)["older_key"] == 2  # grants + signing key
    assert rotate_keys(redis_client, keys, both) == 2
    assert check_keys(redis_client, keys, both, first)["current"] == 2
    assert WebhookStore(redis_client, keys, first).signing_key(sub.key) == before


def test_reconcile_forgets_records_nothing_owns_and_deletes_their_subscriptions(
    sb: Sandbox, services: Services
) -> None:
    """A record replaced by a newer one of the same connection, and one of a connection that is
    gone: both forgotten; the replaced one's subscription at Calendly is deleted as an orphan."""
    connection = add_pat_connection(services, sb, 1)
    current = services.webhooks.for_connection(connection.id)
    assert current is not None
    user = sb.users[1]
    client = services.clients_for(connection, WaitBudget(5)).calendly
    replaced = client.create_webhook_subscription(
        url=callback_url(BASE, "replaced-key"),
        events=["event_type.updated"],
        organization=user.calendly_organization_uri,
        scope="user",
        user=user.calendly_user_uri,
    )
    stale = current.model_copy(update={"key": "replaced-key", "uri": replaced.uri})
    services.webhooks.save(stale)
    services.webhooks.save(current)  # the index names the current one again
    gone = current.model_copy(update={"key": "gone-key", "connection_id": "conn_00000000dead"})
    services.webhooks.save(gone)
    [outcome] = Reconciler(services, lambda ids: None).run([connection], [])
    assert outcome.orphans_deleted == 1
    assert [s.key for s in services.webhooks.all()] == [current.key]
    assert [s["uri"] for s in at_calendly(sb)] == [current.uri]


def test_remove_whose_credential_is_unreadable_still_forgets_the_record(
    sb: Sandbox, services: Services, redis_client: redis.Redis
) -> None:
    """Grants that no key opens: the removal forgets the subscription record all the same."""
    connection = add_pat_connection(services, sb, 1)
    redis_client.set(services.keys.grants(connection.id), "not-a-sealed-value")
    Subscriptions(services).after_leaving(connection)
    assert services.webhooks.all() == []


def test_reconcile_adopts_a_pending_subscription_whose_create_reached_calendly(
    sb: Sandbox, services: Services
) -> None:
    """A create whose answer was lost: Calendly lists our URL for the pending record's key, so
    the record is adopted as listed (its own signing key kept) and nothing new is made."""
    connection = add_pat_connection(services, sb, 1)
    made = services.webhooks.for_connection(connection.id)
    assert made is not None
    signing_key = services.webhooks.signing_key(made.key)
    pending = made.model_copy(update={"uri": None, "state": WebhookState.PENDING})
    services.webhooks.save(pending, signing_key)
    [outcome] = Reconciler(services, lambda ids: None).run([connection], [])
    assert (outcome.action, outcome.state, outcome.orphans_deleted) == ("retried", "active", 0)
    adopted = services.webhooks.for_connection(connection.id)
    assert adopted is not None
    assert (adopted.key, adopted.uri) == (made.key, made.uri)
    assert services.webhooks.signing_key(made.key) == signing_key
    assert [s["uri"] for s in at_calendly(sb)] == [made.uri]


def test_create_answered_409_adopts_the_subscription_our_earlier_try_made(
    sb: Sandbox, services: Services
) -> None:
    """Retrying a pending record whose first POST did succeed meets a 409: it is adopted."""
    connection = add_pat_connection(services, sb, 1)
    made = services.webhooks.for_connection(connection.id)
    assert made is not None
    pending = made.model_copy(update={"uri": None, "state": WebhookState.PENDING})
    services.webhooks.save(pending)
    subs = Subscriptions(services)
    adopted = subs.create(subs.user_owner(connection), pending)
    assert (adopted.state, adopted.uri, adopted.key) == (WebhookState.ACTIVE, made.uri, made.key)
    assert len(at_calendly(sb)) == 1


def test_reconnect_to_another_calendly_user_leaves_exactly_one_subscription(
    sb: Sandbox, services: Services
) -> None:
    """Reconnected to another Calendly user: the old user's subscription is deleted with the old
    credential (before the new grants replace it), so Calendly holds only the new one."""
    connection = add_pat_connection(services, sb, 1)
    old = services.webhooks.for_connection(connection.id)
    assert old is not None
    other, grants = sandbox_connection(sb.users[2], time.time(), connection_id=connection.id)
    save_connection(services, connection, other, grants)
    new = services.webhooks.for_connection(connection.id)
    assert new is not None
    assert new.state is WebhookState.ACTIVE
    assert new.key != old.key
    assert new.user_uri == sb.users[2].calendly_user_uri
    [there] = at_calendly(sb)
    assert (there["uri"], there["user"]) == (new.uri, sb.users[2].calendly_user_uri)
    assert [s.key for s in services.webhooks.all()] == [new.key]


def test_connect_spends_only_a_short_budget_on_a_rate_limited_webhook_create(
    sb: Sandbox, redis_client: redis.Redis, redis_url: str, keys: Keys
) -> None:
    """Calendly asks 20 s of wait on the create: the connect does not wait it out (the webhook
    budget is a few seconds, not the inline sync's 60), and the record stays PENDING."""
    services = make_services(
        sb, redis_client, redis_url, keys.prefix, inline_wait_budget_seconds=60.0
    )
    assert services.settings.webhook_call_budget_seconds <= 5
    sb.world.add_fault(
        api="calendly", kind="429", method="POST", path_prefix="/webhook_subscriptions", reset=20
    )
    started = time.monotonic()
    connection = add_pat_connection(services, sb, 1)
    assert time.monotonic() - started < 10
    sub = services.webhooks.for_connection(connection.id)
    assert sub is not None
    assert sub.state is WebhookState.PENDING
    assert sub.reason is not None
    assert "429" in sub.reason
    assert services.connections.get(connection.id).state is ConnectionState.ACTIVE


def test_reconcile_after_a_base_url_change_recreates_the_subscription_at_the_new_host(
    sb: Sandbox, services: Services, redis_client: redis.Redis, redis_url: str, keys: Keys
) -> None:
    """PUBLIC_BASE_URL changed: an ACTIVE subscription still posting to the old host is deleted
    and made again at the new URL with a new key, and a sync is asked."""
    connection = add_pat_connection(services, sb, 1)
    old = services.webhooks.for_connection(connection.id)
    assert old is not None
    moved_base = "http://127.0.0.1:9/moved"
    moved = Services.build(
        services.settings.model_copy(update={"public_base_url": moved_base}),
        redis_client=redis_client,
    )
    asked: list[list[str]] = []
    [outcome] = Reconciler(moved, asked.append).run([connection], [])
    assert (outcome.action, outcome.state, asked) == ("recreated", "active", [[connection.id]])
    new = moved.webhooks.for_connection(connection.id)
    assert new is not None
    assert new.key != old.key
    [there] = at_calendly(sb)
    assert (there["uri"], there["callback_url"]) == (new.uri, callback_url(moved_base, new.key))


def test_reconcile_from_a_stale_list_never_resubscribes_a_connection_being_removed(
    sb: Sandbox, services: Services
) -> None:
    """A remove marked the connection and dropped its subscription after the pass read its
    list: the pass reads the removal mark under the owner's lock and makes nothing."""
    connection = add_pat_connection(services, sb, 1)
    assert services.connections.mark_removing(connection.id)
    Subscriptions(services).after_leaving(connection)
    assert at_calendly(sb) == []
    [outcome] = Reconciler(services, lambda ids: None).run([connection], [])
    assert (outcome.action, outcome.reason, outcome.settled) == ("skipped", "removed", True)
    assert at_calendly(sb) == []
    assert services.webhooks.for_connection(connection.id) is None


def test_reconcile_from_a_stale_list_never_resubscribes_a_paused_connection(
    sb: Sandbox, services: Services
) -> None:
    """Paused after the pass read it ACTIVE: the pass reads the state again and makes nothing."""
    connection = add_pat_connection(services, sb, 1)
    paused = services.connections.set_state(connection.id, ConnectionState.PAUSED)
    Subscriptions(services).after_state_change(paused)
    assert at_calendly(sb) == []
    [outcome] = Reconciler(services, lambda ids: None).run([connection], [])
    assert outcome.reason == "paused"
    assert at_calendly(sb) == []


def test_reconcile_waits_out_an_owner_lock_held_elsewhere_and_calls_nothing(
    sb: Sandbox, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another process holds the owner's lifecycle lock, a reconcile of that owner makes
    no Calendly call and reports it failed (busy); once released it proceeds."""
    monkeypatch.setattr("closesync.connect.webhooks.OWNER_LOCK_WAIT_SECONDS", 0.2)
    connection = add_pat_connection(services, sb, 1)
    before = sb.world.request_counts()
    with services.webhooks.owner_lock("user", connection.id, wait=0):
        [outcome] = Reconciler(services, lambda ids: None).run([connection], [])
    assert outcome.failed
    assert outcome.reason is not None
    assert "lock" in outcome.reason
    assert sb.world.request_counts() == before
    [again] = Reconciler(services, lambda ids: None).run([connection], [])
    assert again.action == "kept"


def test_two_reconciles_at_once_make_exactly_one_replacement(
    sb: Sandbox, services: Services
) -> None:
    """Two passes race on a disabled subscription: under the owner's lock one re-creates it and
    the other then keeps the new one; Calendly ends with exactly one active subscription."""
    connection = add_pat_connection(services, sb, 1)
    old = services.webhooks.for_connection(connection.id)
    assert old is not None
    assert old.uri is not None
    sb.world.disable_subscription(old.uri.rsplit("/", 1)[1])
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def one_pass() -> None:
        start.wait(timeout=10)
        [outcome] = Reconciler(services, lambda ids: None).run([connection], [])
        outcomes.append(outcome.action)

    threads = [threading.Thread(target=one_pass) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["kept", "recreated"]
    [there] = at_calendly(sb)
    current = services.webhooks.for_connection(connection.id)
    assert current is not None
    assert (there["uri"], there["state"]) == (current.uri, "active")


def test_remove_whose_calendly_delete_fails_stops_incomplete_and_its_rerun_deletes_it(
    sb: Sandbox, services: Services
) -> None:
    """Calendly fails the delete (503s): the removal stops as RemovalIncomplete with the record
    kept, not forgotten (nothing could list that subscription again); run again, it goes."""
    connection = add_pat_connection(services, sb, 1)
    sub = services.webhooks.for_connection(connection.id)
    assert sub is not None
    sb.world.add_fault(
        api="calendly", kind="503", method="DELETE", path_prefix="/webhook_subscriptions", count=50
    )
    with pytest.raises(RemovalIncomplete, match="503"):
        remove_connection(services, connection, delete_links=False, revoke=True)
    assert services.webhooks.for_connection(connection.id) == sub
    assert [s["uri"] for s in at_calendly(sb)] == [sub.uri]
    sb.world.clear_faults()
    remove_connection(services, connection, delete_links=False, revoke=True)
    assert at_calendly(sb) == []
    assert services.webhooks.all() == []


def test_no_callback_key_in_logs_of_the_lifecycle_and_the_reconciliation(
    sb: Sandbox, services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """Connect, a failed create, reconcile (retry, re-create after disable), pause, resume,
    reconnect to another user, remove, all at DEBUG: no callback key (half of what a delivery
    proves) in any log message, argument or extra field."""
    caplog.set_level(logging.DEBUG)
    keys_seen: set[str] = set()

    def remember(conn_id: str) -> None:
        for sub in services.webhooks.all():
            keys_seen.add(sub.key)

    sb.world.update_config(api="calendly", error_rate=1.0)
    connection = add_pat_connection(services, sb, 1)
    sb.world.update_config(api="calendly", error_rate=0.0)
    remember(connection.id)
    Reconciler(services, lambda ids: None).run([connection], [])
    remember(connection.id)
    sub = services.webhooks.for_connection(connection.id)
    assert sub is not None
    assert sub.uri is not None
    sb.world.disable_subscription(sub.uri.rsplit("/", 1)[1])
    Reconciler(services, lambda ids: None).run([connection], [])
    remember(connection.id)
    subs = Subscriptions(services)
    subs.after_state_change(services.connections.set_state(connection.id, ConnectionState.PAUSED))
    subs.after_state_change(services.connections.set_state(connection.id, ConnectionState.ACTIVE))
    remember(connection.id)
    current = services.connections.get(connection.id)
    other, grants = sandbox_connection(sb.users[2], time.time(), connection_id=connection.id)
    save_connection(services, current, other, grants)
    remember(connection.id)
    remove_connection(
        services, services.connections.get(connection.id), delete_links=False, revoke=True
    )
    assert len(keys_seen) >= 4
    assert caplog.records
    for record in caplog.records:
        text = " ".join([record.getMessage(), repr(record.args), repr(vars(record))])
        for key in keys_seen:
            assert key not in text, record.getMessage()
