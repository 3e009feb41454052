"""`closesync webhooks list|ensure`: the Calendly webhook subscriptions closesync owns.

`list` reads Redis only (no Calendly call): each subscription's state, scope, what it serves,
Calendly's uri, the last verified delivery and why it is refused or pending. `ensure [ID ...|
--all]` runs the reconciliation (`closesync.connect.webhook_reconcile`) now, retrying refused
subscriptions too (run after granting `webhooks:write` or setting CALENDLY_WEBHOOK_SIGNING_KEY),
and asks the workers for a sync of what a re-created subscription serves. Exit codes as
decisions.md has them (and `ensure --help`): 0 every subscription in scope is active (or none is
due: organization members, paused connections), 1 at least one failed, is pending or refused, or
was skipped unserved (needs_reauth, an organization no longer connected), 2 bad usage (an
unknown id, neither ids nor --all, WEBHOOKS_ENABLED=false). Never prints a signing key, a
callback key or a token: the callback URL holds the key, so only Calendly's uri is shown.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from closesync.cli.common import print_json, print_table, when
from closesync.connect.webhook_reconcile import DEFAULT_CONCURRENCY, Outcome, Reconciler, targets
from closesync.core.connection import Connection
from closesync.core.errors import ConfigError
from closesync.core.webhooks import Subscription, WebhookState
from closesync.wiring.services import Services, load_services
from closesync.worker.celery_app import create_app
from closesync.worker.enqueue import ask_for_syncs

ENSURE_EXIT_CODES = (
    "exit codes: 0 every owner in scope has an active subscription or is due none (an "
    "organization member, a paused connection); 1 at least one failed, is pending or refused, "
    "or was skipped unserved (needs_reauth, an organization not connected); 2 bad usage or "
    "configuration (an unknown id, neither IDs nor --all, WEBHOOKS_ENABLED=false)"
)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "webhooks", help="the Calendly webhook subscriptions closesync owns: list, ensure"
    )
    commands = parser.add_subparsers(dest="action", metavar="ACTION")
    commands.required = True
    listing = commands.add_parser(
        "list", help="every subscription: state, scope, what it serves, last delivery, why"
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_list)
    ensure = commands.add_parser(
        "ensure",
        help="reconcile with Calendly now: re-create disabled or missing subscriptions, retry "
        "pending and refused ones, delete orphans of our URL",
        description="Reconcile the webhook subscriptions of these connections (or --all) with "
        "Calendly now.",
        epilog=ENSURE_EXIT_CODES,
    )
    ensure.add_argument("ids", nargs="*", metavar="ID", help="connection ids")
    ensure.add_argument("--all", action="store_true", help="every connection and organization")
    ensure.add_argument("--json", action="store_true", help="print JSON")
    ensure.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"owners reconciled at once (default {DEFAULT_CONCURRENCY})",
    )
    ensure.set_defaults(func=cmd_ensure)


def public(sub: Subscription, members: int, last: float | None) -> dict[str, Any]:
    """A subscription as printed: no key of any kind (the callback URL holds the key)."""
    return {
        "state": sub.state.value,
        "scope": sub.scope,
        "connection_id": sub.connection_id,
        "organization_ref": sub.grant_ref,
        "serves": 1 if sub.scope == "user" else members,
        "calendly_uri": sub.uri,
        "signed_by": "closesync" if sub.own_signing_key else "application",
        "last_delivery_at": last,
        "reason": sub.reason,
        "created_at": sub.created_at,
        "updated_at": sub.updated_at,
    }


def cmd_list(args: argparse.Namespace) -> int:
    services = load_services()
    subs = sorted(services.webhooks.all(), key=lambda s: (s.scope, s.created_at))
    last = services.webhooks.last_deliveries([s.key for s in subs])
    members: dict[str, int] = {}
    for connection in services.connections.list():
        if connection.calendly_grant_ref is not None:
            ref = connection.calendly_grant_ref
            members[ref] = members.get(ref, 0) + 1
    rows = [public(s, members.get(s.grant_ref or "", 0), last.get(s.key)) for s in subs]
    if args.json:
        print_json({"subscriptions": rows, "enabled": services.settings.webhooks_enabled})
        return 0
    if not services.settings.webhooks_enabled:
        sys.stdout.write("webhooks are off (WEBHOOKS_ENABLED=false): polling only\n")
    if not rows:
        sys.stdout.write("no webhook subscriptions\n")
        return 0
    print_table(
        ["STATE", "SCOPE", "SERVES", "CALENDLY URI", "LAST DELIVERY", "REASON"],
        [
            [
                r["state"],
                r["scope"],
                r["connection_id"]
                if r["scope"] == "user"
                else f"organization {r['organization_ref']} ({r['serves']} connection(s))",
                r["calendly_uri"],
                when(r["last_delivery_at"]) if r["last_delivery_at"] else None,
                r["reason"],
            ]
            for r in rows
        ],
    )
    return 0


def cmd_ensure(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, not {args.concurrency}")
    if args.all and args.ids:
        raise ConfigError("give connection ids or --all, not both")
    if not args.all and not args.ids:
        raise ConfigError("say which connections: IDs, or --all")
    services = load_services()
    if not services.settings.webhooks_enabled:
        raise ConfigError("WEBHOOKS_ENABLED is false: closesync owns no webhook subscriptions")
    services.require_key()  # the credentials are read, and a new signing key is sealed
    connections, refs = targets(services, None if args.all else args.ids)
    outcomes = _reconcile(services, connections, refs, args.concurrency)
    failed = [o for o in outcomes if not o.settled]
    if args.json:
        print_json({"owners": [_json(o) for o in outcomes], "failed": len(failed)})
    else:
        for outcome in outcomes:
            sys.stdout.write(_line(outcome) + "\n")
        sys.stderr.write(f"{len(outcomes)} owner(s), {len(failed)} not active\n")
    return 1 if failed else 0


def _reconcile(
    services: Services, connections: list[Connection], refs: list[str], concurrency: int
) -> list[Outcome]:
    app = create_app(services.settings)
    try:

        def ask_sync(ids: list[str]) -> None:
            ask_for_syncs(services, app, ids)

        reconciler = Reconciler(services, ask_sync, retry_refused=True)
        return reconciler.run(connections, refs, concurrency)
    finally:
        app.close()


def _json(outcome: Outcome) -> dict[str, Any]:
    return {
        "owner": outcome.owner,
        "scope": outcome.scope,
        "action": outcome.action,
        "state": outcome.state,
        "reason": outcome.reason,
        "orphans_deleted": outcome.orphans_deleted,
        "resynced": outcome.resynced,
    }


def _line(outcome: Outcome) -> str:
    state = outcome.state or "-"
    text = f"{outcome.owner}: {outcome.action}, {state}"
    if outcome.reason and (outcome.failed or outcome.state != WebhookState.ACTIVE.value):
        text += f" ({outcome.reason})"
    if outcome.orphans_deleted:
        text += f"; {outcome.orphans_deleted} orphaned subscription(s) deleted"
    if outcome.resynced:
        text += f"; sync asked of {len(outcome.resynced)} connection(s)"
    return text
