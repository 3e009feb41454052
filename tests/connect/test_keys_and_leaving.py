"""`closesync keys` and `closesync connections remove --revoke --delete-links` end to end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from cryptography.fernet import Fernet

from closesync.cli.main import main
from closesync.connect.organizations import Organizations
from closesync.core.errors import EncryptionError
from closesync.sandbox import Sandbox
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
