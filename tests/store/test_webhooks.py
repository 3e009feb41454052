"""WebhookStore: the subscriptions closesync owns, their indexes and sealed signing keys."""

from __future__ import annotations

import redis
from pydantic import SecretStr

from closesync.core.webhooks import (
    ServedIndex,
    Subscription,
    WebhookState,
    callback_url,
    new_key,
)
from closesync.store.keys import Keys
from closesync.store.secretbox import FernetBox, generate_key
from closesync.store.webhooks import WebhookStore

ORG = "https://api.calendly.com/organizations/ORG1"


def _user_sub(conn_id: str = "conn_aaaaaaaaaaaa") -> Subscription:
    return Subscription(
        key=new_key(),
        scope="user",
        organization_uri=ORG,
        user_uri="https://api.calendly.com/users/U1",
        connection_id=conn_id,
        own_signing_key=True,
        created_at=1.0,
        updated_at=1.0,
    )


def test_saved_subscription_is_found_by_key_and_owner(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A saved record comes back by its key and by its connection; its key is sealed."""
    store = WebhookStore(redis_client, keys, FernetBox([generate_key()]))
    sub = _user_sub()
    store.save(sub, SecretStr("whsec_very_secret"))
    assert store.find(sub.key) == sub
    assert store.for_connection("conn_aaaaaaaaaaaa") == sub
    secret = store.signing_key(sub.key)
    assert secret is not None
    assert secret.get_secret_value() == "whsec_very_secret"
    stored = redis_client.get(keys.webhook_signing_key(sub.key))
    assert stored is not None
    assert "whsec_very_secret" not in str(stored)
    assert store.all() == [sub]
    store.note_delivery(sub.key, 1234.5)
    assert store.last_delivery(sub.key) == 1234.5


def test_organization_subscription_without_own_key(redis_client: redis.Redis, keys: Keys) -> None:
    """An OAuth-made subscription has no key of its own: the application's key signs it."""
    store = WebhookStore(redis_client, keys, FernetBox([generate_key()]))
    sub = Subscription(
        key=new_key(),
        scope="organization",
        organization_uri=ORG,
        grant_ref="ORG1",
        state=WebhookState.ACTIVE,
        created_at=1.0,
        updated_at=2.0,
    )
    store.save(sub)
    assert store.for_organization("ORG1") == sub
    assert store.signing_key(sub.key) is None


def test_delete_keeps_a_newer_subscription_of_the_same_owner(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """Deleting an old record leaves the owner's index on the newer one."""
    store = WebhookStore(redis_client, keys, FernetBox([generate_key()]))
    old, new = _user_sub(), _user_sub()
    store.save(old)
    store.save(new)
    store.delete(old)
    assert store.find(old.key) is None
    assert store.for_connection("conn_aaaaaaaaaaaa") == new
    store.delete(new)
    assert store.for_connection("conn_aaaaaaaaaaaa") is None
    assert store.all() == []


def test_callback_url_joins_base_and_key() -> None:
    assert callback_url("https://sync.example.com/", "k1") == (
        "https://sync.example.com/webhooks/calendly/k1"
    )


def test_served_index_of_current_records_ignores_a_stale_active_leftover(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A leftover ACTIVE record the owner index no longer names never shadows the current
    PENDING one: the connection is not taken for webhook-served (so it keeps being polled)."""
    store = WebhookStore(redis_client, keys, FernetBox([generate_key()]))
    current = _user_sub()
    stale = current.model_copy(
        update={"key": "zzzz-" + new_key(), "state": WebhookState.ACTIVE, "uri": "u"}
    )
    store.save(stale)
    store.save(current)  # the index names the current, PENDING one
    assert {s.key for s in store.all()} == {current.key, stale.key}
    assert [s.key for s in store.current()] == [current.key]
    served = ServedIndex(store.current())
    assert served.active("conn_aaaaaaaaaaaa", None) is False
    assert served.served("conn_aaaaaaaaaaaa", None).state == "pending"
    # What the fan-out and status did before: every record, the leftover last, wins.
    assert ServedIndex(store.all()).active("conn_aaaaaaaaaaaa", None) is True
