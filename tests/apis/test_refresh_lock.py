"""The single-flight refresh lock is held for as long as the token call lasts, however long.

Refresh tokens are single-use: if the lock expired while a slow token call was still on its way,
another process could take it and present the same refresh token, and one of the two would lose
the grant. Per-read timeouts do not bound a call whose server trickles its answer, so the lock
is renewed while it is held. The token endpoint here is a loopback server trickling its answer
for longer than the lock's TTL; the lock and the grants are in a real Redis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY
from pydantic import SecretStr

from closesync.apis.close.client import CloseOAuth
from closesync.apis.credentials import TokenKeeper, grant_lock_name
from closesync.apis.oauth_tokens import token_http
from closesync.core.connection import Connection, Grant, Grants, Side
from closesync.core.errors import StoreUnavailable
from closesync.store.connections import ConnectionStore
from closesync.store.keys import Keys
from closesync.store.locks import RedisLock
from closesync.store.secretbox import FernetBox, generate_key
from tests._sandbox import Scripted, ScriptedServer, scripted_server

# Seconds the refresh lock lives unrenewed in this test: short, so that the call outlasts it.
LOCK_TTL = 1.0


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with scripted_server() as scripted:
        yield scripted


def test_token_keeper_refresh_slower_than_lock_ttl_keeps_the_lock_to_the_end(
    server: ScriptedServer, redis_client: redis.Redis, keys: Keys
) -> None:
    """A refresh lasting 2.5 TTLs (bytes trickling under the read timeout) never loses its lock."""
    store = ConnectionStore(redis_client, keys, FernetBox([generate_key()]))
    connection = Connection(
        id="conn_aaaaaaaaaaaa",
        close_user_id="u_a",
        calendly_user_uri="https://api.calendly.com/users/U_A",
        created_at=1.0,
        updated_at=1.0,
    )
    old = Grant(access_token=SecretStr("at_old"), refresh_token=SecretStr("rt_old"))
    store.save(
        connection, Grants(close=old, calendly=Grant(kind="pat", access_token=SecretStr("p")))
    )
    release = threading.Event()
    answer = Scripted(
        {"access_token": "at_new", "refresh_token": "rt_new", "expires_in": 3600},
        trickle_until=release,
    )
    server.answers.append(answer)
    keeper = TokenKeeper(
        connection_id=connection.id,
        side="close",
        store=store,
        refresher=CloseOAuth(
            http=token_http("Close", server.url, timeout=(1.0, 1.0)),
            client_id="client",
            client_secret="secret",
        ),
        lock_factory=lambda name: RedisLock(redis_client, keys.refresh_lock(name), LOCK_TTL),
    )
    refreshed: list[str] = []
    refreshing = threading.Thread(target=lambda: refreshed.append(keeper.refresh("at_old")))
    refreshing.start()
    try:
        assert answer.started.wait(10)
        lock_key = keys.refresh_lock(grant_lock_name("close", connection.id))
        # The invariant, watched over a window well past the TTL: the lock is never free.
        until = time.monotonic() + 2.5 * LOCK_TTL
        while time.monotonic() < until:
            assert redis_client.exists(lock_key), "the refresh lock expired mid-call"
            assert not RedisLock(redis_client, lock_key, LOCK_TTL).acquire()
            release.wait(0.05)
    finally:
        release.set()
        refreshing.join(timeout=10)
    assert refreshed == ["at_new"]
    stored = store.grants(connection.id).close
    assert stored.refresh_token is not None
    assert stored.refresh_token.get_secret_value() == "rt_new"
    assert not redis_client.exists(lock_key)  # released at the end


def _store_with_close_grant(redis_client: redis.Redis, keys: Keys) -> tuple[ConnectionStore, str]:
    store = ConnectionStore(redis_client, keys, FernetBox([generate_key()]))
    connection = Connection(
        id="conn_aaaaaaaaaaaa",
        close_user_id="u_a",
        calendly_user_uri="https://api.calendly.com/users/U_A",
        created_at=1.0,
        updated_at=1.0,
    )
    old = Grant(access_token=SecretStr("at_old"), refresh_token=SecretStr("rt_old"))
    store.save(
        connection, Grants(close=old, calendly=Grant(kind="pat", access_token=SecretStr("p")))
    )
    return store, connection.id


def _oauth(server: ScriptedServer) -> CloseOAuth:
    return CloseOAuth(
        http=token_http("Close", server.url, timeout=(1.0, 1.0)),
        client_id="client",
        client_secret="secret",
    )


REFUSED = {"error": "invalid_grant", "error_description": "The refresh token was already used."}
ROTATED = Grant(access_token=SecretStr("at_other"), refresh_token=SecretStr("rt_other"))


def test_token_keeper_refused_after_losing_its_lock_waits_for_the_new_holder_and_adopts(
    server: ScriptedServer, redis_client: redis.Redis, keys: Keys
) -> None:
    """A refresh whose lock was dropped mid-call (failover), then refused, waits for the lock's
    new holder and uses the grant it stores, instead of calling the grant revoked."""
    store, conn_id = _store_with_close_grant(redis_client, keys)
    release = threading.Event()
    answer = Scripted(REFUSED, status=400, trickle_until=release)
    server.answers.append(answer)
    created: list[RedisLock] = []
    progressed = threading.Event()  # the keeper asked for a lock again, or it finished

    def lock_factory(name: str) -> RedisLock:
        created.append(RedisLock(redis_client, keys.refresh_lock(name), LOCK_TTL))
        if len(created) > 1:
            progressed.set()
        return created[-1]

    keeper = TokenKeeper(
        connection_id=conn_id,
        side="close",
        store=store,
        refresher=_oauth(server),
        lock_factory=lock_factory,
    )
    outcome: list[str] = []

    def refresh() -> None:
        try:
            outcome.append(keeper.refresh("at_old"))
        except Exception as error:
            outcome.append(type(error).__name__)
        finally:
            progressed.set()

    refreshing = threading.Thread(target=refresh)
    refreshing.start()
    try:
        assert answer.started.wait(10)
        lock_key = keys.refresh_lock(grant_lock_name("close", conn_id))
        redis_client.delete(lock_key)  # a failover drops the lock mid-call
        other = RedisLock(redis_client, lock_key, 30)
        assert other.acquire()  # another process takes it and refreshes the same grant
        assert created[0].lost.wait(10)
        release.set()  # our call is refused: the other process redeemed the token
        assert progressed.wait(10)
        assert outcome == [], f"gave up while the lock's holder was still refreshing: {outcome}"
        store.update_grant(conn_id, "close", ROTATED)  # the other process stores, then releases
        other.release()
    finally:
        release.set()
        refreshing.join(timeout=30)
    assert outcome == ["at_other"]


def test_token_keeper_refused_while_holding_lock_adopts_a_rotation_stored_just_after(
    server: ScriptedServer, redis_client: redis.Redis, keys: Keys
) -> None:
    """Refused while holding the lock (the process that lost it redeemed the token first), the
    refresh looks a moment longer and uses that process's grant when it lands just after."""
    store, conn_id = _store_with_close_grant(redis_client, keys)
    server.answers.append(Scripted(REFUSED, status=400))
    oauth = _oauth(server)
    refused = threading.Event()

    class Refusing:
        def refresh(self, refresh_token: str) -> Any:
            try:
                return oauth.refresh(refresh_token)
            finally:
                refused.set()

    class LandingLate:
        """The store, where the other process's result lands right after our first re-read."""

        def grants(self, connection_id: str) -> Grants:
            found = store.grants(connection_id)
            if refused.is_set() and found.close.refresh_token != ROTATED.refresh_token:
                store.update_grant(connection_id, "close", ROTATED)
            return found

        def update_grant(self, connection_id: str, side: Side, grant: Grant) -> None:
            store.update_grant(connection_id, side, grant)

    keeper = TokenKeeper(
        connection_id=conn_id,
        side="close",
        store=LandingLate(),
        refresher=Refusing(),
        lock_factory=lambda name: RedisLock(redis_client, keys.refresh_lock(name), 30),
    )
    rotated = _refreshes("rotated_elsewhere")
    revoked = _refreshes("revoked")
    assert keeper.refresh("at_old") == "at_other"
    assert _refreshes("rotated_elsewhere") == rotated + 1
    assert _refreshes("revoked") == revoked


def _refreshes(result: str) -> float:
    value = REGISTRY.get_sample_value(
        "closesync_token_refreshes_total", {"api": "Close", "result": result}
    )
    return 0.0 if value is None else value


def test_token_keeper_refresh_whose_rotated_grant_is_not_stored_counts_error_not_ok(
    server: ScriptedServer, redis_client: redis.Redis, keys: Keys
) -> None:
    """The provider answered, but storing the rotated grant failed: the refresh counts as an
    error, never as ok, and the store's error is raised."""
    store, conn_id = _store_with_close_grant(redis_client, keys)
    server.answers.append(
        Scripted({"access_token": "at_new", "refresh_token": "rt_new", "expires_in": 3600})
    )

    class FailingToStore:
        def grants(self, connection_id: str) -> Grants:
            return store.grants(connection_id)

        def update_grant(self, connection_id: str, side: Side, grant: Grant) -> None:
            raise StoreUnavailable("Redis did not answer while storing a grant")

    keeper = TokenKeeper(
        connection_id=conn_id,
        side="close",
        store=FailingToStore(),
        refresher=_oauth(server),
        lock_factory=lambda name: RedisLock(redis_client, keys.refresh_lock(name), 30),
    )
    ok, error = _refreshes("ok"), _refreshes("error")
    with pytest.raises(StoreUnavailable):
        keeper.refresh("at_old")
    assert _refreshes("ok") == ok
    assert _refreshes("error") == error + 1
