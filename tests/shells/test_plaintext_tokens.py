"""Tokens are stored unencrypted only by explicit choice, never because the API URLs are local.

A deployment whose API URLs are on loopback (the sandbox, but also an egress proxy or a sidecar on
127.0.0.1) must not silently store tokens in the clear: without CLOSESYNC_ENCRYPTION_KEYS a token
is stored only with CLOSESYNC_ALLOW_PLAINTEXT_TOKENS=true (warned at every start). Commands that
decrypt nothing work without a key; processes that store tokens refuse to start without one.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from closesync.cli.main import main
from closesync.sandbox import Sandbox
from closesync.sandbox.records import SeededUser
from closesync.store.keys import Keys
from closesync.store.secretbox import generate_key
from tests._oauth import sandbox_env, services_for
from tests._sandbox import running_sandbox

PLAINTEXT_WARNING = "CLOSESYNC_ALLOW_PLAINTEXT_TOKENS"


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with running_sandbox(users=1) as sandbox:
        yield sandbox


@pytest.fixture
def no_key_env(
    sb: Sandbox, redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> dict[str, str]:
    """Every closesync setting pointing at the sandbox (all four URLs on loopback), no key."""
    env = sandbox_env(sb, redis_url, keys.prefix, None)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CLOSESYNC_ENCRYPTION_KEYS", raising=False)
    monkeypatch.delenv("CLOSESYNC_ALLOW_PLAINTEXT_TOKENS", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env
    return env


def _add(user: SeededUser) -> list[str]:
    return [
        "connections", "add",
        "--close-access-token", user.close_access_token,
        "--calendly-token", user.calendly_token,
    ]  # fmt: skip


def test_cli_add_on_loopback_without_key_refuses_and_stores_nothing(
    sb: Sandbox,
    no_key_env: dict[str, str],
    redis_client: redis.Redis,
    keys: Keys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Loopback API URLs and no key: `connections add` exits 2 naming the key; Redis stays empty."""
    assert main(_add(sb.users[0])) == 2
    err = capsys.readouterr().err
    assert "CLOSESYNC_ENCRYPTION_KEYS is not set" in err
    assert PLAINTEXT_WARNING in err  # the explicit way out is named too
    assert list(redis_client.scan_iter(f"{keys.prefix}:*")) == []


def test_cli_status_and_list_without_key_against_real_apis_work(
    sb: Sandbox,
    redis_url: str,
    redis_client: redis.Redis,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`status` and `connections list` decrypt nothing, so they run (exit 0) without a key."""
    services = services_for(sb, redis_client, redis_url, keys.prefix, generate_key())
    from closesync.sandbox.connections import sandbox_connection

    connection, grants = sandbox_connection(sb.users[0], 1.0)
    services.connections.save(connection, grants)
    for name in ("CLOSESYNC_ENCRYPTION_KEYS", "CLOSESYNC_ALLOW_PLAINTEXT_TOKENS", *sb.env()):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_PREFIX", keys.prefix)
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 0
    assert main(["connections", "list"]) == 0
    assert main(["connections", "show", connection.id]) == 0
    captured = capsys.readouterr()
    assert connection.id in captured.out
    assert captured.err == ""


def test_cli_add_with_plaintext_allowed_stores_unencrypted_and_warns(
    sb: Sandbox,
    no_key_env: dict[str, str],
    redis_client: redis.Redis,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CLOSESYNC_ALLOW_PLAINTEXT_TOKENS=true stores the grants as `plain:`… and logs a warning."""
    monkeypatch.setenv("CLOSESYNC_ALLOW_PLAINTEXT_TOKENS", "true")
    caplog.set_level(logging.WARNING)
    assert main(_add(sb.users[0])) == 0
    [grants_key] = list(redis_client.scan_iter(f"{keys.prefix}:conn:*:grants"))
    assert str(redis_client.get(grants_key)).startswith("plain:")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("stored unencrypted" in r.getMessage() for r in warned), caplog.text


def _free_port() -> str:
    """A loopback port free right now (`web --port 0` falls back to PUBLIC_BASE_URL's port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _process_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        **env,
        "LOG_FORMAT": "json",
        "DATA_DIR": str(tmp_path / "var"),
    }


@pytest.mark.parametrize("command", [["web"], ["run", "--concurrency", "1"]])
def test_daemon_without_key_on_loopback_exits_2_naming_the_key(
    no_key_env: dict[str, str], tmp_path: Path, command: list[str]
) -> None:
    """`closesync web` and `closesync run` refuse to start without a key: exit 2, one clear line."""
    port = ["--port", _free_port()] if command == ["web"] else []
    done = subprocess.run(
        [sys.executable, "-m", "closesync", *command, *port],
        cwd=tmp_path,
        env=_process_env(no_key_env, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "CLOSESYNC_ENCRYPTION_KEYS is not set" in done.stderr
    assert "Traceback" not in done.stderr


def test_web_with_plaintext_allowed_warns_at_start(
    no_key_env: dict[str, str], tmp_path: Path
) -> None:
    """With the explicit allowance `closesync web` starts, but first warns: tokens in the clear."""
    env = {**_process_env(no_key_env, tmp_path), "CLOSESYNC_ALLOW_PLAINTEXT_TOKENS": "true"}
    web = subprocess.Popen(
        [sys.executable, "-m", "closesync", "web", "--port", _free_port()],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert web.stderr is not None
        for line in web.stderr:
            lines.append(line)
            if line.startswith("closesync web on"):
                break
    finally:
        web.terminate()
        web.wait(timeout=30)  # gunicorn stops its workers gracefully: seconds, more when loaded
        if web.stderr is not None:
            web.stderr.close()
    assert lines, "closesync web printed nothing"
    assert lines[-1].startswith("closesync web on"), lines
    assert any("stored unencrypted" in line and "WARNING" in line for line in lines[:-1]), lines
