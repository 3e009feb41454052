"""`closesync status`: a summary of the fleet; `--all` every connection's row, `--json` every field.

The summary (the default) counts connections per state and the active ones by their last run's
outcome, lists the failing ones and those needing re-authorization with why, and the held
deletions, and says which active connection's last sync is the oldest and how far behind the
schedule (SYNC_CRON and the fan-out spread, `worker.schedule.run_deadline`) the connections are.
`--all` prints per connection its state, last run and counts, held deletions, last error and
backfill progress; `--json` every field of every connection.

Everything is read in batches (`SyncState.status_facts`, a few pipelines for 10,000 connections),
not a few round trips per connection. A connection whose Calendly organization's shared
credential was refused shows needs_reauth with that credential's reason, although its own record
is untouched (reconnecting the organization brings it back); organization mode also lists each
shared credential and its state.

Webhooks: every connection shows the state of the subscription serving it (its own, or its
organization's): active, disabled, pending, refused (with why) or none, and when it last brought
a verified delivery. They are read in two calls whatever the fleet's size (SMEMBERS + MGET of
the records, one MGET of the last deliveries: `_webhooks`), and the summary counts connections by
webhook state. One whose webhooks are active is judged on schedule by SYNC_CRON_WITH_WEBHOOKS.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from closesync.cli.common import print_json, print_table, when
from closesync.core.connection import Connection, ConnectionState
from closesync.core.status import FleetSummary, Glance, Listed, summarize
from closesync.core.webhooks import Served, ServedIndex
from closesync.store.sync_state import StatusFacts
from closesync.wiring.services import Services, load_services
from closesync.worker.schedule import run_deadline, webhook_run_deadline

# Newest reports searched for a connection's last error (`last_error` of --all and --json).
ERROR_DEPTH = 20


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "status",
        help="a summary of every connection (--all: one row each, --json: every field)",
        description="By default a summary: connections per state, the last runs' outcomes, the "
        "failing connections and those needing re-authorization (each listed, with why), held "
        "deletions, the oldest last sync and how far behind the schedule (SYNC_CRON) the "
        "connections are. --all prints every connection's row instead; --json every field of "
        "every connection.",
    )
    parser.add_argument(
        "--all", action="store_true", help="every connection's row and details, not a summary"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (every connection)")
    parser.set_defaults(func=cmd_status)


def _read(
    services: Services, connections: Sequence[Connection], *, depth: int
) -> list[tuple[Connection, StatusFacts, str | None, Served]]:
    """Each connection with its facts and the refusal of its shared Calendly grant, if any,
    read in batches. `depth`: how many of its newest reports are searched for its last error."""
    refused = services.connections.shared_refused_of(
        c.calendly_grant_ref for c in connections if c.calendly_grant_ref is not None
    )
    facts = services.state.status_facts([c.id for c in connections], depth=depth)
    served = _webhooks(services)
    return [
        (
            connection,
            found,
            refused.get(connection.calendly_grant_ref or ""),
            served.served(connection.id, connection.calendly_grant_ref),
        )
        for connection, found in zip(connections, facts, strict=True)
    ]


def _webhooks(services: Services) -> ServedIndex:
    """Which subscription serves which connection, with the last deliveries: four round trips
    (only the records an owner index names: a leftover never shadows the current one)."""
    subscriptions = services.webhooks.current()
    last = services.webhooks.last_deliveries([s.key for s in subscriptions])
    return ServedIndex(subscriptions, last)


def _state(connection: Connection, shared: str | None) -> tuple[str, str | None]:
    """The state and reason `status` shows: needs_reauth while its organization's is refused."""
    if shared is not None and connection.state is ConnectionState.ACTIVE:
        return ConnectionState.NEEDS_REAUTH.value, shared
    return connection.state.value, connection.state_reason


def _row(
    connection: Connection, facts: StatusFacts, shared: str | None, served: Served
) -> dict[str, Any]:
    """Everything `status --json` shows of one connection, as JSON-ready values."""
    last, held, backfill = facts.last, facts.held, facts.backfill
    state, reason = _state(connection, shared)
    return {
        "id": connection.id,
        "name": connection.name,
        "state": state,
        "state_reason": reason,
        "last_run": last.model_dump(mode="json") if last else None,
        "held_deletions": asdict(held) if held else None,
        "last_error": facts.last_error,
        "last_error_at": facts.last_error_at,
        "backfill": asdict(backfill) if backfill else None,
        "webhook": served.state,
        "webhook_reason": served.reason,
        "last_delivery_at": served.last_delivery,
    }


def cmd_status(args: argparse.Namespace) -> int:
    services = load_services()
    connections: list[Connection] = services.connections.list()
    # The summary names each failing connection's last run's error: one report each is enough.
    detailed = args.json or args.all
    read = _read(services, connections, depth=ERROR_DEPTH if detailed else 1)
    rows = [_row(*each) for each in read] if detailed else []
    unmatched = _unmatched(services)
    organizations = _organizations(services)
    if args.json:
        print_json(
            {
                "connections": rows,
                **({"unmatched": unmatched} if unmatched else {}),
                **({"organizations": organizations} if organizations else {}),
            }
        )
        return 0
    _print_organizations(organizations)
    _print_unmatched(unmatched)
    if not connections:
        sys.stdout.write("no connections yet: add one with `closesync connections add`\n")
        return 0
    if args.all:
        _print_rows(rows)
        return 0
    settings = services.settings
    summary = summarize(
        (_glance(*each) for each in read),
        now=time.time(),
        deadline=lambda last: run_deadline(
            settings.sync_cron,
            last,
            settings.sync_spread_fraction,
            settings.broker_visibility_timeout,
        ),
        webhook_deadline=(
            (
                lambda last: webhook_run_deadline(
                    settings.sync_cron,
                    settings.sync_cron_with_webhooks,
                    last,
                    settings.sync_spread_fraction,
                    settings.broker_visibility_timeout,
                )
            )
            if settings.webhooks_enabled
            else None
        ),
    )
    _print_summary(summary, settings.sync_cron, time.time())
    return 0


def _glance(
    connection: Connection, facts: StatusFacts, shared: str | None, served: Served
) -> Glance:
    last, held = facts.last, facts.held
    state, reason = _state(connection, shared)
    return Glance(
        id=connection.id,
        name=connection.name,
        state=state,
        state_reason=reason,
        created_at=connection.created_at,
        last_run_at=(last.finished_at or last.started_at) if last else None,
        last_outcome=last.outcome.value if last else None,
        last_error=last.error if last else None,
        held=held is not None,
        held_reason=held.reason if held else None,
        backfilling=facts.backfill is not None,
        webhook=served.state,
        last_delivery_at=served.last_delivery,
    )


def _ago(seconds: float) -> str:
    """A duration as a person reads it: `42 s`, `7m 05s`, `3h 12m`, `2d 4h`."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02}m"
    if minutes:
        return f"{minutes}m {secs:02}s"
    return f"{secs} s"


def _print_summary(summary: FleetSummary, cron: str, now: float) -> None:
    out = sys.stdout.write
    states = ", ".join(f"{count} {state}" for state, count in summary.states.items())
    plural = "" if summary.total == 1 else "s"
    out(f"{summary.total} connection{plural}: {states}\n")
    active = summary.states.get(ConnectionState.ACTIVE.value, 0)
    if active:
        order = ["ok", "partial", "failed"]
        outcomes = sorted(summary.outcomes.items(), key=lambda kv: (kv[0] == "never", kv[0]))
        outcomes.sort(key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
        shown = ", ".join(
            f"{count} never run" if outcome == "never" else f"{count} {outcome}"
            for outcome, count in outcomes
        )
        out(f"last run of the active ones: {shown}\n")
    oldest = summary.oldest
    if oldest is not None:
        label = f"{oldest.id} ({oldest.name})" if oldest.name else oldest.id
        if oldest.last_run_at is None:
            out(
                f"oldest last sync: {label} has never run; added {when(oldest.created_at)}, "
                f"{_ago(now - oldest.created_at)} ago\n"
            )
        else:
            out(
                f"oldest last sync: {label} at {when(oldest.last_run_at)}, "
                f"{_ago(now - oldest.last_run_at)} ago\n"
            )
        if summary.behind:
            out(
                f"behind schedule (SYNC_CRON {cron}): {summary.behind} active connection(s) not "
                "run by the end of their tick's spread window; the oldest is "
                f"{_ago(summary.lag)} late\n"
            )
        else:
            out(f"on schedule (SYNC_CRON {cron}): every active connection ran when due\n")
    if summary.backfilling:
        out(f"backfills in progress: {summary.backfilling}\n")
    if summary.webhooks:
        counts = ", ".join(f"{n} {state}" for state, n in sorted(summary.webhooks.items()))
        out(f"webhooks (connections by subscription state): {counts}\n")
    _print_listed(f"failing (their last run failed): {len(summary.failing)}", summary.failing)
    _print_listed(f"needs_reauth: {len(summary.needs_reauth)}", summary.needs_reauth)
    # Each reason names the command that lets that connection's deletions through.
    _print_listed(f"held deletions: {len(summary.held)}", summary.held)
    out(
        "every connection's row: `closesync status --all`; every field: `closesync status --json`\n"
    )


def _print_listed(title: str, listed: list[Listed]) -> None:
    if not listed:
        return
    sys.stdout.write(title + "\n")
    for item in listed:
        sys.stdout.write(f"  {item.id}  {item.name or '-'}: {item.why}\n")


def _print_organizations(organizations: list[dict[str, Any]]) -> None:
    for org in organizations:
        if org["state"] != "active":
            sys.stdout.write(
                f"Calendly organization {org['ref']}: {org['state']}: {org['state_reason']}\n"
            )
        if org["close_organization_id"] is None:
            sys.stdout.write(
                f"Calendly organization {org['ref']} is bound to no Close organization (it was "
                "connected before closesync bound them): nobody new is paired with its members "
                "until an owner or admin runs `closesync connect --organization` again\n"
            )


def _print_rows(rows: list[dict[str, Any]]) -> None:
    """`status --all`: one table row per connection, then what needs saying of each."""
    table = []
    for row in rows:
        last = row["last_run"] or {}
        counts = (
            f"+{last.get('created', 0)} ~{last.get('updated', 0)} -{last.get('deleted', 0)} "
            f"={last.get('unchanged', 0)} !{len(last.get('failed', {}))}"
            if last
            else None
        )
        held = row["held_deletions"]
        table.append(
            [
                row["id"],
                row["name"],
                row["state"],
                when(last.get("finished_at")) if last else None,
                last.get("outcome") if last else None,
                counts,
                len(held["source_ids"]) if held else 0,
                row["webhook"],
                when(row["last_delivery_at"]) if row["last_delivery_at"] else None,
            ]
        )
    print_table(
        [
            "ID",
            "NAME",
            "STATE",
            "LAST RUN",
            "OUTCOME",
            "+~-=!",
            "HELD",
            "WEBHOOKS",
            "LAST DELIVERY",
        ],
        table,
    )
    out = sys.stdout.write
    for row in rows:
        if row["state_reason"]:
            out(f"{row['id']}: {row['state']}: {row['state_reason']}\n")
        if row["held_deletions"]:
            out(f"{row['id']}: held deletions: {row['held_deletions']['reason']}\n")
        if row["last_error"]:
            at = when(row["last_error_at"])
            out(f"{row['id']}: last error (run at {at}): {row['last_error']}\n")
        if row["webhook_reason"] and row["webhook"] != "active":
            out(f"{row['id']}: webhooks {row['webhook']}: {row['webhook_reason']}\n")
        if row["backfill"]:
            progress = row["backfill"]
            out(f"{row['id']}: backfill {progress.get('done', 0)}/{progress.get('total', '?')}\n")


def _unmatched(services: Services) -> dict[str, Any] | None:
    """Calendly organization mode: who is unmatched on either side (None outside that mode)."""
    from closesync.connect.organizations import Organizations

    orgs = Organizations(services)
    return orgs.unmatched() if orgs.credentials.refs() or orgs.waiting_room.waiting() else None


def _organizations(services: Services) -> list[dict[str, Any]]:
    """Calendly organization mode: each shared credential and whether it is usable."""
    from closesync.connect.org_credentials import OrgCredentials

    return OrgCredentials(services).overview()


def _print_unmatched(unmatched: dict[str, Any] | None) -> None:
    if unmatched is None:
        return
    for refusal in unmatched["refused"]:
        sys.stdout.write(
            f"refused pairing: Close user {refusal['email'] or refusal['close_user_id']} with "
            f"Calendly member {refusal['calendly_email'] or refusal['calendly_user_uri']}, who "
            f"is already connected by {refusal['connection_id']} (one connection per Calendly "
            "user): remove that connection to pair them\n"
        )
    for person in unmatched["close"]:
        sys.stdout.write(
            f"unmatched Close user {person['email'] or person['close_user_id']}: "
            "no Calendly member has this email\n"
        )
    for ref, members in unmatched["calendly"].items():
        for member in members:
            sys.stdout.write(
                f"unmatched Calendly member {member['email'] or member['uri']} ({ref}): "
                "no Close user with this email has authorized\n"
            )
