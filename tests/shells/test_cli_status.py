"""`closesync status` and `connections list` over a fleet of 300 connections in a real Redis."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field

import pytest
import redis
from pydantic import SecretStr

from closesync.cli.main import main
from closesync.core.connection import Connection, ConnectionState, Grant, Grants
from closesync.core.report import Outcome, RunReport
from closesync.store.connections import ConnectionStore
from closesync.store.keys import Keys
from closesync.store.secretbox import FernetBox, generate_key
from closesync.store.sync_state import SyncState

FLEET = 300
ROW_FIELDS = {
    "id", "name", "state", "state_reason", "last_run", "held_deletions", "last_error",
    "last_error_at", "backfill", "webhook", "webhook_reason", "last_delivery_at",
}  # fmt: skip


@dataclass
class Fleet:
    ids: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)
    never: list[str] = field(default_factory=list)
    behind: list[str] = field(default_factory=list)
    failing: dict[str, str] = field(default_factory=dict)
    needs_reauth: dict[str, str] = field(default_factory=dict)


def _report(conn_id: str, at: float, error: str | None = None) -> RunReport:
    return RunReport(
        connection_id=conn_id,
        started_at=at - 1,
        finished_at=at,
        outcome=Outcome.FAILED if error else Outcome.OK,
        unchanged=4,
        errors=[error] if error else [],
    )


@pytest.fixture
def fleet(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Fleet:
    """300 connections added a day ago: most ran a minute ago, some failed, paused, late, never."""
    prefix = f"status-{uuid.uuid4().hex[:8]}"
    key = generate_key()
    for name, value in {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "CLOSESYNC_ENCRYPTION_KEYS": key,
        "SYNC_CRON": "*/5 * * * *",
        "SYNC_SPREAD_FRACTION": "0.5",
    }.items():
        monkeypatch.setenv(name, value)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = Keys(prefix)
    store, state = ConnectionStore(client, keys, FernetBox([key])), SyncState(client, keys)
    grant = Grant(kind="pat", access_token=SecretStr("cal_pat_fleet"))
    now = time.time()
    fleet = Fleet()
    for i in range(FLEET):
        conn_id = f"conn_{i:012x}"
        fleet.ids.append(conn_id)
        reason = f"Close refused this connection's own Close grant ({i})"
        if i % 37 == 3:
            fleet.needs_reauth[conn_id] = reason
            kind = ConnectionState.NEEDS_REAUTH
        elif i % 25 == 7:
            fleet.paused.append(conn_id)
            kind = ConnectionState.PAUSED
        else:
            fleet.active.append(conn_id)
            kind = ConnectionState.ACTIVE
        connection = Connection(
            id=conn_id,
            name=f"Rep {i:03}",
            state=kind,
            state_reason=reason if kind is ConnectionState.NEEDS_REAUTH else None,
            close_user_id=f"user_{i}",
            calendly_user_uri=f"https://api.calendly.com/users/U{i}",
            created_at=now - 86400 + i,
            updated_at=now - 86400 + i,
        )
        store.save(connection, Grants(close=grant, calendly=grant))
        if i % 50 == 11:
            if kind is ConnectionState.ACTIVE:
                fleet.never.append(conn_id)
            continue
        # Three active connections stopped being run one, two and three hours ago.
        at = now - 3600 * (i - 43) if i in (44, 45, 46) else now - 60
        error = f"Close POST /scheduling_link/integration/ answered 50{i % 10}"
        failed = i % 30 == 1
        state.push_report(conn_id, _report(conn_id, at - 300, f"older error of {i}"), keep=20)
        state.push_report(conn_id, _report(conn_id, at, error if failed else None), keep=20)
        if failed and kind is ConnectionState.ACTIVE:
            fleet.failing[conn_id] = error
    fleet.behind = fleet.never + [f"conn_{i:012x}" for i in (44, 45, 46)]
    client.close()
    return fleet


def test_status_summary_fleet_counts_lists_oldest_and_lag(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default status: per-state counts, failing and needs_reauth listed, oldest, lag."""
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    active, paused, reauth = len(fleet.active), len(fleet.paused), len(fleet.needs_reauth)
    assert f"{FLEET} connections: {active} active, {paused} paused, {reauth} needs_reauth\n" in out
    ok = active - len(fleet.never) - len(fleet.failing)
    assert (
        f"last run of the active ones: {ok} ok, {len(fleet.failing)} failed, "
        f"{len(fleet.never)} never run\n"
    ) in out
    assert f"failing (their last run failed): {len(fleet.failing)}\n" in out
    for conn_id, error in fleet.failing.items():
        assert re.search(rf"^  {conn_id}  Rep \d+: {re.escape(error)}$", out, re.M)
    assert f"needs_reauth: {reauth}\n" in out
    for conn_id, reason in fleet.needs_reauth.items():
        assert re.search(rf"^  {conn_id}  Rep \d+: {re.escape(reason)}$", out, re.M)
    # The oldest: the first connection added among those never run.
    assert f"oldest last sync: {fleet.never[0]} (Rep " in out
    assert "has never run; added" in out
    behind = re.search(r"behind schedule \(SYNC_CRON \*/5 \* \* \* \*\): (\d+) active", out)
    assert behind is not None
    assert int(behind.group(1)) == len(fleet.behind)
    # Added a day ago, never run: due by the end of the first tick's window (< 7.5 min later).
    late = re.search(r"the oldest is (\d+)h (\d+)m late", out)
    assert late is not None
    assert 23 * 60 + 52 <= int(late.group(1)) * 60 + int(late.group(2)) <= 24 * 60
    # A summary: its length does not grow with the connections that need nobody.
    assert len(out.splitlines()) < 10 + len(fleet.failing) + reauth


def test_status_all_and_json_every_connection_every_field(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """--all prints a row per connection; --json every field, the last error searched back."""
    assert main(["status", "--all"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("conn_")]
    assert sorted({line.split()[0] for line in rows if "  " in line}) == sorted(fleet.ids)
    assert main(["status", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [row["id"] for row in document["connections"]] == fleet.ids
    assert all(set(row) == ROW_FIELDS for row in document["connections"])
    by_id = {row["id"]: row for row in document["connections"]}
    # Its last run went well; the run before failed: that error is the last one.
    assert by_id[fleet.ids[5]]["last_run"]["outcome"] == "ok"
    assert by_id[fleet.ids[5]]["last_error"] == "older error of 5"
    for failing, error in fleet.failing.items():
        assert by_id[failing]["last_error"] == error


def test_connections_list_pages_with_limit_and_offset(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """--offset/--limit page through the connections in their order; --json keeps its shape."""
    assert main(["connections", "list", "--json"]) == 0
    everyone = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in everyone] == fleet.ids
    assert main(["connections", "list", "--json", "--offset", "100", "--limit", "50"]) == 0
    assert json.loads(capsys.readouterr().out) == everyone[100:150]
    assert main(["connections", "list", "--offset", "290", "--limit", "50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "STATE"]
    assert [line.split()[0] for line in lines[1:]] == fleet.ids[290:]
