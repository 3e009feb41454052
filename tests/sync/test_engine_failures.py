"""How a run fails: every failure is reported (never "ok"), classed, and leaves the right state."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest

from closesync.apis import credentials
from closesync.apis.credentials import TokenKeeper
from closesync.core.connection import ConnectionState
from closesync.core.errors import CorruptState, GrantRevoked, RunLocked
from closesync.core.report import Outcome, RunMode
from closesync.core.retry import WaitBudget
from closesync.sandbox import Sandbox, SandboxConfig
from closesync.store.locks import RedisLock
from tests.sync_harness import Harness


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    sb = Sandbox.start(SandboxConfig(seed=3, users=2, event_types=4, freeze_clock=True))
    try:
        yield sb
    finally:
        sb.stop()


def test_run_undecryptable_grants_fail_the_report_not_ok(harness: Harness) -> None:
    """Grants no key can open: the run fails with the cause, its stored report says failed."""
    conn = harness.add(harness.sandbox.users[0])
    harness.services.redis.set(harness.services.keys.grants(conn), "plain:not-base64!")
    report = harness.run(conn)
    assert report.outcome is Outcome.FAILED
    assert report.failure == "error"
    stored = harness.services.state.last_report(conn)
    assert stored is not None
    assert stored.outcome is Outcome.FAILED
    assert harness.services.connections.get(conn).state is ConnectionState.ACTIVE


def test_run_grants_swapped_from_another_connection_fail_and_touch_no_one(
    harness: Harness,
) -> None:
    """B's grants key holding A's sealed grants: B's run fails loudly, no API call is made."""
    first, second = harness.sandbox.users
    a = harness.add(first)
    b = harness.add(second)
    redis = harness.services.redis
    redis.set(harness.services.keys.grants(b), redis.get(harness.services.keys.grants(a)))
    report = harness.run(b)
    assert report.outcome is Outcome.FAILED
    assert "sealed for another" in (report.error or "")
    assert harness.sandbox.world.request_counts() == {}
    assert harness.close_side(first) == {}
    assert harness.close_side(second) == {}


def test_run_corrupt_link_record_fails_naming_redis(harness: Harness) -> None:
    """A link record that no longer parses fails the run with CorruptState's message."""
    conn = harness.add(harness.sandbox.users[0])
    harness.services.redis.hset(harness.services.keys.links(conn), "u:e", "{truncated")
    report = harness.run(conn)
    assert report.outcome is Outcome.FAILED
    assert "Redis holds a value closesync cannot read" in (report.error or "")
    with pytest.raises(CorruptState):
        harness.services.state.records(conn)


def test_cli_sync_all_one_broken_connection_others_still_sync(
    harness: Harness, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sync --all` runs every connection although one cannot be decrypted, and exits 1."""
    from closesync.cli.main import main

    broken = harness.add(harness.sandbox.users[0])
    healthy_user = harness.sandbox.users[1]
    harness.add(healthy_user)
    harness.services.redis.set(harness.services.keys.grants(broken), "plain:@@@")
    for name, value in harness.sandbox.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_PREFIX", harness.services.keys.prefix)
    key = harness.services.settings.closesync_encryption_keys
    assert key is not None
    monkeypatch.setenv("CLOSESYNC_ENCRYPTION_KEYS", key.get_secret_value())
    assert main(["sync", "--all"]) == 1
    assert harness.close_side(healthy_user) == harness.expected(healthy_user)


def test_refresh_lock_held_elsewhere_is_transient_not_reauth(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting too long for another process's refresh is a transient failure, not needs_reauth."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.sandbox.world.expire_token(user.close_access_token)
    monkeypatch.setattr(credentials, "REFRESH_WAIT_SECONDS", 0.05)
    name = credentials.grant_lock_name("close", conn)
    blocker = RedisLock(harness.services.redis, harness.services.keys.refresh_lock(name), 30)
    assert blocker.acquire()
    report = harness.run(conn)
    assert report.outcome is Outcome.FAILED
    assert report.failure == "transient"
    assert harness.services.connections.get(conn).state is ConnectionState.ACTIVE


def test_expired_token_without_oauth_app_is_config_error_not_reauth(
    sandbox: Sandbox, redis_url: str
) -> None:
    """No OAuth app configured: the run fails naming the missing settings; state stays active."""
    harness = Harness.build(
        sandbox, redis_url, f"fail-{uuid.uuid4().hex[:8]}", close_client_id=None
    )
    user = sandbox.users[0]
    conn = harness.add(user)
    sandbox.world.expire_token(user.close_access_token)
    report = harness.run(conn)
    assert report.outcome is Outcome.FAILED
    assert "CLOSE_CLIENT_ID and CLOSE_CLIENT_SECRET are not set" in (report.error or "")
    assert harness.services.connections.get(conn).state is ConnectionState.ACTIVE


def test_refresh_rotated_by_someone_else_meanwhile_is_adopted(harness: Harness) -> None:
    """invalid_grant after another process rotated the grant: the stored grant is used."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    oauth = harness.services.close_oauth()
    assert oauth is not None
    services = harness.services

    class FreeLock:
        def acquire_wait(self, timeout: float) -> bool:
            return True

        def held(self) -> bool:
            return True

        def renewing(self) -> nullcontext[None]:
            return nullcontext()

        def release(self) -> bool:
            return True

    def keeper(refresher: Any) -> TokenKeeper:
        return TokenKeeper(
            connection_id=conn,
            side="close",
            store=services.connections,
            refresher=refresher,
            lock_factory=lambda name: FreeLock(),
        )

    other = keeper(oauth)

    class RacingOAuth:
        """Lets the other process rotate the grant first, as after an expired refresh lock."""

        def refresh(self, refresh_token: str) -> Any:
            other.refresh(user.close_access_token)
            return oauth.refresh(refresh_token)

    slow = keeper(RacingOAuth())
    token = slow.refresh(user.close_access_token)
    stored = services.connections.grants(conn).close
    assert token == stored.access_token.get_secret_value()
    assert token != user.close_access_token


def test_refresh_really_revoked_still_raises(harness: Harness) -> None:
    """invalid_grant with the stored grant unchanged is a revoked grant: needs_reauth."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.sandbox.world.revoke_token(user.close_refresh_token)
    connection = harness.services.connections.get(conn)
    keeper = harness.services.clients_for(connection, WaitBudget(1.0)).close_tokens
    with pytest.raises(GrantRevoked):
        keeper.refresh(user.close_access_token)


def test_run_lock_freed_between_attempts_runs_and_clears_own_request(harness: Harness) -> None:
    """If the holder ends just as we ask for a rerun, we take the lock and run ourselves."""
    conn = harness.add(harness.sandbox.users[0])
    services = harness.services
    calls = {"n": 0}

    @contextmanager
    def flaky_lock(connection_id: str, ttl: int) -> Iterator[Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RunLocked("busy")
        with services.run_lock(connection_id, ttl) as lock:
            yield lock

    engine = harness.engine()
    engine.run_lock = flaky_lock
    report = engine.run(conn)
    assert report.outcome is Outcome.OK
    assert report.created > 0
    assert services.state.pop_rerun(conn) is False


def test_run_locked_twice_is_skipped_with_failure_locked(harness: Harness) -> None:
    """A lock held throughout gives SKIPPED, failure `locked`, and leaves the rerun request."""
    conn = harness.add(harness.sandbox.users[0])
    with harness.services.run_lock(conn, 30):
        report = harness.run(conn)
    assert report.outcome is Outcome.SKIPPED
    assert report.failure == "locked"
    assert harness.services.state.pop_rerun(conn) is True


def test_dry_run_meeting_a_revoked_grant_changes_no_state(harness: Harness) -> None:
    """A dry drift check meeting a revoked grant fails but writes nothing, not even needs_reauth."""
    user = harness.sandbox.users[0]
    conn = harness.add(user)
    harness.sandbox.world.revoke_token(user.close_refresh_token)
    harness.sandbox.world.expire_token(user.close_access_token)
    report = harness.engine().run(conn, dry_run=True, mode=RunMode.DRIFT)
    assert report.outcome is Outcome.FAILED
    assert report.failure == "auth"
    assert harness.services.connections.get(conn).state is ConnectionState.ACTIVE
