"""`closesync keys` and `closesync connections remove --revoke --delete-links` end to end."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from cryptography.fernet import Fernet

from closesync.cli.main import main
from closesync.connect.organizations import Organizations
from closesync.core.errors import EncryptionError
from closesync.core.mapping import source_id_for
from closesync.core.report import Outcome, RunMode
from closesync.sandbox import CLOSE_CLIENT_ID, Sandbox
from closesync.sandbox.connections import sandbox_connection
from closesync.store.connections import ConnectionStore
from closesync.store.keys import Keys
from closesync.store.secretbox import FernetBox, generate_key
from closesync.wiring.services import Services
from tests._oauth import follow, sandbox_env, services_for, web_process
from tests._sandbox import running_sandbox


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with running_sandbox(users=3) as sandbox:
        yield sandbox


@pytest.fixture
def old_key() -> str:
    return generate_key()


@pytest.fixture
def services(
    sb: Sandbox, redis_client: redis.Redis, redis_url: str, keys: Keys, old_key: str
) -> Services:
    return services_for(sb, redis_client, redis_url, keys.prefix, old_key)


@pytest.fixture
def cli_env(
    sb: Sandbox,
    redis_url: str,
    keys: Keys,
    old_key: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> dict[str, str]:
    env = sandbox_env(sb, redis_url, keys.prefix, old_key)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return env


def connect(sb: Sandbox, web_url: str, browser: requests.Session, path: str, email: str) -> None:
    if path == "/connect/organization":
        sb.world.set_oauth_next("calendly", user_email=email)
    else:
        sb.world.set_oauth_next("close", user_email=email)
        if sb.world.user_by_email("calendly", email) is not None:
            sb.world.set_oauth_next("calendly", user_email=email)
    answer, _ = follow(browser, web_url + path)
    assert answer is not None
    assert answer.status_code == 200, answer.text


def test_keys_generate_prints_one_fernet_key(capsys: pytest.CaptureFixture[str]) -> None:
    """`keys generate` prints a key Fernet accepts, and nothing else."""
    assert main(["keys", "generate"]) == 0
    Fernet(capsys.readouterr().out.strip())


def test_keys_rotate_reseals_every_grant_so_the_old_key_can_go(
    sb: Sandbox,
    services: Services,
    cli_env: dict[str, str],
    old_key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With the new key first and the old second, rotate re-seals connections, org and waiting."""
    stranger = sb.users[2]
    with sb.world.lock:
        sb.world.close_users[stranger.close_user_id].email = "nobody@elsewhere.example"
    with web_process(services) as web, requests.Session() as browser:
        connect(sb, web.url, browser, "/connect/organization", sb.users[0].email)
        connect(sb, web.url, browser, "/connect", sb.users[1].email)
        connect(sb, web.url, browser, "/connect", "nobody@elsewhere.example")
    [connection] = services.connections.list()
    before = services.connections.grants(connection.id)
    new_key = generate_key()
    monkeypatch.setenv("CLOSESYNC_ENCRYPTION_KEYS", f"{new_key},{old_key}")
    # Old key second: everything still decrypts before the rotation.
    assert main(["connections", "show", connection.id, "--json"]) == 0
    capsys.readouterr()
    assert main(["keys", "rotate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "re_encrypted": 3,
        "keys": 2,
        "current": 3,
        "older_key": 0,
        "unencrypted": 0,
        "unreadable": 0,
        "unbound": 0,
    }
    only_new = ConnectionStore(services.redis, services.keys, FernetBox([new_key]))
    assert only_new.grants(connection.id) == before
    only_old = ConnectionStore(services.redis, services.keys, FernetBox([old_key]))
    with pytest.raises(EncryptionError):
        only_old.grants(connection.id)
    monkeypatch.setenv("CLOSESYNC_ENCRYPTION_KEYS", new_key)
    assert main(["sync", connection.id]) == 0


def test_keys_check_finds_grants_still_under_an_older_key(
    sb: Sandbox,
    services: Services,
    cli_env: dict[str, str],
    old_key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before rotation `keys check` says a grant needs the old key (exit 1); after, exit 0."""
    with web_process(services) as web, requests.Session() as browser:
        connect(sb, web.url, browser, "/connect", sb.users[1].email)
    new_key = generate_key()
    monkeypatch.setenv("CLOSESYNC_ENCRYPTION_KEYS", f"{new_key},{old_key}")
    assert main(["keys", "check"]) == 1
    assert "1 with an older key" in capsys.readouterr().out
    assert main(["keys", "rotate"]) == 0
    out = capsys.readouterr().out
    assert "1 grant(s) sealed with the first key, 0 with an older key, 0 unencrypted" in out
    assert "keys after the first can now be removed" in out
    assert main(["keys", "check", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "current": 1,
        "older_key": 0,
        "unencrypted": 0,
        "unreadable": 0,
        "unbound": 0,
    }


def test_keys_rotate_without_keys_refuses(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keys rotate` without CLOSESYNC_ENCRYPTION_KEYS exits 2 with a clear message."""
    monkeypatch.delenv("CLOSESYNC_ENCRYPTION_KEYS")
    assert main(["keys", "rotate"]) == 2
    assert "CLOSESYNC_ENCRYPTION_KEYS is not set" in capsys.readouterr().err


def test_remove_revoke_delete_links_cleans_both_providers_and_state(
    sb: Sandbox, services: Services, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """remove --revoke --delete-links deletes our links, revokes both grants, erases state."""
    user = sb.users[1]
    with web_process(services) as web, requests.Session() as browser:
        connect(sb, web.url, browser, "/connect", user.email)
    [connection] = services.connections.list()
    report = services.engine(wait_budget=5).run(connection.id)
    assert report.created > 0
    grants = services.connections.grants(connection.id)
    manual = sb.world.create_link(user.close_user_id, name="Mine", url="https://x.example/m")
    assert (
        main(["connections", "remove", connection.id, "--revoke", "--delete-links", "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["links_deleted"] == report.created
    assert out["revoked"] == ["close", "calendly"]
    left = sb.world.close_links(user.close_user_id)
    assert [link["id"] for link in left] == [manual["id"]]
    for token in (grants.close.refresh_token, grants.calendly.refresh_token):
        assert token is not None
        assert sb.world.tokens.tokens[token.get_secret_value()].revoked
    assert list(services.redis.scan_iter(f"{services.keys.prefix}:conn:*")) == []


def test_remove_revoke_spares_shared_grant_until_last_user_leaves(
    sb: Sandbox, services: Services, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """In organization mode the shared Calendly grant is revoked only with its last user."""
    with web_process(services) as web, requests.Session() as browser:
        connect(sb, web.url, browser, "/connect/organization", sb.users[0].email)
        connect(sb, web.url, browser, "/connect", sb.users[1].email)
        connect(sb, web.url, browser, "/connect", sb.users[2].email)
    first, second = services.connections.list()
    ref = first.calendly_grant_ref
    assert ref is not None
    shared = services.connections.shared_grant(ref)
    assert main(["connections", "remove", first.id, "--revoke", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] == ["close"]
    assert services.connections.grants(second.id).calendly == shared
    assert main(["connections", "remove", second.id, "--revoke", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] == ["close", "calendly organization"]
    assert shared.refresh_token is not None
    assert sb.world.tokens.tokens[shared.refresh_token.get_secret_value()].revoked
    assert Organizations(services).credentials.refs() == []


def test_remove_delete_links_and_engine_agree_other_users_and_apps_links_left(
    sb: Sandbox, services: Services, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """--delete-links deletes exactly the links the engine owns; look-alikes stay for both."""
    world = sb.world
    # Close's listing may show the whole organization's links (undocumented): let it.
    world.update_config(close_lists_organization_links=True)
    user, colleague = sb.users[0], sb.users[1]
    connection, grants = sandbox_connection(user, time.time())
    services.connections.save(connection, grants)
    engine = services.engine(wait_budget=5)
    assert engine.run(connection.id).created > 0
    # Our source_id format for this Calendly user, of an event type that does not exist: a link
    # either side took for its own would be deleted (or counted) by it.
    lookalike = source_id_for(user.calendly_user_uuid, "GONE00000000")
    fields = {"name": "Look-alike", "url": "https://x.example/l", "source_id": lookalike}
    others = [
        world.create_link(
            colleague.close_user_id, "THIRD_PARTY", oauth_client_id=CLOSE_CLIENT_ID, **fields
        ),
        world.create_link(
            user.close_user_id, "THIRD_PARTY", oauth_client_id="oa2client_other", **fields
        ),
        world.create_link(user.close_user_id, "CALENDLY", **fields),
        world.create_link(user.close_user_id, "MANUAL", name="Mine", url="https://x.example/m"),
    ]
    ours = {
        link["source_id"]
        for link in world.close_links(user.close_user_id)
        if link["oauth_client_id"] == CLOSE_CLIENT_ID
    }

    world.reset_request_counts()
    drift = engine.run(connection.id, mode=RunMode.DRIFT)
    assert (drift.outcome, drift.deleted) == (Outcome.OK, 0), drift.errors
    assert set(services.state.records(connection.id)) == ours
    delete = "close DELETE /api/v1/scheduling_link/integration/{source_id}/"
    assert delete not in world.request_counts()

    assert main(["connections", "remove", connection.id, "--delete-links", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["links_deleted"] == len(ours)
    assert world.request_counts()[delete] == len(ours)
    assert sorted(link["id"] for link in world.close_links()) == sorted(o["id"] for o in others)


def test_remove_run_holding_lock_past_wait_exits_one_nothing_removed(
    sb: Sandbox,
    services: Services,
    cli_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A run that keeps the lock past REMOVE_WAIT_SECONDS: exit 1, and the connection syncs on."""
    connection, grants = sandbox_connection(sb.users[0], time.time())
    services.connections.save(connection, grants)
    monkeypatch.setenv("REMOVE_WAIT_SECONDS", "0.3")
    with services.run_lock(connection.id, 30):
        assert main(["connections", "remove", connection.id, "--delete-links"]) == 1
    err = capsys.readouterr().err
    assert "REMOVE_WAIT_SECONDS" in err
    assert "nothing was removed" in err
    assert not services.state.is_removed(connection.id)
    assert services.engine(wait_budget=5).run(connection.id).outcome is Outcome.OK


def test_remove_stopped_midway_keeps_connection_out_of_runs_until_rerun(
    sb: Sandbox,
    services: Services,
    cli_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A remove whose link deletion fails exits 1; no run recreates links; a rerun finishes it."""
    user = sb.users[0]
    connection, grants = sandbox_connection(user, time.time())
    services.connections.save(connection, grants)
    engine = services.engine(wait_budget=5)
    assert engine.run(connection.id).created > 0
    sb.world.add_fault(
        api="close", kind="500", method="DELETE", path_prefix="/api/v1/scheduling_link/", skip=1
    )
    monkeypatch.setenv("INLINE_WAIT_BUDGET_SECONDS", "0")
    assert main(["connections", "remove", connection.id, "--delete-links"]) == 1
    err = capsys.readouterr().err
    assert "stopped midway" in err
    assert "again to finish" in err
    assert len(sb.world.close_links(user.close_user_id)) > 0
    report = engine.run(connection.id)
    assert (report.outcome, report.failure) == (Outcome.SKIPPED, "removed")
    assert main(["connections", "remove", connection.id, "--delete-links"]) == 0
    assert sb.world.close_links(user.close_user_id) == []
    keys = services.keys
    assert list(services.redis.scan_iter(f"{keys.prefix}:*{connection.id}*")) == [
        keys.removed(connection.id)
    ]


def test_remove_revoke_or_delete_links_without_key_exits_2_and_changes_nothing(
    sb: Sandbox,
    services: Services,
    cli_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """remove --revoke/--delete-links on a shell without a key refuses before marking anything."""
    connection, grants = sandbox_connection(sb.users[0], time.time())
    services.connections.save(connection, grants)
    monkeypatch.delenv("CLOSESYNC_ENCRYPTION_KEYS")
    for options in (["--revoke"], ["--delete-links"], ["--revoke", "--delete-links"]):
        assert main(["connections", "remove", connection.id, *options]) == 2
        assert "CLOSESYNC_ENCRYPTION_KEYS is not set" in capsys.readouterr().err
        assert not services.state.is_removed(connection.id)
    assert services.engine(wait_budget=5).run(connection.id).outcome is Outcome.OK


def test_keys_rotate_leaves_a_planted_plaintext_grant_refused_unless_asked_to_seal(
    sb: Sandbox,
    services: Services,
    cli_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A `plain:` value written under a victim's key by someone without a key stays refused
    through `keys rotate`; only `keys rotate --seal-plaintext` (explicit) encrypts it."""
    victim, grants = sandbox_connection(sb.users[0], time.time())
    services.connections.save(victim, grants)
    attacker = sb.users[1]
    planted = {
        side: {"kind": "pat", "access_token": token, "refresh_token": None, "expires_at": None}
        for side, token in (
            ("close", attacker.close_access_token),
            ("calendly", attacker.calendly_token),
        )
    }
    services.redis.set(
        services.keys.grants(victim.id),
        "plain:" + base64.b64encode(json.dumps(planted).encode()).decode(),
    )
    report = services.engine(wait_budget=5).run(victim.id)
    assert report.outcome is Outcome.FAILED
    assert "run `closesync keys rotate`" not in " ".join(report.errors)
    assert main(["keys", "rotate"]) == 1  # the operator rotates, as an upgrade would
    out = capsys.readouterr().out
    assert "1 unencrypted" in out
    assert "--seal-plaintext" in out
    with pytest.raises(EncryptionError):
        services.connections.grants(victim.id)  # still refused, never sealed as the victim's
    assert sb.world.close_links(sb.users[0].close_user_id) == []
    assert main(["keys", "rotate", "--seal-plaintext", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unencrypted"] == 0
    sealed = services.connections.grants(victim.id).calendly.access_token.get_secret_value()
    assert sealed == attacker.calendly_token  # what the operator explicitly chose to keep


def test_remove_revoke_keeps_the_shared_grant_while_close_users_wait_for_it(
    sb: Sandbox, services: Services, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The last connection leaving does not tear down the credential a Close user waits for."""
    waiting = sb.users[2]
    with sb.world.lock:
        sb.world.close_users[waiting.close_user_id].email = "late@example.com"
    with web_process(services) as web, requests.Session() as browser:
        connect(sb, web.url, browser, "/connect/organization", sb.users[0].email)
        connect(sb, web.url, browser, "/connect", sb.users[1].email)
        connect(sb, web.url, browser, "/connect", "late@example.com")
    [connection] = services.connections.list()
    ref = connection.calendly_grant_ref
    assert ref is not None
    shared = services.connections.shared_grant(ref)
    assert main(["connections", "remove", connection.id, "--revoke", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] == ["close"]
    assert Organizations(services).credentials.refs() == [ref]
    assert services.connections.shared_grant(ref) == shared
    sb.world.create_user(email="late@example.com", name="Late Comer")
    assert [c.close_user_id for c in Organizations(services).pair_waiting()] == [
        waiting.close_user_id
    ]
