"""The one-time index backfills and the reconnect's holders cleanup under concurrent writes (real
Redis). A race is made deterministic by a subclass that lets a second client write at the worst
moment: after the batch was read, before its transaction runs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import redis

from closesync.store.connections import ConnectionStore
from closesync.store.index_backfill import IndexBackfill
from closesync.store.keys import Keys
from closesync.store.secretbox import FernetBox, generate_key
from closesync.store.sync_state import SyncState
from tests.store.test_state import connection, grants
from tests.store.test_webhook_indexes import C1, C2, U2, _record


def _stores(client: redis.Redis, keys: Keys) -> tuple[ConnectionStore, SyncState]:
    return ConnectionStore(client, keys, FernetBox([generate_key()])), SyncState(client, keys)


def test_holders_backfill_indexes_links_from_before_the_index_once(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """Link records written before the holders index get their entries, once: then the flag
    says the index is complete and nothing is scanned again."""
    store, sync = _stores(redis_client, keys)
    store.save(connection(C1), grants())
    store.save(connection(C2, close_user_id="user_2", calendly_user_uri=U2), grants())
    sync.record_write(C1, "U1:TEAM", _record("TEAM"))
    sync.record_write(C2, "U2:TEAM", _record("TEAM"))
    sync.record_write(C2, "U2:SOLO", _record("SOLO"))
    redis_client.delete(keys.event_type_holders("TEAM"), keys.event_type_holders("SOLO"))
    backfill = IndexBackfill(redis_client, keys)
    assert backfill.holders() is True
    assert sync.holders("TEAM") == {C1, C2}
    assert sync.holders("SOLO") == {C2}
    redis_client.delete(keys.event_type_holders("SOLO"))
    assert backfill.holders() is False
    assert sync.holders("SOLO") == set()


class _MoveDuringRead(IndexBackfill):
    """Saves C1 into ORG2 right after the backfill read its batch (once)."""

    def __init__(self, client: redis.Redis, keys: Keys, store: ConnectionStore) -> None:
        super().__init__(client, keys)
        self.store, self.moved = store, False

    def _refs(self, pipe: redis.client.Pipeline, ids: Sequence[str]) -> list[tuple[str, str]]:
        entries = super()._refs(pipe, ids)
        if not self.moved:
            self.moved = True
            self.store.save(connection(C1, calendly_grant_ref="ORG2"), grants())
        return entries


def test_organization_backfill_racing_a_move_leaves_no_stale_entry(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A save moving a connection to another organization while the backfill runs: the batch
    read before it is not written, so the old organization's set does not keep it."""
    store, _ = _stores(redis_client, keys)
    store.save(connection(C1, calendly_grant_ref="ORG1"), grants())
    redis_client.delete(keys.calendly_org_connections("ORG1"))  # as an older release left it
    backfill = _MoveDuringRead(redis_client, keys, store)
    assert backfill.organizations() is True
    assert backfill.moved
    assert not redis_client.sismember(keys.calendly_org_connections("ORG1"), C1)
    assert redis_client.smembers(keys.calendly_org_connections("ORG2")) == {C1}


class _ForgetDuringRead(IndexBackfill):
    """Forgets C1's link right after the backfill read its batch (once)."""

    def __init__(self, client: redis.Redis, keys: Keys, sync: SyncState) -> None:
        super().__init__(client, keys)
        self.sync, self.forgot = sync, False

    def _held(self, pipe: redis.client.Pipeline, ids: Sequence[str]) -> list[tuple[str, str]]:
        entries = super()._held(pipe, ids)
        if not self.forgot:
            self.forgot = True
            self.sync.forget(C1, "U1:TEAM")
        return entries


def test_holders_backfill_racing_a_forget_leaves_no_stale_holder(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A link forgotten while the backfill runs leaves no holders entry behind."""
    store, sync = _stores(redis_client, keys)
    store.save(connection(C1), grants())
    sync.record_write(C1, "U1:TEAM", _record("TEAM"))
    redis_client.delete(keys.event_type_holders("TEAM"))
    backfill = _ForgetDuringRead(redis_client, keys, sync)
    assert backfill.holders() is True
    assert backfill.forgot
    assert sync.holders("TEAM") == set()


def test_of_organization_drops_a_member_whose_record_names_another(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A member left in a set by an older release's racing migration is not served, and goes."""
    store, _ = _stores(redis_client, keys)
    store.save(connection(C1, calendly_grant_ref="ORG1"), grants())
    store.save(
        connection(C2, close_user_id="user_2", calendly_user_uri=U2, calendly_grant_ref="ORG2"),
        grants(),
    )
    redis_client.sadd(keys.calendly_org_connections("ORG1"), C2, "conn_gone00000")
    assert store.of_organization("ORG1") == {C1}
    assert redis_client.smembers(keys.calendly_org_connections("ORG1")) == {C1}
    assert store.of_organization("ORG2") == {C2}


class _WriteDuringReconnect(ConnectionStore):
    """A run of C1 records a link right after the reconnect read C1's links (once)."""

    sync: SyncState
    wrote = False

    def _holder_sets(self, source_ids: Iterable[bytes | str]) -> list[str]:
        found = super()._holder_sets(source_ids)
        if not self.wrote:
            self.wrote = True
            self.sync.record_write(C1, "U1:LATE", _record("LATE"))
        return found


def test_reconnect_racing_a_link_write_leaves_no_holder(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A link recorded between the reconnect's read of the links and its transaction is
    un-held too: the reconnect WATCHes the links, re-reads, and drops it."""
    _, sync = _stores(redis_client, keys)
    store = _WriteDuringReconnect(redis_client, keys, FernetBox([generate_key()]))
    store.sync = sync
    store.save(connection(C1), grants())
    sync.record_write(C1, "U1:EARLY", _record("EARLY"))
    store.save(connection(C1, calendly_user_uri="https://api.calendly.com/users/U9"), grants())
    assert store.wrote
    assert sync.holders("EARLY") == set()
    assert sync.holders("LATE") == set()
    assert not redis_client.exists(keys.links(C1))
