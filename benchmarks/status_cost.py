"""What `closesync status` and `connections list` cost with a fleet seeded straight into Redis.

Seeds N connections (default 10,000) through the store, each with `reports_kept` run reports
written as a run would leave them (mostly unchanged ok runs, a few failed, partial or never
run; some paused, needing re-authorization, holding deletions or backfilling; half with a
webhook subscription record, most active with a delivery received, a few refused), then times
each command as its own process, output piped (not a terminal), as cron or a script would run
it.

`--before DIR` times the same commands (for `status --all`, the `status` that printed every row
before the summary) of another source tree (e.g. `git archive <commit> | tar
-x -C DIR`) against the same seeded Redis in the same run, so both columns share one machine and
one load. Redis is REDIS_URL, else an embedded one in a temporary directory. Numbers, not
assertions: `python -m benchmarks.status_cost [--connections N] [--before DIR]`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from closesync.core.connection import (
    Connection,
    ConnectionState,
    Grant,
    Grants,
    new_connection_id,
)
from closesync.core.report import Outcome, RunReport
from closesync.core.webhooks import Subscription, WebhookState, new_key
from closesync.store.connections import ConnectionStore
from closesync.store.embedded import embedded
from closesync.store.keys import Keys
from closesync.store.secretbox import FernetBox, generate_key

# (what is timed, the command in trees that have it, the same output in trees before it).
COMMANDS: list[tuple[str, list[str], list[str]]] = [
    ("status (summary)", ["status"], ["status"]),
    ("status --all (every row)", ["status", "--all"], ["status"]),
    ("status --json", ["status", "--json"], ["status", "--json"]),
    ("connections list", ["connections", "list"], ["connections", "list"]),
    (
        "connections list --json",
        ["connections", "list", "--json"],
        ["connections", "list", "--json"],
    ),
]
REPORTS_KEPT = 20
INTERVAL = 300.0


def _report(conn_id: str, at: float, outcome: Outcome, error: str | None) -> RunReport:
    return RunReport(
        connection_id=conn_id,
        started_at=at,
        finished_at=at + 0.4,
        outcome=outcome,
        unchanged=12,
        api_calls={"calendly GET /event_types": 1},
        errors=[error] if error else [],
        failure="transient" if outcome is Outcome.FAILED else None,
    )


def seed(client: redis.Redis, prefix: str, count: int) -> None:
    """`count` connections as a fleet in steady state leaves them, written in pipelines."""
    keys = Keys(prefix)
    box = FernetBox([generate_key()])
    store = ConnectionStore(client, keys, box)
    now = time.time()
    grant = Grant(kind="pat", access_token="cal_pat_benchmark")  # type: ignore[arg-type]
    grants = Grants(close=grant, calendly=grant)
    with client.pipeline(transaction=False) as pipe:
        for i in range(count):
            conn = Connection(
                id=new_connection_id(),
                name=f"Rep {i:05}",
                state=ConnectionState.PAUSED
                if i % 50 == 7
                else ConnectionState.NEEDS_REAUTH
                if i % 100 == 3
                else ConnectionState.ACTIVE,
                state_reason="Close refused this connection's own Close grant: 401"
                if i % 100 == 3
                else None,
                close_user_id=f"user_{i:08}",
                close_organization_id="orga_benchmark",
                close_email=f"rep{i:05}@example.com",
                calendly_user_uri=f"https://api.calendly.com/users/{uuid.uuid4().hex}",
                calendly_email=f"rep{i:05}@example.com",
                created_at=now - 86400 + i,
                updated_at=now - 86400 + i,
            )
            store.save(conn, grants)
            if i % 2 == 0:
                _subscribe(pipe, keys, conn.id, refused=i % 20 == 4, at=now)
            if i % 97 == 11:
                continue  # never run yet
            failing = i % 40 == 5
            for k in range(REPORTS_KEPT):
                # A few connections stopped being run three hours ago: the lag to show.
                behind = 3 * 3600 if i % 250 == 17 else 0
                at = now - (k + 1) * INTERVAL + (i % 150) - behind
                outcome = Outcome.FAILED if failing and k < 3 else Outcome.OK
                error = "Close POST /scheduling_link/integration/ answered 503" if failing else None
                pipe.rpush(
                    keys.reports(conn.id),
                    _report(conn.id, at, outcome, error if k < 3 else None).model_dump_json(),
                )
            if i % 500 == 9:
                pipe.set(
                    keys.held(conn.id), '{"source_ids": ["a:b"], "reason": "8 of 10", "at": 1}'
                )
            if i % 1000 == 13:
                pipe.hset(
                    keys.backfill(conn.id),
                    mapping={"started_at": repr(now), "cursor": "", "done": "3", "total": "9"},
                )
            if i % 1000 == 0:
                pipe.execute()
        pipe.execute()


def _subscribe(
    pipe: redis.client.Pipeline, keys: Keys, conn_id: str, *, refused: bool, at: float
) -> None:
    """A webhook subscription record as connecting leaves it (half the fleet has one), with a
    delivery received for the active ones."""
    sub = Subscription(
        key=new_key(),
        scope="user",
        organization_uri="https://api.calendly.com/organizations/benchmark",
        connection_id=conn_id,
        uri=None if refused else f"https://api.calendly.com/webhook_subscriptions/{conn_id}",
        state=WebhookState.REFUSED if refused else WebhookState.ACTIVE,
        reason="Calendly POST /webhook_subscriptions answered 403: Insufficient scope"
        if refused
        else None,
        created_at=at,
        updated_at=at,
    )
    pipe.sadd(keys.webhooks(), sub.key)
    pipe.set(keys.webhook(sub.key), sub.model_dump_json())
    pipe.set(keys.webhook_of_connection(conn_id), sub.key)
    if not refused:
        pipe.set(keys.webhook_last_delivery(sub.key), repr(at - 60))


def time_command(src: Path, command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Seconds one command takes as a process (output piped, thrown away) and its exit code."""
    started = time.perf_counter()
    done = subprocess.run(  # our own interpreter and module
        [sys.executable, "-m", "closesync", *command],
        env={**env, "PYTHONPATH": str(src)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr.decode(errors="replace")[-500:])
    return time.perf_counter() - started, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--before", type=Path, help="another source tree to time alongside")
    args = parser.parse_args()
    url = os.environ.get("REDIS_URL") or embedded(tempfile.mkdtemp(prefix="closesync-bench-"))
    prefix = f"bench-status-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url, decode_responses=True)
    started = time.perf_counter()
    seed(client, prefix, args.connections)
    print(f"seeded {args.connections} connections in {time.perf_counter() - started:.1f} s")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CLOSESYNC_"))},
        "REDIS_URL": url,
        "REDIS_PREFIX": prefix,
    }
    trees = {"after": Path(__file__).resolve().parents[1] / "src"}
    if args.before is not None:
        trees = {"before": args.before.resolve() / "src", **trees}
    # Before the summary, `status` printed every row: it stands for `status --all` there.
    print(f"{'command':<32}" + "".join(f"{name:>10}" for name in trees))
    for label, command, older in COMMANDS:
        cells = []
        for name, src in trees.items():
            seconds, code = time_command(src, older if name == "before" else command, env)
            cells.append(f"{seconds:>9.2f}s" if code == 0 else f"{'exit ' + str(code):>10}")
        print(f"{label:<32}" + "".join(cells))
    with client.pipeline(transaction=False) as pipe:
        for key in client.scan_iter(f"{prefix}:*", count=10_000):
            pipe.unlink(key)
        pipe.execute()


if __name__ == "__main__":
    main()
