"""`closesync status`: per connection its state, last run and counts, held deletions, last error.

A connection whose Calendly organization's shared credential was refused shows needs_reauth with
that credential's reason, although its own record is untouched (reconnecting the organization
brings it back); organization mode also lists each shared credential and its state.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any

from closesync.cli.common import print_json, print_table, when
from closesync.core.connection import Connection, ConnectionState
from closesync.core.report import RunReport
from closesync.wiring.services import Services, load_services


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser("status", help="state, last run and last error per connection")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=cmd_status)


def connection_status(services: Services, connection: Connection) -> dict[str, Any]:
    """Everything `status` shows of one connection, as JSON-ready values."""
    state = services.state
    last: RunReport | None = state.last_report(connection.id)
    reports: list[RunReport] = state.reports(connection.id, 20)
    errored = next((r for r in reports if r.error), None)
    held = state.held(connection.id)
    backfill = state.backfill_progress(connection.id)
    ref = connection.calendly_grant_ref
    shared = services.connections.shared_refused(ref) if ref is not None else None
    waits_for_org = shared is not None and connection.state is ConnectionState.ACTIVE
    return {
        "id": connection.id,
        "name": connection.name,
        "state": ConnectionState.NEEDS_REAUTH.value if waits_for_org else connection.state.value,
        "state_reason": shared if waits_for_org else connection.state_reason,
        "last_run": last.model_dump(mode="json") if last else None,
        "held_deletions": asdict(held) if held else None,
        "last_error": errored.error if errored else None,
        "last_error_at": errored.finished_at if errored else None,
        "backfill": asdict(backfill) if backfill else None,
    }


def cmd_status(args: argparse.Namespace) -> int:
    services = load_services()
    connections: list[Connection] = services.connections.list()
    rows = [connection_status(services, c) for c in connections]
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
    _print_unmatched(unmatched)
    if not rows:
        sys.stdout.write("no connections yet: add one with `closesync connections add`\n")
        return 0
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
            ]
        )
    print_table(["ID", "NAME", "STATE", "LAST RUN", "OUTCOME", "+~-=!", "HELD"], table)
    for row in rows:
        if row["state_reason"]:
            sys.stdout.write(f"{row['id']}: {row['state']}: {row['state_reason']}\n")
        if row["held_deletions"]:
            sys.stdout.write(f"{row['id']}: held deletions: {row['held_deletions']['reason']}\n")
        if row["last_error"]:
            at = when(row["last_error_at"])
            sys.stdout.write(f"{row['id']}: last error (run at {at}): {row['last_error']}\n")
        if row["backfill"]:
            progress = row["backfill"]
            sys.stdout.write(
                f"{row['id']}: backfill {progress.get('done', 0)}/{progress.get('total', '?')}\n"
            )
    return 0


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
