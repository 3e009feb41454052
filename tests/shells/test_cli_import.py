"""`closesync connections import`: JSON lines of token sets, on the sandbox and a real Redis."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from closesync.cli.main import main
from closesync.sandbox import Sandbox, SandboxConfig
from closesync.sandbox.records import SeededUser
from closesync.store.secretbox import generate_key

USERS = 46


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    sb = Sandbox.start(SandboxConfig(seed=11, users=USERS, event_types=0, freeze_clock=True))
    try:
        yield sb
    finally:
        sb.stop()


@pytest.fixture
def env(sandbox: Sandbox, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """closesync pointed at the sandbox and a fresh key prefix; the prefix is returned."""
    prefix = f"import-{uuid.uuid4().hex[:8]}"
    for name, value in sandbox.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_PREFIX", prefix)
    monkeypatch.setenv("INLINE_WAIT_BUDGET_SECONDS", "0")
    monkeypatch.setenv("CLOSESYNC_ENCRYPTION_KEYS", generate_key())
    sandbox.world.reset_request_counts()
    return prefix


def line(user: SeededUser, **changes: Any) -> str:
    record: dict[str, Any] = {
        "close_access_token": user.close_access_token,
        "close_refresh_token": user.close_refresh_token,
        "calendly_token": user.calendly_token,
        "close_expires_in": 3000,
    }
    record.update(changes)
    return json.dumps(record)


def secrets_of(sandbox: Sandbox) -> list[str]:
    return [
        token
        for user in sandbox.users
        for token in (user.close_access_token, user.close_refresh_token, user.calendly_token)
    ]


def stored(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert main(["connections", "list", "--json"]) == 0
    listed: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return listed


def test_import_fifty_lines_refused_and_duplicate_fail_alone_others_stored(
    sandbox: Sandbox, env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused, taken and malformed-token lines fail alone (exit 1); the rest stored, in order."""
    users = sandbox.users
    lines = [line(user) for user in users[:40]]
    lines.append(line(users[40], close_access_token="close_at_not_a_real_token"))  # line 41
    # line 42: another Close user asking for the Calendly user of line 1
    lines.append(line(users[41], calendly_token=users[0].calendly_token))
    lines.append("")  # line 43: blank, skipped
    lines.append(line(users[2], name="Renamed by the import"))  # line 44: updates line 3's
    lines.extend(line(user) for user in users[42:USERS])  # lines 45-48
    lines.append(line(users[3]))  # line 49: the same again, updated
    lines.append(line(users[4], calendly_refresh_token="cal_rt_x y"))  # line 50: not a token
    path = tmp_path / "floor.jsonl"
    path.write_text("\n".join(lines) + "\n")

    assert main(["connections", "import", str(path), "--concurrency", "8"]) == 1
    captured = capsys.readouterr()
    results = captured.out.splitlines()
    numbers = [int(result.split(":")[0].removeprefix("line ")) for result in results]
    assert numbers == [n for n in range(1, 51) if n != 43]
    by_number = dict(zip(numbers, results, strict=True))
    assert by_number[1].startswith("line 1: added conn_")
    assert f"Close {users[0].email} <- Calendly {users[0].email}" in by_number[1]
    assert by_number[41].startswith("line 41: failed: the Close access token was refused")
    first_id = by_number[1].split()[3].rstrip(":")
    assert by_number[42].startswith("line 42: failed: Calendly user")
    assert f"by connection {first_id}" in by_number[42]
    assert by_number[44].startswith("line 44: updated conn_")
    assert by_number[49].startswith("line 49: updated conn_")
    assert by_number[50] == (
        "line 50: failed: calendly_refresh_token is not a token: it holds spaces or non-ASCII "
        "characters"
    )
    assert "46 of 49 line(s) imported: 44 added, 2 updated, 3 failed" in captured.err
    for secret in secrets_of(sandbox):
        assert secret not in captured.out + captured.err
    connections = stored(capsys)
    assert sorted(c["close_user_id"] for c in connections) == sorted(
        u.close_user_id for u in users[:40] + users[42:USERS]
    )
    renamed = next(c for c in connections if c["close_user_id"] == users[2].close_user_id)
    assert renamed["name"] == "Renamed by the import"


def test_import_malformed_line_exits_two_storing_nothing_calling_no_api(
    sandbox: Sandbox, env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad JSON, a missing or unknown field: exit 2 naming lines, nothing stored, no API call."""
    users = sandbox.users
    token = users[5].close_access_token
    lines = [line(user) for user in users[:10]]
    lines[3] = f"close_access_token={token}"  # line 4: not JSON, and holds a token
    lines[6] = json.dumps({"close_access_token": token})  # line 7: no calendly_token
    lines[8] = line(users[8], close_token=token)  # line 9: a field add does not take
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines))

    assert main(["connections", "import", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 4 is not JSON" in err
    assert "line 7: calendly_token: Field required" in err
    assert "line 9: close_token: not a field of a token set" in err
    assert "nothing was imported" in err
    assert token not in err
    assert sandbox.world.request_counts() == {}
    assert stored(capsys) == []


def test_import_from_standard_input_json_one_object_per_line(
    sandbox: Sandbox,
    env: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`-` reads standard input; --json prints one object per line with the connection's id."""
    users = sandbox.users[:3]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(line(user) for user in users)))
    assert main(["connections", "import", "-", "--json"]) == 0
    results = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert [(r["line"], r["ok"], r["updated"]) for r in results] == [
        (1, True, False),
        (2, True, False),
        (3, True, False),
    ]
    assert [r["close_user_id"] for r in results] == [u.close_user_id for u in users]
    assert sorted(c["id"] for c in stored(capsys)) == sorted(r["id"] for r in results)
    # Sealed like every grant: no token of the import in Redis in the clear.
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    values = [str(client.get(key)) for key in client.scan_iter(f"{env}:*:grants")]
    client.close()
    assert len(values) == 3
    assert not any(u.close_access_token in v for u in users for v in values)
