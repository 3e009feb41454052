"""The `closesync` command line, run in-process against the sandbox and a real Redis."""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from closesync.cli.main import main
from closesync.sandbox import Sandbox, SandboxConfig
from closesync.sandbox.records import SeededUser
from closesync.store.secretbox import generate_key


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    sb = Sandbox.start(SandboxConfig(seed=5, users=2, event_types=6, freeze_clock=True))
    try:
        yield sb
    finally:
        sb.stop()


@pytest.fixture
def env(sandbox: Sandbox, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """Point closesync at the sandbox and at a fresh key prefix on the test Redis."""
    for name, value in sandbox.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_PREFIX", f"cli-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("INLINE_WAIT_BUDGET_SECONDS", "0")
    monkeypatch.setenv("CLOSESYNC_ENCRYPTION_KEYS", generate_key())
    return sandbox


def _add(user: SeededUser, *extra: str) -> list[str]:
    return [
        "connections", "add",
        "--close-access-token", user.close_access_token,
        "--calendly-token", user.calendly_token,
        *extra,
    ]  # fmt: skip


def _json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


def test_cli_add_prints_id_and_lists_without_tokens(
    env: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """`connections add --json` prints an object with an id; list/show never show a token."""
    user = env.users[0]
    assert main([*_add(user), "--json"]) == 0
    added = _json(capsys)
    assert added["id"].startswith("conn_")
    assert added["close_user_id"] == user.close_user_id
    assert main(["connections", "list", "--json"]) == 0
    assert main(["connections", "show", added["id"], "--json"]) == 0
    assert main(["connections", "list"]) == 0
    out = capsys.readouterr().out
    assert added["id"] in out
    for token in (user.close_access_token, user.calendly_token):
        assert token not in out


def test_cli_add_same_close_user_updates_the_connection(
    env: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """Adding a Close user twice updates the one connection instead of making a second."""
    user = env.users[0]
    main([*_add(user), "--json"])
    first = _json(capsys)
    main([*_add(user), "--name", "renamed", "--json"])
    second = _json(capsys)
    assert second["id"] == first["id"]
    assert second["updated"] is True
    main(["connections", "list", "--json"])
    listed = _json(capsys)
    assert [c["name"] for c in listed] == ["renamed"]


def test_cli_add_again_with_new_tokens_revokes_the_old_grant_same_tokens_revoke_nothing(
    env: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-adding a Close user with a new grant revokes the replaced one; the same tokens stay."""
    from closesync.sandbox import CLOSE_CLIENT_ID, CLOSE_CLIENT_SECRET

    monkeypatch.setenv("CLOSE_CLIENT_ID", CLOSE_CLIENT_ID)
    monkeypatch.setenv("CLOSE_CLIENT_SECRET", CLOSE_CLIENT_SECRET)
    user = env.users[0]
    world = env.world
    refresh = ["--close-refresh-token", user.close_refresh_token]
    assert main([*_add(user), *refresh]) == 0
    assert main([*_add(user), *refresh, "--name", "renamed"]) == 0
    with world.lock:
        assert not world.tokens.tokens[user.close_access_token].revoked
        now = world.now()
        new = world.tokens.issue_grant("close", user.close_user_id, CLOSE_CLIENT_ID, "", 3600, now)
    assert main(
        ["connections", "add", "--close-access-token", new.access.value,
         "--close-refresh-token", new.refresh.value, "--calendly-token", user.calendly_token]
    ) == 0  # fmt: skip
    capsys.readouterr()
    with world.lock:
        tokens = world.tokens.tokens
        assert tokens[user.close_access_token].revoked
        assert tokens[user.close_refresh_token].revoked
        assert not tokens[new.access.value].revoked
        assert not tokens[user.calendly_token].revoked  # a personal token: never revoked


def test_cli_add_bad_token_one_line_error_nothing_stored(
    env: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused token exits 2 with one line naming the API and stores nothing."""
    user = env.users[0]
    monkeypatch.setenv("CLOSESYNC_CLOSE_ACCESS_TOKEN", "close_at_bogus")
    monkeypatch.setenv("CLOSESYNC_CALENDLY_TOKEN", user.calendly_token)
    code = main(["connections", "add"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1
    assert "Close access token was refused" in captured.err
    assert "GET /me/ answered 401" in captured.err
    assert "close_at_bogus" not in captured.err
    main(["connections", "list", "--json"])
    assert _json(capsys) == []


def test_cli_add_calendly_user_of_another_connection_exits_two_naming_it(
    env: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adding a second Close user with an already connected Calendly user exits 2, storing none."""
    first, second = env.users[0], env.users[1]
    assert main([*_add(first), "--json"]) == 0
    held = _json(capsys)["id"]
    monkeypatch.setenv("CLOSESYNC_CLOSE_ACCESS_TOKEN", second.close_access_token)
    monkeypatch.setenv("CLOSESYNC_CALENDLY_TOKEN", first.calendly_token)
    code = main(["connections", "add"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1
    assert f"already connected to Close user {first.email} by connection {held}" in captured.err
    assert first.calendly_token not in captured.err
    main(["connections", "list", "--json"])
    assert [c["close_user_id"] for c in _json(capsys)] == [first.close_user_id]


def test_cli_add_close_organization_outside_allowlist_exits_two(
    env: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CLOSE_ORGANIZATION_IDS naming another organization refuses the add; nothing is stored."""
    monkeypatch.setenv("CLOSE_ORGANIZATION_IDS", "orga_another, orga_third")
    user = env.users[0]
    assert main(_add(user)) == 2
    err = capsys.readouterr().err
    assert f"organization {user.close_organization_id} is not one this closesync serves" in err
    main(["connections", "list", "--json"])
    assert _json(capsys) == []
    monkeypatch.setenv("CLOSE_ORGANIZATION_IDS", f"orga_another,{user.close_organization_id}")
    assert main(_add(user)) == 0


def test_cli_sync_dry_run_then_sync_then_status(
    env: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dry run writes nothing; sync creates; status shows the last run's counts."""
    user = env.users[0]
    main([*_add(user), "--json"])
    conn = _json(capsys)
    assert main(["sync", conn["id"], "--dry-run"]) == 0
    assert "create " in capsys.readouterr().out
    assert [link for link in env.world.close_links(user.close_user_id)] == []
    assert main(["sync", "--all", "--json"]) == 0
    result = _json(capsys)
    assert result["ok"] is True
    created = result["connections"][0]["created"]
    assert created > 0
    assert main(["status", "--json"]) == 0
    status = _json(capsys)
    row = status["connections"][0]
    assert row["state"] == "active"
    assert row["last_run"]["created"] == created
    assert main(["status"]) == 0
    assert conn["id"] in capsys.readouterr().out


def test_cli_sync_stderr_not_a_terminal_writes_no_progress(
    env: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With stderr piped there is no progress bar: stderr stays empty, stdout has the report."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    main([*_add(env.users[0]), "--json"])
    conn = _json(capsys)["id"]
    assert main(["sync", conn]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert re.match(rf"{conn}  sync  ok  created [1-9]\d*, ", captured.out)


def test_cli_sync_stderr_a_terminal_shows_the_bar_and_leaves_stdout_plain(
    env: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a terminal on stderr the bar names the connection and counts done/total of the
    writes; the report on stdout is the same plain line as without one."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    main([*_add(env.users[0]), "--json"])
    conn = _json(capsys)["id"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["sync", conn]) == 0
    captured = capsys.readouterr()
    line = re.match(rf"{conn}  sync  ok  created (\d+), ", captured.out)
    assert line is not None
    created = int(line.group(1))
    assert created > 0
    assert conn in captured.err
    assert f"{created}/{created}" in captured.err
    assert "\x1b" not in captured.out


def test_cli_sync_failure_exits_one_and_status_shows_the_error(
    env: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """A connection that failed makes `sync` exit 1; `status` shows the error naming its cause."""
    user = env.users[0]
    main([*_add(user), "--json"])
    capsys.readouterr()
    env.world.add_fault(api="calendly", kind="html", path_prefix="/event_types", count=20)
    assert main(["sync", "--all"]) == 1
    assert "Calendly GET /event_types answered 502 with an HTML page" in capsys.readouterr().out
    main(["status", "--json"])
    status = _json(capsys)
    assert "answered 502" in status["connections"][0]["last_error"]


def test_cli_usage_errors_exit_two(env: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """No target, ids with --all, or an unknown id: exit 2 and a clear message."""
    assert main(["sync"]) == 2
    assert "--all" in capsys.readouterr().err
    assert main(["sync", "conn_000000000000", "--all"]) == 2
    capsys.readouterr()
    assert main(["sync", "conn_000000000000"]) == 2
    assert "conn_000000000000" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["sync", "--no-such-flag"])
    assert exited.value.code == 2


def test_cli_pause_resume_and_remove(env: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """Pause keeps a connection out of `sync --all`; remove forgets it."""
    main([*_add(env.users[0]), "--json"])
    conn = _json(capsys)
    assert main(["connections", "pause", conn["id"]]) == 0
    capsys.readouterr()
    main(["sync", "--all", "--json"])
    result = _json(capsys)
    assert result["connections"] == []
    assert main(["connections", "resume", conn["id"]]) == 0
    assert main(["connections", "remove", conn["id"]]) == 0
    capsys.readouterr()
    assert main(["connections", "show", conn["id"]]) == 2


def test_cli_redis_unreachable_exits_one_naming_redis(
    env: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis that cannot be reached gives one line naming it, without its password."""
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert "Redis at redis://127.0.0.1:1/0" in err or "127.0.0.1:1" in err
    assert "hunter2" not in err


def test_cli_add_token_with_odd_characters_names_the_option(
    env: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pasted token with a curly quote is refused before any call, naming the option only."""
    user = env.users[0]
    code = main(
        ["connections", "add", "--close-access-token", "close_at_x’",
         "--calendly-token", user.calendly_token]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "--close-access-token is not a token" in err
    assert "close_at_x" not in err
    assert env.world.request_counts() == {}


def test_cli_status_shows_held_deletions_with_the_command_to_release_them(
    env: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """Held mass deletions appear in status (summary, --all, JSON) with the connection's command."""
    world = env.world
    user = world.create_user()
    made = [world.create_event_type(user.calendly_user_uuid, name=f"H{i}") for i in range(10)]
    main([*_add(user), "--json"])
    conn = _json(capsys)["id"]
    assert main(["sync", conn]) == 0
    for event_type in made[:8]:
        world.delete_event_type(event_type["uri"].rsplit("/", 1)[-1])
    assert main(["sync", conn]) == 0
    assert f"closesync sync --allow-mass-delete {conn}" in capsys.readouterr().out
    assert main(["status", "--json"]) == 0
    row = _json(capsys)["connections"][0]
    assert len(row["held_deletions"]["source_ids"]) == 8
    assert main(["status"]) == 0
    summary = capsys.readouterr().out
    assert f"held deletions: 1\n  {conn}  " in summary
    assert f"closesync sync --allow-mass-delete {conn}" in summary
    assert main(["status", "--all"]) == 0
    assert f"{conn}: held deletions:" in capsys.readouterr().out
    assert main(["sync", conn, "--allow-mass-delete"]) == 0
    capsys.readouterr()
    main(["status", "--json"])
    assert _json(capsys)["connections"][0]["held_deletions"] is None


def test_cli_status_says_every_link_of_a_small_connection_is_held(
    env: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both links of a two-link user going are held; status says so and how to release them."""
    world = env.world
    user = world.create_user()
    made = [world.create_event_type(user.calendly_user_uuid, name=f"T{i}") for i in range(2)]
    main([*_add(user), "--json"])
    conn = _json(capsys)["id"]
    assert main(["sync", conn]) == 0
    for event_type in made:
        world.delete_event_type(event_type["uri"].rsplit("/", 1)[-1])
    assert main(["sync", conn]) == 0
    capsys.readouterr()
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "held deletions: 1\n" in out
    assert f"{conn}  {user.email}: 2 deletions would remove every link of this connection" in out
    assert f"run `closesync sync --allow-mass-delete {conn}`" in out
    assert main(["status", "--all"]) == 0
    rows = capsys.readouterr().out
    assert f"{conn}: held deletions: 2 deletions would remove every link of this connection" in rows
    assert main(["sync", conn, "--allow-mass-delete"]) == 0
    assert world.close_links(user.close_user_id) == []


def test_cli_empty_settings_in_the_environment_mean_unset(
    env: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`LOG_FORMAT=` and `SENTRY_DSN=` as .env.example writes them are the defaults, not errors."""
    monkeypatch.setenv("LOG_FORMAT", "")
    monkeypatch.setenv("SENTRY_DSN", "")
    assert main(["status", "--json"]) == 0
    assert _json(capsys) == {"connections": []}


def test_cli_connection_options_override_the_settings_per_connection(
    env: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """`connections set ID --secret exclude` drops that user's secret types; `default` restores."""
    world = env.world
    user = world.create_user()
    world.create_event_type(user.calendly_user_uuid, name="Open call")
    world.create_event_type(user.calendly_user_uuid, name="Hidden call", secret=True)
    main([*_add(user), "--json"])
    conn = _json(capsys)["id"]

    def names() -> set[str]:
        links = world.close_links(user.close_user_id)
        return {link["name"] for link in links if link["source"] == "THIRD_PARTY"}

    assert main(["sync", conn]) == 0
    assert names() == {"Open call", "Hidden call"}
    capsys.readouterr()
    assert main(["connections", "set", conn, "--secret", "exclude", "--json"]) == 0
    assert _json(capsys)["options"] == {"include_secret": False, "include_one_off": None}
    assert main(["sync", conn]) == 0
    assert names() == {"Open call"}
    assert main(["connections", "set", conn, "--secret", "default"]) == 0
    assert main(["sync", conn]) == 0
    assert names() == {"Open call", "Hidden call"}
    capsys.readouterr()
    assert main(["connections", "set", conn]) == 2
    assert "--secret" in capsys.readouterr().err


def test_cli_sync_all_concurrency_runs_overlap_reports_in_stored_order(
    env: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --concurrency 2, one connection's listing held until its read timeout does not hold
    up the other, which finishes first; the reports still come in the stored order, exit 1."""
    monkeypatch.setenv("HTTP_READ_TIMEOUT", "3")
    for user in env.users:
        main([*_add(user), "--json"])
    capsys.readouterr()
    main(["connections", "list", "--json"])
    stored = [c["id"] for c in _json(capsys)]
    # Whichever listing reaches the sandbox first hangs; the other run goes on meanwhile.
    env.world.add_fault(api="calendly", kind="hang", path_prefix="/event_types", count=1)
    assert main(["sync", "--all", "--json", "--concurrency", "2"]) == 1
    result = _json(capsys)
    reports = result["connections"]
    assert [r["connection_id"] for r in reports] == stored
    held = next(r for r in reports if r["outcome"] == "failed")
    other = next(r for r in reports if r["outcome"] == "ok")
    assert "timed out" in held["errors"][-1]
    assert other["finished_at"] < held["finished_at"]


def test_cli_sync_concurrency_below_one_exits_two(
    env: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """--concurrency 0 is bad usage: exit 2, naming the option, before any run."""
    assert main(["sync", "--all", "--concurrency", "0"]) == 2
    assert "--concurrency must be at least 1" in capsys.readouterr().err
