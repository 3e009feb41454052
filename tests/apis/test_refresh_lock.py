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

import pytest
import redis
from pydantic import SecretStr

from closesync.apis.close.client import CloseOAuth
from closesync.apis.credentials import TokenKeeper, grant_lock_name
from closesync.apis.oauth_tokens import token_http
from closesync.core.connection import Connection, Grant, Grants
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
