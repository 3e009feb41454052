"""`connections remove` racing a reconnect, a run, or a failed wait for the run lock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from closesync.cli.main import main
from closesync.connect.leaving import remove_connection
from closesync.core.connection import ConnectionState, Grants
from closesync.core.report import Outcome
from closesync.sandbox import Sandbox
from closesync.sandbox.connections import sandbox_connection
from closesync.store.keys import Keys
from closesync.store.secretbox import generate_key
from closesync.wiring.services import Services
from tests._oauth import sandbox_env, services_for
from tests._sandbox import running_sandbox


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with running_sandbox(users=3) as sandbox:
        yield sandbox


@pytest.fixture
def key() -> str:
    return generate_key()


@pytest.fixture
def services(
    sb: Sandbox, redis_client: redis.Redis, redis_url: str, keys: Keys, key: str
) -> Services:
    return services_for(sb, redis_client, redis_url, keys.prefix, key)


@pytest.fixture
def cli_env(
    sb: Sandbox,
    redis_url: str,
    keys: Keys,
    key: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for name, value in sandbox_env(sb, redis_url, keys.prefix, key).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)


def test_add_over_a_removal_stopped_midway_is_refused_until_the_removal_is_finished(
    sb: Sandbox,
    services: Services,
    cli_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`add` over an unfinished removal exits 1 storing nothing; once finished, add makes anew."""
    user = sb.users[0]
    connection, grants = sandbox_connection(user, time.time())
    services.connections.save(connection, grants)
    assert services.connections.mark_removing(connection.id)  # a remove that stopped midway
    monkeypatch.setenv("CLOSESYNC_CLOSE_ACCESS_TOKEN", user.close_access_token)
    monkeypatch.setenv("CLOSESYNC_CALENDLY_TOKEN", user.calendly_token)
    assert main(["connections", "add"]) == 1
    err = capsys.readouterr().err
    assert f"connection {connection.id} is being removed" in err
    assert "run it again to finish" in err
    assert main(["connections", "remove", connection.id]) == 0
    capsys.readouterr()
    assert main(["connections", "add", "--json"]) == 0
    [fresh] = services.connections.list()
    assert fresh.id != connection.id
    assert fresh.state is ConnectionState.ACTIVE
    report = services.engine(wait_budget=5).run(fresh.id)
    assert report.outcome is Outcome.OK, report.errors
    assert report.created > 0


def test_remove_delete_links_targets_the_calendly_user_stored_when_it_runs(
    sb: Sandbox, services: Services
) -> None:
    """A reconnect to U1 after `remove` read the connection: --delete-links deletes U1's links."""
    u0, u1 = sb.users[0], sb.users[1]
    stale, grants = sandbox_connection(u0, time.time())
    services.connections.save(stale, grants)
    engine = services.engine(wait_budget=5)
    assert engine.run(stale.id).created > 0
    _, theirs = sandbox_connection(u1, time.time())
    moved = stale.model_copy(update={"calendly_user_uri": u1.calendly_user_uri})
    services.connections.save(moved, Grants(close=grants.close, calendly=theirs.calendly))
    assert engine.run(stale.id).created > 0
    removal = remove_connection(services, stale, delete_links=True, revoke=False)
    left = {link["source_id"] for link in sb.world.close_links(u0.close_user_id)}
    assert removal.links_deleted is not None
    assert removal.links_deleted > 0
    assert left
    assert all(sid.startswith(u0.calendly_user_uuid) for sid in left)


def test_remove_that_gives_up_on_the_lock_asks_the_run_holding_it_to_run_once_more(
    sb: Sandbox,
    services: Services,
    cli_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Syncs skipped while a remove waited in vain are made up by one more run of the holder."""
    connection, grants = sandbox_connection(sb.users[0], time.time())
    services.connections.save(connection, grants)
    monkeypatch.setenv("REMOVE_WAIT_SECONDS", "0.3")
    with services.run_lock(connection.id, 30):  # a long run, holding it throughout
        assert main(["connections", "remove", connection.id]) == 1
    assert "nothing was removed" in capsys.readouterr().err
    assert not services.state.is_removed(connection.id)
    assert services.state.pop_rerun(connection.id)
