"""`closesync webhooks list|ensure` and the webhook fields of `closesync status`, end to end
against the sandbox and a real Redis; no signing or callback key in any output, log or Redis."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from closesync.cli.common import when
from closesync.cli.main import main
from closesync.core.connection import ConnectionState
from closesync.sandbox import Sandbox
from closesync.sandbox.records import SeededUser
from closesync.store.keys import Keys
from closesync.store.secretbox import generate_key
from closesync.wiring.services import Services
from tests._broker import queued
from tests._oauth import all_redis_text, sandbox_env, services_for
from tests._sandbox import running_sandbox

# Refused at once, should the sandbox deliver: no DNS lookup, no wait.
BASE = "http://127.0.0.1:9/closesync"


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with running_sandbox(users=3) as sandbox:
        yield sandbox


@pytest.fixture
def services(
    sb: Sandbox,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Services:
    """The environment of every command below, and Services equal to what they build."""
    secret = generate_key()
    env = {
        **sandbox_env(sb, redis_url, keys.prefix, secret),
        "PUBLIC_BASE_URL": BASE,
        "CALENDLY_WEBHOOK_SIGNING_KEY": "app-signing-key-for-tests",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    built = services_for(sb, redis_client, redis_url, keys.prefix, secret)
    return Services.build(
        built.settings.model_copy(update={"public_base_url": BASE}), redis_client=redis_client
    )


def add(user: SeededUser, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> str:
    """`connections add` with the user's tokens on standard input; the new connection's id."""
    lines = (
        f"CLOSESYNC_CLOSE_ACCESS_TOKEN={user.close_access_token}\n"
        f"CLOSESYNC_CALENDLY_TOKEN={user.calendly_token}\n"
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert main(["connections", "add", "--tokens-from-stdin", "--json"]) == 0
    conn_id: str = json.loads(capsys.readouterr().out)["id"]
    return conn_id


def run_json(capsys: Any, *argv: str) -> tuple[int, Any]:
    code = main(list(argv))
    return code, json.loads(capsys.readouterr().out)


def test_connections_add_then_webhooks_list_shows_an_active_user_subscription(
    sb: Sandbox, services: Services, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """`webhooks list --json` shows state, scope, what it serves and Calendly's uri; the text
    table shows the same row; neither shows the callback key."""
    conn_id = add(sb.users[1], monkeypatch, capsys)
    sub = services.webhooks.for_connection(conn_id)
    assert sub is not None
    code, listed = run_json(capsys, "webhooks", "list", "--json")
    assert code == 0
    [row] = listed["subscriptions"]
    assert row["state"] == "active"
    assert row["scope"] == "user"
    assert row["connection_id"] == conn_id
    assert row["serves"] == 1
    assert row["calendly_uri"] == sub.uri
    assert row["signed_by"] == "closesync"
    assert row["last_delivery_at"] is None
    services.webhooks.note_delivery(sub.key, 1_790_000_000.0)
    assert main(["webhooks", "list"]) == 0
    out = capsys.readouterr().out
    assert "STATE" in out
    assert conn_id in out
    assert "active" in out
    assert when(1_790_000_000.0) in out  # the last delivery
    assert sub.key not in out


def test_status_shows_each_connections_webhook_state_and_the_summary_counts_them(
    sb: Sandbox, services: Services, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """status --json: webhook, webhook_reason, last_delivery_at per connection; the summary
    counts connections by webhook state; --all shows why one is refused."""
    active = add(sb.users[1], monkeypatch, capsys)
    sb.world.update_config(calendly_withheld_scopes="webhooks:write")
    refused = add(sb.users[2], monkeypatch, capsys)
    sub = services.webhooks.for_connection(active)
    assert sub is not None
    services.webhooks.note_delivery(sub.key, 1_790_000_000.0)
    code, document = run_json(capsys, "status", "--json")
    assert code == 0
    rows = {row["id"]: row for row in document["connections"]}
    assert (rows[active]["webhook"], rows[active]["last_delivery_at"]) == ("active", 1.79e9)
    assert rows[refused]["webhook"] == "refused"
    assert "webhooks:write" in rows[refused]["webhook_reason"]
    assert main(["status"]) == 0
    assert "webhooks (connections by subscription state): 1 active, 1 refused" in (
        capsys.readouterr().out
    )
    assert main(["status", "--all"]) == 0
    out = capsys.readouterr().out
    assert f"{refused}: webhooks refused:" in out


def test_webhooks_ensure_recreates_a_disabled_one_asks_a_sync_and_exits_0(
    sb: Sandbox,
    services: Services,
    redis_client: redis.Redis,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    """Disabled at Calendly: `ensure --all` re-creates it and queues the connection's sync."""
    conn_id = add(sb.users[1], monkeypatch, capsys)
    sub = services.webhooks.for_connection(conn_id)
    assert sub is not None
    assert sub.uri is not None
    sb.world.disable_subscription(sub.uri.rsplit("/", 1)[1])
    code, report = run_json(capsys, "webhooks", "ensure", "--all", "--json")
    assert code == 0
    [owner] = report["owners"]
    assert (owner["owner"], owner["action"], owner["state"]) == (conn_id, "recreated", "active")
    assert owner["resynced"] == [conn_id]
    runs = queued(redis_client, keys.prefix, "sync")
    assert [(r.task, r.args[0]) for r in runs] == [("closesync.sync_connection", conn_id)]
    assert [s["state"] for s in sb.world.subscription_details()] == ["active"]


def test_webhooks_ensure_exits_1_naming_a_refusal_and_retries_it_once_fixed(
    sb: Sandbox, services: Services, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """A refused subscription makes `ensure` exit 1 with why; once the scope is granted, 0."""
    sb.world.update_config(calendly_withheld_scopes="webhooks:write")
    conn_id = add(sb.users[1], monkeypatch, capsys)
    assert main(["webhooks", "ensure", conn_id]) == 1
    printed = capsys.readouterr()
    assert f"{conn_id}: retried, refused" in printed.out
    assert "webhooks:write" in printed.out
    assert "1 owner(s), 1 not active" in printed.err
    sb.world.update_config(calendly_withheld_scopes="")
    assert main(["webhooks", "ensure", conn_id]) == 0
    assert f"{conn_id}: retried, active" in capsys.readouterr().out


def test_webhooks_ensure_bad_usage_exits_2(
    sb: Sandbox, services: Services, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """No target, ids with --all, an unknown id, or webhooks off: exit 2 saying so."""
    assert main(["webhooks", "ensure"]) == 2
    assert "IDs, or --all" in capsys.readouterr().err
    assert main(["webhooks", "ensure", "conn_000000000000"]) == 2
    capsys.readouterr()
    conn_id = add(sb.users[1], monkeypatch, capsys)
    assert main(["webhooks", "ensure", conn_id, "--all"]) == 2
    capsys.readouterr()
    monkeypatch.setenv("WEBHOOKS_ENABLED", "false")
    assert main(["webhooks", "ensure", "--all"]) == 2
    assert "WEBHOOKS_ENABLED" in capsys.readouterr().err


def test_pause_and_resume_from_the_cli_drop_and_remake_the_subscription(
    sb: Sandbox, services: Services, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """`connections pause` deletes it at Calendly; `resume` subscribes again."""
    conn_id = add(sb.users[1], monkeypatch, capsys)
    assert main(["connections", "pause", conn_id]) == 0
    assert sb.world.subscription_details() == []
    assert services.connections.get(conn_id).state is ConnectionState.PAUSED
    assert main(["connections", "resume", conn_id]) == 0
    assert [s["state"] for s in sb.world.subscription_details()] == ["active"]
    capsys.readouterr()


def test_no_signing_or_callback_key_in_logs_output_or_redis_in_the_clear(
    sb: Sandbox,
    services: Services,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connect, disable, ensure, pause, resume, list, status, remove at DEBUG: the generated
    signing keys never show in logs, output or Redis, nor the callback keys in output."""
    caplog.set_level(logging.DEBUG)
    conn_id = add(sb.users[1], monkeypatch, capsys)
    signing: list[str] = []
    callback: list[str] = []

    def remember() -> None:
        sub = services.webhooks.for_connection(conn_id)
        assert sub is not None
        key = services.webhooks.signing_key(sub.key)
        assert key is not None
        signing.append(key.get_secret_value())
        callback.append(sub.key)

    remember()
    first = services.webhooks.for_connection(conn_id)
    assert first is not None
    assert first.uri is not None
    sb.world.disable_subscription(first.uri.rsplit("/", 1)[1])
    main(["webhooks", "ensure", "--all"])
    remember()
    main(["connections", "pause", conn_id])
    main(["connections", "resume", conn_id])
    remember()
    redis_text = all_redis_text(redis_client)
    for argv in (
        ["webhooks", "list"],
        ["webhooks", "list", "--json"],
        ["status", "--json"],
        ["status", "--all"],
        ["webhooks", "ensure", conn_id, "--json"],
        ["connections", "remove", conn_id, "--revoke"],
    ):
        main(argv)
    printed = capsys.readouterr()
    logs = caplog.text + "\n".join(repr(r.__dict__) for r in caplog.records)
    assert len(set(signing)) == 3  # made on add, by the re-creation, on resume
    for secret in signing:
        assert secret not in logs
        assert secret not in printed.out + printed.err
        assert secret not in redis_text
    for key in callback:
        assert key not in printed.out + printed.err


def test_webhooks_ensure_exits_1_when_an_owner_needing_reauth_is_skipped(
    sb: Sandbox, services: Services, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """A connection needing re-authorization has no working subscription: `ensure` counts it
    not active and exits 1 (it used to be skipped with state None and exit 0)."""
    conn_id = add(sb.users[1], monkeypatch, capsys)
    services.connections.set_state(conn_id, ConnectionState.NEEDS_REAUTH)
    code, report = run_json(capsys, "webhooks", "ensure", "--all", "--json")
    assert code == 1
    [owner] = report["owners"]
    assert (owner["owner"], owner["action"], owner["reason"]) == (
        conn_id,
        "skipped",
        "needs_reauth",
    )
    assert report["failed"] == 1


def test_webhooks_ensure_help_documents_its_exit_codes(capsys: Any) -> None:
    """`webhooks ensure --help` says what exit codes 0, 1 and 2 mean."""
    with pytest.raises(SystemExit):
        main(["webhooks", "ensure", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "exit codes: 0" in text
    assert "1 at least one" in text
    assert "2 bad usage" in text
