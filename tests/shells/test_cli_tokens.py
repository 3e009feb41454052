"""`closesync connections add` takes its tokens without putting them on the command line.

A token in argv is visible to every user of the host (`ps`, /proc/PID/cmdline) and lands in shell
history, so the tokens can come from the environment or from standard input; the old flags still
work, with one warning line. Each test runs the real command as a process against the sandbox.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from closesync.sandbox import Sandbox
from closesync.store.keys import Keys
from closesync.store.secretbox import generate_key
from tests._oauth import sandbox_env, services_for
from tests._sandbox import running_sandbox


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with running_sandbox(users=1) as sandbox:
        yield sandbox


@pytest.fixture
def secret_key() -> str:
    return generate_key()


@pytest.fixture
def env(sb: Sandbox, redis_url: str, keys: Keys, secret_key: str, tmp_path: Path) -> dict[str, str]:
    """A process environment pointing closesync at the sandbox, with no token in it."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        **sandbox_env(sb, redis_url, keys.prefix, secret_key),
        "LOG_FORMAT": "json",
    }


def add(
    env: dict[str, str], cwd: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`closesync connections add --json ARGS` as a process."""
    return subprocess.run(
        [sys.executable, "-m", "closesync", "connections", "add", "--json", *args],
        cwd=cwd,
        env=env,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_add_tokens_from_environment_stores_them_and_argv_holds_none(
    sb: Sandbox,
    env: dict[str, str],
    tmp_path: Path,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    secret_key: str,
) -> None:
    """CLOSESYNC_CLOSE_ACCESS_TOKEN & co. in the environment: added, no warning, nothing in argv."""
    user = sb.users[0]
    tokens = {
        "CLOSESYNC_CLOSE_ACCESS_TOKEN": user.close_access_token,
        "CLOSESYNC_CLOSE_REFRESH_TOKEN": user.close_refresh_token,
        "CLOSESYNC_CALENDLY_TOKEN": user.calendly_token,
    }
    done = add({**env, **tokens}, tmp_path, "--close-expires-in", "3000")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert not [t for t in tokens.values() if t in " ".join(done.args)]
    added = json.loads(done.stdout)
    services = services_for(sb, redis_client, redis_url, keys.prefix, secret_key)
    grants = services.connections.grants(added["id"])
    assert grants.close.access_token.get_secret_value() == user.close_access_token
    assert grants.close.refresh_token is not None
    assert grants.close.refresh_token.get_secret_value() == user.close_refresh_token
    assert grants.calendly.access_token.get_secret_value() == user.calendly_token
    assert grants.calendly.kind == "pat"


def test_cli_add_tokens_from_stdin_stores_them_and_argv_holds_none(
    sb: Sandbox,
    env: dict[str, str],
    tmp_path: Path,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    secret_key: str,
) -> None:
    """`--tokens-from-stdin` reads NAME=value lines (comments, blanks, `export` allowed)."""
    user = sb.users[0]
    stdin = (
        "# from the secret store\n"
        f"export CLOSESYNC_CLOSE_ACCESS_TOKEN={user.close_access_token}\n"
        "\n"
        f"CLOSESYNC_CALENDLY_TOKEN='{user.calendly_token}'\n"
    )
    done = add(env, tmp_path, "--tokens-from-stdin", stdin=stdin)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert user.close_access_token not in " ".join(done.args)
    grants = services_for(sb, redis_client, redis_url, keys.prefix, secret_key).connections.grants(
        json.loads(done.stdout)["id"]
    )
    assert grants.close.access_token.get_secret_value() == user.close_access_token
    assert grants.close.refresh_token is None
    assert grants.calendly.access_token.get_secret_value() == user.calendly_token


def test_cli_add_token_flags_still_work_with_one_warning_line(
    sb: Sandbox, env: dict[str, str], tmp_path: Path
) -> None:
    """The old token flags keep working for scripts; stderr says once how to keep them off argv."""
    user = sb.users[0]
    done = add(
        env,
        tmp_path,
        "--close-access-token",
        user.close_access_token,
        "--calendly-token",
        user.calendly_token,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["close_user_id"] == user.close_user_id
    [warning] = done.stderr.splitlines()
    assert "warning" in warning
    assert "--close-access-token" in warning
    assert "--calendly-token" in warning
    assert "--tokens-from-stdin" in warning
    assert "CLOSESYNC_CLOSE_ACCESS_TOKEN" in warning
    assert user.close_access_token not in done.stderr
    assert user.calendly_token not in done.stderr


def test_cli_add_without_a_calendly_token_exits_2_naming_where_to_put_it(
    sb: Sandbox, env: dict[str, str], tmp_path: Path, redis_client: redis.Redis, keys: Keys
) -> None:
    """A missing required token exits 2 naming the variable, the stdin flag and the flag."""
    user = sb.users[0]
    done = add({**env, "CLOSESYNC_CLOSE_ACCESS_TOKEN": user.close_access_token}, tmp_path)
    assert done.returncode == 2
    assert "CLOSESYNC_CALENDLY_TOKEN" in done.stderr
    assert "--tokens-from-stdin" in done.stderr
    assert "--calendly-token" in done.stderr
    assert list(redis_client.scan_iter(f"{keys.prefix}:*")) == []


def test_cli_add_bad_stdin_line_exits_2_without_echoing_it(
    sb: Sandbox, env: dict[str, str], tmp_path: Path, redis_client: redis.Redis, keys: Keys
) -> None:
    """A line that is not NAME=value, or an unknown NAME, is refused by line number only."""
    user = sb.users[0]
    for stdin, said in (
        (f"{user.close_access_token}\n", "line 1 of standard input is not NAME=value"),
        (f"CLOSE_TOKEN={user.close_access_token}\n", "line 1 of standard input names none of"),
    ):
        done = add(env, tmp_path, "--tokens-from-stdin", stdin=stdin)
        assert done.returncode == 2
        assert said in done.stderr
        assert user.close_access_token not in done.stderr
    assert list(redis_client.scan_iter(f"{keys.prefix}:*")) == []


def test_parse_token_lines_bare_base64_token_is_refused_without_echoing_it() -> None:
    """A token pasted without NAME= (its `==` padding read as `=`) is refused, never echoed."""
    from closesync.cli.token_input import parse_token_lines
    from closesync.core.errors import ConfigError

    token = "Zm9vYmFyYmF6cXV4c2VjcmV0dG9rZW4xMjM0"  # letters and digits: a valid identifier
    with pytest.raises(ConfigError) as raised:
        parse_token_lines(f"CLOSESYNC_CALENDLY_TOKEN=cal_pat_x\n{token}==\n")
    message = str(raised.value)
    assert message.startswith("line 2 of standard input names none of")
    assert "CLOSESYNC_CLOSE_ACCESS_TOKEN" in message
    assert token[:8] not in message


def test_cli_add_tokens_typed_on_a_terminal_are_not_echoed(
    sb: Sandbox, env: dict[str, str], tmp_path: Path
) -> None:
    """Tokens typed on a terminal (stdin a tty) are read with echo off, restored afterwards."""
    import pty
    import select
    import termios

    user = sb.users[0]
    master, slave = pty.openpty()
    try:
        command = ["connections", "add", "--json", "--tokens-from-stdin"]
        process = subprocess.Popen(
            [sys.executable, "-m", "closesync", *command],
            cwd=tmp_path,
            env=env,
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stderr is not None
        # Typed only once the command says echo is off: the terminal echoes on arrival.
        ready, _, _ = select.select([process.stderr], [], [], 30)
        assert ready, "no prompt on stderr"
        assert b"not shown" in process.stderr.readline()
        assert not termios.tcgetattr(slave)[3] & termios.ECHO
        typed = (
            f"CLOSESYNC_CLOSE_ACCESS_TOKEN={user.close_access_token}\n"
            f"CLOSESYNC_CALENDLY_TOKEN={user.calendly_token}\n"
        )
        os.write(master, typed.encode() + b"\x04")  # Ctrl-D on an empty line: end of input
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert json.loads(out)["close_user_id"] == user.close_user_id
        assert termios.tcgetattr(slave)[3] & termios.ECHO  # the terminal is as it was
        os.set_blocking(master, False)
        try:
            shown = os.read(master, 65536)
        except BlockingIOError:
            shown = b""
        assert user.close_access_token.encode() not in shown
        assert user.calendly_token.encode() not in shown
    finally:
        os.close(master)
        os.close(slave)


def test_cli_add_close_user_of_several_organizations_exits_2_naming_the_flows(
    sb: Sandbox, env: dict[str, str], tmp_path: Path, redis_client: redis.Redis, keys: Keys
) -> None:
    """A token alone cannot say which of several Close orgs it is for: refused, nothing stored."""
    user = sb.users[0]
    sb.world.join_close_organization(user.close_user_id, "orga_other")
    stdin = (
        f"CLOSESYNC_CLOSE_ACCESS_TOKEN={user.close_access_token}\n"
        f"CLOSESYNC_CALENDLY_TOKEN={user.calendly_token}\n"
    )
    done = add(env, tmp_path, "--tokens-from-stdin", stdin=stdin)
    assert done.returncode == 2
    assert "belongs to 2 Close organizations" in done.stderr
    assert "closesync connect" in done.stderr
    assert list(redis_client.scan_iter(f"{keys.prefix}:*")) == []
