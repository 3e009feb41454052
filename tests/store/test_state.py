"""The Redis store: connections and grants, sync bookkeeping, and unreachable-Redis errors."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet
from pydantic import SecretStr

from closesync.core.connection import Connection, ConnectionState, Grant, Grants
from closesync.core.errors import (
    ConnectionNotFound,
    ConnectionRemoved,
    EncryptionError,
    PairingRefused,
    StoreUnavailable,
)
from closesync.core.plan import LinkRecord, Misses
from closesync.core.report import RunReport
from closesync.store.client import connect, guard, redacted_url
from closesync.store.connections import REMOVED_TTL_SECONDS, ConnectionStore
from closesync.store.embedded import embedded
from closesync.store.key_rotation import check_keys, rotate_keys
from closesync.store.keys import Keys
from closesync.store.secretbox import FernetBox, PlainBox, generate_key
from closesync.store.sync_state import BackfillProgress, HeldDeletions, SyncState

ACCESS = "tok_access_5b1e9"
REFRESH = "tok_refresh_77c0a"


def connection(conn_id: str = "conn_000000000001", **changes: object) -> Connection:
    fields: dict[str, object] = {
        "id": conn_id,
        "close_user_id": "user_1",
        "calendly_user_uri": "https://api.calendly.com/users/U1",
        "created_at": 100.0,
        "updated_at": 100.0,
    }
    fields.update(changes)
    return Connection.model_validate(fields)


def grants(access: str = ACCESS) -> Grants:
    return Grants(
        close=Grant(access_token=SecretStr(access), refresh_token=SecretStr(REFRESH)),
        calendly=Grant(kind="pat", access_token=SecretStr("cal_pat_9")),
    )


def record(n: int = 1) -> LinkRecord:
    return LinkRecord(fingerprint=f"fp{n}", event_type_uri=f"https://api.calendly.com/et/{n}")


@pytest.fixture
def box() -> FernetBox:
    return FernetBox([generate_key()])


@pytest.fixture
def store(redis_client: redis.Redis, keys: Keys, box: FernetBox) -> ConnectionStore:
    return ConnectionStore(redis_client, keys, box)


@pytest.fixture
def sync(redis_client: redis.Redis, keys: Keys) -> SyncState:
    return SyncState(redis_client, keys)


def all_values(client: redis.Redis) -> str:
    """Every key and value in the database, as one string to search."""
    parts: list[str] = []
    for key in client.scan_iter():
        kind = client.type(key)
        parts.append(key)
        if kind == "string":
            parts.append(client.get(key) or "")
        elif kind == "hash":
            parts.append(json.dumps(client.hgetall(key)))
        elif kind == "list":
            parts.extend(client.lrange(key, 0, -1))
        elif kind == "set":
            parts.extend(client.smembers(key))
    return "\n".join(parts)


# --- ConnectionStore ---------------------------------------------------------------------------


def test_store_save_then_get_returns_connection(store: ConnectionStore) -> None:
    """A saved connection reads back equal."""
    store.save(connection(name="Ann"), grants())
    assert store.get("conn_000000000001") == connection(name="Ann")


def test_store_get_unknown_raises_not_found(store: ConnectionStore) -> None:
    """An unknown id raises ConnectionNotFound naming the id."""
    with pytest.raises(ConnectionNotFound, match="conn_nope"):
        store.get("conn_nope")


def test_store_list_sorted_by_created_at(store: ConnectionStore) -> None:
    """list() returns every connection, oldest first."""
    for conn_id, created_at in (("conn_b", 200.0), ("conn_a", 300.0), ("conn_c", 100.0)):
        user = conn_id[-1]
        calendly = f"https://api.calendly.com/users/U{user}"
        changes = {"close_user_id": f"u_{user}", "calendly_user_uri": calendly}
        store.save(connection(conn_id, created_at=created_at, **changes), grants())
    assert [c.id for c in store.list()] == ["conn_c", "conn_b", "conn_a"]


def test_store_grants_round_trip_and_redis_holds_no_plaintext(
    store: ConnectionStore, redis_client: redis.Redis
) -> None:
    """Grants read back intact, while no key or value in Redis contains a token."""
    store.save(connection(), grants())
    assert store.grants("conn_000000000001") == grants()
    dump = all_values(redis_client)
    assert "conn_000000000001" in dump
    for secret in (ACCESS, REFRESH, "cal_pat_9"):
        assert secret not in dump


def test_store_record_never_contains_tokens(
    store: ConnectionStore, redis_client: redis.Redis, keys: Keys
) -> None:
    """The public record has no grant field at all."""
    store.save(connection(), grants())
    assert "token" not in (redis_client.get(keys.conn("conn_000000000001")) or "")


def test_store_update_grant_replaces_one_side(store: ConnectionStore) -> None:
    """update_grant changes one side and keeps the other."""
    store.save(connection(), grants())
    new = Grant(access_token=SecretStr("tok_new"), expires_at=5.0)
    store.update_grant("conn_000000000001", "close", new)
    stored = store.grants("conn_000000000001")
    assert stored.close == new
    assert stored.calendly == grants().calendly


def test_store_find_by_close_user_returns_its_connection(store: ConnectionStore) -> None:
    """The Close user index finds the connection; an unknown user finds none."""
    store.save(connection(close_user_id="user_42"), grants())
    found = store.find_by_close_user("user_42")
    assert found is not None
    assert found.id == "conn_000000000001"
    assert store.find_by_close_user("user_other") is None


def test_store_save_with_new_close_user_drops_old_index(store: ConnectionStore) -> None:
    """Re-saving a connection under another Close user stops the old user finding it."""
    store.save(connection(close_user_id="user_old"), grants())
    store.save(connection(close_user_id="user_new"), grants())
    assert store.find_by_close_user("user_old") is None
    assert store.find_by_close_user("user_new") is not None


def test_store_save_calendly_user_of_another_connection_is_refused_storing_nothing(
    store: ConnectionStore, redis_client: redis.Redis, keys: Keys
) -> None:
    """A second connection of one Calendly user is refused naming the first; nothing is written."""
    store.save(connection("conn_first", close_email="ann@example.com"), grants())
    before = sorted(all_values(redis_client).splitlines())
    with pytest.raises(PairingRefused, match="conn_first") as refused:
        store.save(connection("conn_second", close_user_id="user_2"), grants())
    assert refused.value.connection_id == "conn_first"
    assert "ann@example.com" in str(refused.value)
    assert sorted(all_values(redis_client).splitlines()) == before
    assert store.find_by_close_user("user_2") is None


def test_store_save_refuses_a_calendly_user_stored_before_the_index_existed(
    store: ConnectionStore, redis_client: redis.Redis, keys: Keys
) -> None:
    """A record written before the Calendly user index (no index key) still blocks a second."""
    store.save(connection("conn_first"), grants())
    # Neither the index entries nor the mark that every record has one (calendly-user-index).
    for key in redis_client.scan_iter(f"{keys.prefix}:calendly-user*"):
        redis_client.delete(key)
    with pytest.raises(PairingRefused, match="conn_first"):
        store.save(connection("conn_second", close_user_id="user_2"), grants())
    assert [c.id for c in store.list()] == ["conn_first"]


def test_store_save_indexes_records_from_before_the_index_once_then_trusts_the_index(
    store: ConnectionStore, redis_client: redis.Redis, keys: Keys
) -> None:
    """The first save's scan gives older records their entries; later saves read the index only."""
    store.save(connection("conn_first"), grants())
    for key in redis_client.scan_iter(f"{keys.prefix}:calendly-user*"):
        redis_client.delete(key)
    other = "https://api.calendly.com/users/U2"
    store.save(connection("conn_second", close_user_id="u2", calendly_user_uri=other), grants())
    assert redis_client.get(keys.calendly_user("U1")) == "conn_first"
    assert redis_client.get(keys.calendly_index_complete()) == "1"
    # Marked complete: a record without an entry (possible only by hand) is not looked for.
    redis_client.delete(keys.calendly_user("U1"))
    store.save(connection("conn_third", close_user_id="u3"), grants())
    assert redis_client.get(keys.calendly_user("U1")) == "conn_third"


def test_store_calendly_user_freed_by_remove_or_by_moving_to_another_user(
    store: ConnectionStore,
) -> None:
    """Removing the connection, or re-saving it with another Calendly user, frees the first."""
    store.save(connection("conn_first"), grants())
    store.remove("conn_first")
    store.save(connection("conn_second", close_user_id="user_2"), grants())
    other = "https://api.calendly.com/users/U2"
    store.save(connection("conn_second", close_user_id="user_2", calendly_user_uri=other), grants())
    store.save(connection("conn_third", close_user_id="user_3"), grants())
    assert {c.id: c.calendly_user_uuid for c in store.list()} == {
        "conn_second": "U2",
        "conn_third": "U1",
    }


def test_store_save_with_another_calendly_user_forgets_the_previous_users_state(
    store: ConnectionStore, sync: SyncState, redis_client: redis.Redis, keys: Keys
) -> None:
    """A reconnect to another Calendly user drops records, refusals, holds and backfill progress."""
    conn_id = "conn_000000000001"
    store.save(connection(), grants())
    sync.record_write(conn_id, "U1:a", record())
    sync.record_rejection(conn_id, "U1:b", "delete", "refused")
    sync.set_held(conn_id, ["U1:a"], "too many", 1.0)
    sync.set_backfill_progress(conn_id, BackfillProgress(started_at=1.0, cursor="U1:a"))
    sync.push_report(conn_id, RunReport(connection_id=conn_id, started_at=1.0), keep=5)
    store.save(connection(), grants("tok_again"))  # the same Calendly user: all of it stays
    assert set(sync.records(conn_id)) == {"U1:a"}
    assert sync.held(conn_id) is not None
    store.save(connection(calendly_user_uri="https://api.calendly.com/users/U2"), grants())
    assert sync.records(conn_id) == {}
    assert sync.rejected(conn_id) == {}
    assert sync.held(conn_id) is None
    assert sync.backfill_progress(conn_id) is None
    assert len(sync.reports(conn_id)) == 1  # the history stays


def _save_racing(
    redis_url: str, keys: Keys, box: FernetBox, candidate: Connection, barrier: threading.Barrier
) -> str:
    """Save `candidate` on a client of its own once every racer is ready: saved or refused."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        barrier.wait(timeout=10)
        ConnectionStore(client, keys, box).save(candidate, grants())
    except PairingRefused:
        return "refused"
    finally:
        client.close()
    return "saved"


def test_store_concurrent_saves_of_one_calendly_user_only_one_succeeds(
    redis_url: str, keys: Keys, box: FernetBox
) -> None:
    """Eight threads saving eight Close users with one Calendly user at once: exactly one wins."""
    for round_ in range(5):
        barrier = threading.Barrier(8)
        calendly = f"https://api.calendly.com/users/R{round_}"
        candidates = [
            connection(
                f"conn_{round_}_{n}", close_user_id=f"u_{round_}_{n}", calendly_user_uri=calendly
            )
            for n in range(8)
        ]
        with ThreadPoolExecutor(max_workers=8) as pool:
            racing = [
                pool.submit(_save_racing, redis_url, keys, box, c, barrier) for c in candidates
            ]
            outcomes = [future.result(timeout=30) for future in racing]
        assert sorted(outcomes) == ["refused"] * 7 + ["saved"], outcomes
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    listed = ConnectionStore(client, keys, box).list()
    client.close()
    assert sorted(c.calendly_user_uuid for c in listed) == [f"R{r}" for r in range(5)]


def test_store_set_state_records_reason(store: ConnectionStore) -> None:
    """set_state changes state, reason and updated_at, and returns the new connection."""
    store.save(connection(), grants())
    changed = store.set_state(
        "conn_000000000001", ConnectionState.NEEDS_REAUTH, "Close refused the grant", now=500.0
    )
    assert store.get("conn_000000000001") == changed
    assert (changed.state, changed.state_reason, changed.updated_at) == (
        ConnectionState.NEEDS_REAUTH,
        "Close refused the grant",
        500.0,
    )


def _left(client: redis.Redis, keys: Keys) -> list[str]:
    """The keys under the prefix but the store's own mark that every record has its index entry."""
    found = client.scan_iter(f"{keys.prefix}:*")
    return [str(key) for key in found if key != keys.calendly_index_complete()]


def test_store_remove_erases_every_key(
    store: ConnectionStore, sync: SyncState, redis_client: redis.Redis, keys: Keys
) -> None:
    """remove() leaves nothing of the connection in Redis but its removal mark, which expires."""
    conn_id = "conn_000000000001"
    store.save(connection(), grants())
    sync.record_write(conn_id, "s1", record())
    sync.record_rejection(conn_id, "s2", "fp", "bad")
    sync.set_held(conn_id, ["s1"], "too many", 1.0)
    sync.push_report(conn_id, RunReport(connection_id=conn_id, started_at=1.0), keep=5)
    sync.request_rerun(conn_id)
    sync.set_backfill_progress(conn_id, BackfillProgress(started_at=1.0, cursor="c"))
    redis_client.set(keys.run_lock(conn_id), "token", px=60_000)
    store.remove(conn_id)
    assert _left(redis_client, keys) == [keys.removed(conn_id)]
    assert 0 < redis_client.ttl(keys.removed(conn_id)) <= REMOVED_TTL_SECONDS
    assert store.list() == []
    with pytest.raises(ConnectionNotFound):
        store.remove(conn_id)


def test_store_save_after_remove_is_refused_and_brings_no_key_back(
    store: ConnectionStore, redis_client: redis.Redis, keys: Keys
) -> None:
    """A save of a removed connection (read before the remove) raises and writes nothing."""
    conn_id = "conn_000000000001"
    stale = connection()
    store.save(stale, grants())
    store.remove(conn_id)
    with pytest.raises(ConnectionRemoved, match="connect again"):
        store.save(stale, grants())
    # The mark that every record has its Calendly-user entry is the store's, not the connection's.
    left = set(redis_client.scan_iter(f"{keys.prefix}:*")) - {keys.calendly_index_complete()}
    assert left == {keys.removed(conn_id)}
    store.save(connection("conn_000000000002"), grants())  # a new connection of that user
    assert [c.id for c in store.list()] == ["conn_000000000002"]


def test_store_save_of_a_connection_whose_removal_stopped_midway_is_refused(
    store: ConnectionStore,
) -> None:
    """While the mark of an unfinished removal stands, the connection is not saved over."""
    store.save(connection(), grants())
    assert store.mark_removing("conn_000000000001")
    with pytest.raises(ConnectionRemoved, match="run it again to finish"):
        store.save(connection(name="again"), grants("tok_new"))
    assert store.get("conn_000000000001").name is None
    assert store.grants("conn_000000000001").close.access_token.get_secret_value() == ACCESS


def test_sync_state_writes_after_removal_refused_no_key_recreated(
    store: ConnectionStore, sync: SyncState, redis_client: redis.Redis, keys: Keys
) -> None:
    """Once removed, every state write of the connection raises and brings back no key."""
    conn_id = "conn_000000000001"
    store.save(connection(), grants())
    sync.record_write(conn_id, "s1", record())
    store.remove(conn_id)
    late_writes = [
        lambda: sync.record_write(conn_id, "s1", record()),
        lambda: sync.replace_records(conn_id, {"s1": record()}),
        lambda: sync.record_rejection(conn_id, "s2", "fp", "bad"),
        lambda: sync.set_held(conn_id, ["s1"], "too many", 1.0),
        lambda: sync.push_report(conn_id, RunReport(connection_id=conn_id, started_at=1.0), 5),
        lambda: sync.request_rerun(conn_id),
        lambda: sync.set_backfill_progress(conn_id, BackfillProgress(started_at=1.0)),
    ]
    for write in late_writes:
        with pytest.raises(ConnectionRemoved, match=conn_id):
            write()
    assert sync.is_removed(conn_id)
    assert _left(redis_client, keys) == [keys.removed(conn_id)]


def test_store_plain_grants_refused_by_fernet_store(
    redis_client: redis.Redis, keys: Keys, box: FernetBox
) -> None:
    """Grants the sandbox stored unencrypted cannot be read by an encrypting store."""
    ConnectionStore(redis_client, keys, PlainBox()).save(connection(), grants())
    with pytest.raises(EncryptionError, match="unencrypted"):
        ConnectionStore(redis_client, keys, box).grants("conn_000000000001")


def test_store_rotate_keys_reseals_so_old_key_can_go(redis_client: redis.Redis, keys: Keys) -> None:
    """With the new key first, old grants still read; after rotate_keys the old key can go."""
    old_key, new_key = generate_key(), generate_key()
    ConnectionStore(redis_client, keys, FernetBox([old_key])).save(connection(), grants())
    ConnectionStore(redis_client, keys, PlainBox()).save(
        connection(
            "conn_plain", close_user_id="u_p", calendly_user_uri="https://api.calendly.com/users/P"
        ),
        grants(),
    )
    both = FernetBox([new_key, old_key])
    assert ConnectionStore(redis_client, keys, both).grants("conn_000000000001") == grants()
    assert rotate_keys(redis_client, keys, both) == 1  # the `plain:` value only when asked
    assert rotate_keys(redis_client, keys, both, seal_plaintext=True) == 2
    only_new = ConnectionStore(redis_client, keys, FernetBox([new_key]))
    assert only_new.grants("conn_000000000001") == grants()
    assert only_new.grants("conn_plain") == grants()


def test_store_grants_copied_to_another_connection_fail_to_open_loudly(
    redis_client: redis.Redis, keys: Keys, store: ConnectionStore
) -> None:
    """Grants sealed for one connection, written under another's key, are refused, not used."""
    store.save(connection("conn_aaaaaaaaaaaa", close_user_id="u_a"), grants("tok_of_a"))
    store.save(
        connection(
            "conn_bbbbbbbbbbbb",
            close_user_id="u_b",
            calendly_user_uri="https://api.calendly.com/users/U2",
        ),
        grants("tok_of_b"),
    )
    redis_client.set(
        keys.grants("conn_bbbbbbbbbbbb"), redis_client.get(keys.grants("conn_aaaaaaaaaaaa"))
    )
    with pytest.raises(EncryptionError, match="sealed for another") as refused:
        store.grants("conn_bbbbbbbbbbbb")
    assert "tok_of_a" not in str(refused.value)
    assert store.grants("conn_aaaaaaaaaaaa") == grants("tok_of_a")


def test_store_shared_grant_copied_over_a_connection_grant_fails_to_open(
    redis_client: redis.Redis, keys: Keys, store: ConnectionStore
) -> None:
    """An organization's shared grant copied over a connection's grants (or back) is refused."""
    store.save(connection(), grants())
    store.set_shared_grant("org-1", grants("tok_of_org").close)
    store.set_shared_grant("org-2", grants("tok_of_org_2").close)
    redis_client.set(
        keys.calendly_org_grant("org-2"), redis_client.get(keys.calendly_org_grant("org-1"))
    )
    with pytest.raises(EncryptionError, match="sealed for another"):
        store.shared_grant("org-2")
    redis_client.set(
        keys.grants("conn_000000000001"), redis_client.get(keys.calendly_org_grant("org-1"))
    )
    with pytest.raises(EncryptionError, match="sealed for another"):
        store.grants("conn_000000000001")


def test_store_rotate_keys_keeps_binding_and_binds_values_sealed_before_it(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A value sealed before binding existed still opens; rotate binds it to its connection."""
    old_key, new_key = generate_key(), generate_key()
    legacy = Fernet(old_key).encrypt(
        json.dumps(
            {"close": grants().close.revealed(), "calendly": grants().calendly.revealed()}
        ).encode()
    )
    ConnectionStore(redis_client, keys, FernetBox([old_key])).save(connection(), grants())
    redis_client.set(keys.grants("conn_000000000001"), legacy.decode())
    ConnectionStore(redis_client, keys, FernetBox([old_key])).save(
        connection(
            "conn_bbbbbbbbbbbb",
            close_user_id="u_b",
            calendly_user_uri="https://api.calendly.com/users/U2",
        ),
        grants("tok_of_b"),
    )
    both = FernetBox([new_key, old_key])
    assert ConnectionStore(redis_client, keys, both).grants("conn_000000000001") == grants()
    assert check_keys(redis_client, keys, both, FernetBox([new_key]))["unbound"] == 1
    assert rotate_keys(redis_client, keys, both) == 2
    assert check_keys(redis_client, keys, both, FernetBox([new_key])) == {
        "current": 2, "older_key": 0, "unencrypted": 0, "unreadable": 0, "unbound": 0,
    }  # fmt: skip
    only_new = ConnectionStore(redis_client, keys, FernetBox([new_key]))
    assert only_new.grants("conn_000000000001") == grants()
    redis_client.set(
        keys.grants("conn_bbbbbbbbbbbb"), redis_client.get(keys.grants("conn_000000000001"))
    )
    with pytest.raises(EncryptionError, match="sealed for another"):
        only_new.grants("conn_bbbbbbbbbbbb")


# --- SyncState ---------------------------------------------------------------------------------


def test_sync_record_write_clears_rejection(sync: SyncState) -> None:
    """An accepted write is recorded and its earlier rejection forgotten."""
    sync.record_rejection("c1", "s1", "fp0", "Close said no")
    assert sync.rejected("c1") == {"s1": "fp0"}
    assert sync.rejected_errors("c1") == {"s1": "Close said no"}
    sync.record_write("c1", "s1", record())
    assert sync.records("c1") == {"s1": record()}
    assert sync.rejected("c1") == {}


def test_sync_set_missing_updates_existing_records_only(sync: SyncState) -> None:
    """Missing counts and their start change existing records and create none."""
    sync.record_write("c1", "s1", record(1))
    sync.set_missing("c1", {"s1": Misses(1, 1000.5), "ghost": Misses(2, 1.0)})
    assert sync.records("c1") == {
        "s1": LinkRecord("fp1", record(1).event_type_uri, missing=1, missing_since=1000.5)
    }
    sync.set_missing("c1", {"s1": Misses(0)})
    assert sync.records("c1")["s1"] == record(1)


def test_sync_forget_drops_the_record_and_its_refusal(sync: SyncState) -> None:
    """A link Close no longer holds leaves neither its record nor a refusal behind."""
    sync.record_write("c1", "s1", record(1))
    sync.record_rejection("c1", "s1", "delete", "Close DELETE … answered 400")
    sync.forget("c1", "s1")
    assert (sync.records("c1"), sync.rejected("c1")) == ({}, {})


def test_sync_record_stored_without_missing_since_reads_as_none(sync: SyncState) -> None:
    """A record written before misses were timed still reads, its miss start unknown."""
    key = sync.keys.links("c1")
    sync.redis.hset(key, "s1", '{"fingerprint": "fp1", "event_type_uri": "u", "missing": 1}')
    assert sync.records("c1") == {"s1": LinkRecord("fp1", "u", missing=1, missing_since=None)}


def test_sync_replace_records_swaps_all_and_forget_removes_one(sync: SyncState) -> None:
    """replace_records rebuilds the whole hash; forget drops one record."""
    sync.record_write("c1", "old", record(0))
    sync.replace_records("c1", {"s1": record(1), "s2": record(2)})
    assert sync.records("c1") == {"s1": record(1), "s2": record(2)}
    sync.forget("c1", "s1")
    assert sync.records("c1") == {"s2": record(2)}
    sync.replace_records("c1", {})
    assert sync.records("c1") == {}


def test_sync_held_set_read_and_cleared_by_empty_list(sync: SyncState) -> None:
    """Held deletions read back; an empty list clears them."""
    assert sync.held("c1") is None
    sync.set_held("c1", ["s1", "s2"], "6 deletions exceed 5", 42.0)
    assert sync.held("c1") == HeldDeletions(["s1", "s2"], "6 deletions exceed 5", 42.0)
    sync.set_held("c1", [], None, 43.0)
    assert sync.held("c1") is None


def test_sync_reports_newest_first_trimmed_to_keep(sync: SyncState) -> None:
    """Reports come back newest first and only `keep` of them are kept."""
    for n in range(5):
        sync.push_report("c1", RunReport(connection_id="c1", started_at=float(n)), keep=3)
    assert [r.started_at for r in sync.reports("c1")] == [4.0, 3.0, 2.0]
    assert [r.started_at for r in sync.reports("c1", limit=1)] == [4.0]
    last = sync.last_report("c1")
    assert last is not None
    assert last.started_at == 4.0
    assert sync.last_report("c2") is None


def test_sync_pop_rerun_consumes_the_request(sync: SyncState) -> None:
    """A requested rerun is popped once."""
    assert sync.pop_rerun("c1") is False
    sync.request_rerun("c1")
    assert sync.pop_rerun("c1") is True
    assert sync.pop_rerun("c1") is False


def test_sync_backfill_progress_round_trip_and_clear(sync: SyncState) -> None:
    """Backfill progress reads back as written, then clears."""
    assert sync.backfill_progress("c1") is None
    progress = BackfillProgress(started_at=12.5, cursor="page2", done=40, total=90)
    sync.set_backfill_progress("c1", progress)
    assert sync.backfill_progress("c1") == progress
    sync.set_backfill_progress("c1", BackfillProgress(started_at=12.5))
    assert sync.backfill_progress("c1") == BackfillProgress(started_at=12.5)
    sync.clear_backfill("c1")
    assert sync.backfill_progress("c1") is None


def test_sync_claim_tick_twice_true_then_false(sync: SyncState) -> None:
    """A tick slot is claimed once; another slot is free."""
    assert sync.claim_tick("sync_all", "2024-05-01T10:05", 60) is True
    assert sync.claim_tick("sync_all", "2024-05-01T10:05", 60) is False
    assert sync.claim_tick("sync_all", "2024-05-01T10:10", 60) is True


# --- Redis connection --------------------------------------------------------------------------


def test_connect_closed_port_raises_store_unavailable_without_password() -> None:
    """An unreachable Redis gives one clear sentence and never the password."""
    with pytest.raises(StoreUnavailable) as raised:
        connect("redis://:s3cret@127.0.0.1:1/0")
    message = str(raised.value)
    assert message == "Redis at redis://127.0.0.1:1/0 cannot be reached: Connection refused"
    assert "s3cret" not in message


def test_redacted_url_drops_password_keeps_user() -> None:
    """Passwords in the netloc or the query are removed; the rest stays."""
    assert redacted_url("redis://bob:pw@h:6379/2") == "redis://bob@h:6379/2"
    assert redacted_url("rediss://:pw@h:6380/0?password=pw&ssl_cert_reqs=none") == (
        "rediss://h:6380/0?ssl_cert_reqs=none"
    )
    assert redacted_url("unix:///tmp/r.sock?db=1") == "unix:///tmp/r.sock?db=1"


def test_store_on_dead_redis_raises_store_unavailable(keys: Keys) -> None:
    """Store methods turn a Redis connection error into StoreUnavailable."""
    dead = redis.Redis(host="127.0.0.1", port=1, retry=None)
    with pytest.raises(StoreUnavailable, match="while listing connections: Connection refused"):
        ConnectionStore(dead, keys, PlainBox()).list()


def test_guard_redis_response_error_becomes_store_unavailable(redis_client: redis.Redis) -> None:
    """A Redis error answer inside guard() becomes StoreUnavailable naming the action."""
    redis_client.set("a-string", "x")
    with pytest.raises(StoreUnavailable, match="answered an error while testing"), guard("testing"):
        redis_client.hget("a-string", "field")


def test_embedded_starts_persistent_server_and_reuses_it(tmp_path: Path) -> None:
    """embedded() starts a Redis with an append-only file, and a second call reuses it."""
    url = embedded(str(tmp_path))
    client = connect(url)
    try:
        client.set("k", "v")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert embedded(str(tmp_path)) == url
    finally:
        client.close()
    assert "@127.0.0.1:" in url
