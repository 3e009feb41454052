"""The indexes a webhook delivery reads: who holds an event type, whom an organization serves,
and the replay marks of deliveries taken (real Redis)."""

from __future__ import annotations

import redis

from closesync.core.plan import LinkRecord
from closesync.store.connections import ConnectionStore
from closesync.store.keys import Keys
from closesync.store.secretbox import FernetBox, generate_key
from closesync.store.sync_state import SyncState
from closesync.store.webhooks import WebhookStore
from tests.store.test_state import connection, grants

C1, C2 = "conn_000000000001", "conn_000000000002"
U2 = "https://api.calendly.com/users/U2"


def _record(event_type: str) -> LinkRecord:
    return LinkRecord(
        fingerprint="fp", event_type_uri=f"https://api.calendly.com/event_types/{event_type}"
    )


def _stores(client: redis.Redis, keys: Keys) -> tuple[ConnectionStore, SyncState]:
    return ConnectionStore(client, keys, FernetBox([generate_key()])), SyncState(client, keys)


def test_holders_follow_record_writes_and_forgets(redis_client: redis.Redis, keys: Keys) -> None:
    """A link record written adds its connection to the type's holders; forgetting drops it."""
    store, sync = _stores(redis_client, keys)
    store.save(connection(C1), grants())
    store.save(connection(C2, close_user_id="user_2", calendly_user_uri=U2), grants())
    sync.record_write(C1, "U1:TEAM", _record("TEAM"))
    sync.record_write(C2, "U2:TEAM", _record("TEAM"))
    sync.record_write(C1, "U1:SOLO", _record("SOLO"))
    assert sync.holders("TEAM") == {C1, C2}
    assert sync.holders("SOLO") == {C1}
    sync.forget(C2, "U2:TEAM")
    assert sync.holders("TEAM") == {C1}
    assert sync.holders("NONE") == set()


def test_holders_follow_replaced_records(redis_client: redis.Redis, keys: Keys) -> None:
    """A backfill's rebuilt records move the holders entries with them."""
    store, sync = _stores(redis_client, keys)
    store.save(connection(C1), grants())
    sync.record_write(C1, "U1:OLD", _record("OLD"))
    sync.replace_records(C1, {"U1:NEW": _record("NEW")})
    assert sync.holders("OLD") == set()
    assert sync.holders("NEW") == {C1}


def test_holders_dropped_by_remove_and_by_reconnect_to_another_user(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A removed connection, or one reconnected to another Calendly user, holds nothing."""
    store, sync = _stores(redis_client, keys)
    store.save(connection(C1), grants())
    sync.record_write(C1, "U1:A", _record("A"))
    store.save(connection(C1, calendly_user_uri="https://api.calendly.com/users/U9"), grants())
    assert sync.holders("A") == set()
    sync.record_write(C1, "U9:B", _record("B"))
    store.remove(C1)
    assert sync.holders("B") == set()
    assert not redis_client.exists(keys.event_type_holders("B"))


def test_organization_connections_follow_saves_moves_and_removal(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """The set of an organization's connections follows calendly_grant_ref as it is saved."""
    store, _ = _stores(redis_client, keys)
    store.save(connection(C1, calendly_grant_ref="ORG1"), grants())
    member = connection(C2, close_user_id="user_2", calendly_grant_ref="ORG1", calendly_user_uri=U2)
    store.save(member, grants())
    assert store.of_organization("ORG1") == {C1, C2}
    store.save(connection(C2, close_user_id="user_2", calendly_user_uri=U2), grants())
    assert store.of_organization("ORG1") == {C1}
    assert store.organization_refs([C1, C2, "conn_gone"]) == {C1: "ORG1", C2: None}
    store.remove(C1)
    assert store.of_organization("ORG1") == set()


def test_organization_connections_saved_before_the_index_are_found_once(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """Records from before the set existed are added by one scan, then the set is trusted."""
    store, _ = _stores(redis_client, keys)
    store.save(connection(C1, calendly_grant_ref="ORG1"), grants())
    redis_client.delete(keys.calendly_org_connections("ORG1"))  # as an older release left it
    assert store.of_organization("ORG1") == {C1}
    assert redis_client.get(keys.calendly_org_index_complete()) == "1"
    redis_client.delete(keys.calendly_org_connections("ORG1"))
    assert store.of_organization("ORG1") == set()  # no second scan


def test_id_of_calendly_user_reads_the_index(redis_client: redis.Redis, keys: Keys) -> None:
    """The owner of a delivery's event type is found by its Calendly user uuid."""
    store, _ = _stores(redis_client, keys)
    store.save(connection(C1), grants())
    assert store.id_of_calendly_user("U1") == C1
    assert store.id_of_calendly_user("U7") is None


def test_claim_delivery_pending_then_done_or_released(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A delivery is taken once within its TTL: pending until done (its TTL kept); a released
    one can be taken again."""
    store = WebhookStore(redis_client, keys, FernetBox([generate_key()]))
    assert store.claim_delivery("d1", 420) == "taken"
    assert store.claim_delivery("d1", 420) == "pending"
    store.delivery_done("d1")
    assert store.claim_delivery("d1", 420) == "done"
    assert 400 < redis_client.ttl(keys.webhook_delivery("d1")) <= 420
    store.release_delivery("d1")
    assert store.claim_delivery("d1", 420) == "taken"
