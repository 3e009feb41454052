"""`closesync connections …`: add, import, list, show, remove, pause and resume connections.

Adding resolves both users (Close `GET /me/`, Calendly `GET /users/me`), which also proves both
tokens work; nothing is stored unless both answered, the Close organization may connect
(CLOSE_ORGANIZATION_IDS) and no other connection has that Calendly user (exit 2, naming it).
`add` and `import` (`closesync.cli.bulk_import`) share those steps: `closesync.connect.by_tokens`. A
Close user of several organizations is refused: `/me/` lists them all, and only a token
response (which `add` never sees) says which one a token is for.
Output never contains a token.

`add` takes its tokens without them going on the command line (`closesync.cli.token_input`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import SecretStr

from closesync.cli import bulk_import
from closesync.cli.common import print_json, print_table, when
from closesync.cli.token_input import TOKEN_FLAGS, TOKEN_VARIABLES, gather_tokens
from closesync.connect.by_tokens import connect_by_tokens
from closesync.connect.webhooks import Subscriptions
from closesync.core.connection import Connection, ConnectionOptions, ConnectionState
from closesync.core.errors import ConfigError
from closesync.core.token_set import TokenSet
from closesync.wiring.services import load_services


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "connections", help="add, import, list, show, set, remove, pause, resume"
    )
    commands = parser.add_subparsers(dest="action", metavar="ACTION")
    commands.required = True

    add = commands.add_parser(
        "add",
        help="connect a Close user to a Calendly user by tokens",
        description="Tokens come from the environment ("
        + ", ".join(TOKEN_VARIABLES.values())
        + ") or, with --tokens-from-stdin, from NAME=value lines on standard input. The token "
        "flags put them in the process list and shell history: avoid them.",
    )
    add.add_argument(
        "--tokens-from-stdin",
        action="store_true",
        help="read the tokens as NAME=value lines (the variable names) from standard input",
    )
    for option, what in TOKEN_FLAGS.items():
        add.add_argument(f"--{option.replace('_', '-')}", help=f"{what} (visible in `ps`: avoid)")
    add.add_argument("--close-expires-in", type=int, help="seconds until the access token expires")
    add.add_argument("--calendly-expires-in", type=int, help="seconds until it expires")
    add.add_argument("--name", help="a label for people reading `connections list`")
    add.add_argument("--json", action="store_true", help="print JSON")
    add.set_defaults(func=cmd_add)

    bulk_import.register(commands)

    listing = commands.add_parser(
        "list",
        help="every connection, oldest first (--offset/--limit for a page)",
        description="Every connection, oldest first. --offset N skips the first N and --limit M "
        "prints at most M: a page of a large fleet, in the same order every time.",
    )
    listing.add_argument(
        "--offset", type=_non_negative, default=0, metavar="N", help="skip the first N connections"
    )
    listing.add_argument(
        "--limit", type=_non_negative, metavar="M", help="print at most M connections"
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_list)

    options = commands.add_parser(
        "set", help="this connection's own choices of what to sync (default: the settings)"
    )
    options.add_argument("id", metavar="ID", help="connection id (conn_…)")
    for flag, what in (("--secret", "secret event types"), ("--one-off", "one-off meetings")):
        options.add_argument(
            flag,
            choices=("include", "exclude", "default"),
            help=f"sync {what} for this connection, or follow the setting (default)",
        )
    options.add_argument("--json", action="store_true", help="print JSON")
    options.set_defaults(func=cmd_set)

    for name, func, text in (
        ("show", cmd_show, "one connection"),
        ("remove", cmd_remove, "forget a connection and all its state"),
        ("pause", cmd_pause, "stop syncing a connection until resumed"),
        ("resume", cmd_resume, "sync a paused connection again"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("id", metavar="ID", help="connection id (conn_…)")
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.set_defaults(func=func)
        if name == "remove":
            sub.add_argument(
                "--revoke", action="store_true", help="revoke its grants at both providers"
            )
            sub.add_argument(
                "--delete-links",
                action="store_true",
                help="first delete the links closesync made for this user in Close",
            )


def public(connection: Connection) -> dict[str, Any]:
    """A connection as printed: its public fields only (the grants are not in the model)."""
    return connection.model_dump(mode="json")


def cmd_add(args: argparse.Namespace) -> int:
    services = load_services()
    services.require_key()  # before the tokens are checked at the APIs: they could not be stored
    tokens = gather_tokens(args)
    given = TokenSet(
        **{name: SecretStr(value) for name, value in tokens.values.items() if value},
        close_expires_in=args.close_expires_in,
        calendly_expires_in=args.calendly_expires_in,
        name=args.name,
    )
    # Under its refresh locks when it updates a connection, revoking the grants it replaces.
    added = connect_by_tokens(services, given, sources=tokens.sources)
    connection = added.connection
    if args.json:
        print_json({**public(connection), "updated": added.updated})
    else:
        verb = "updated" if added.updated else "added"
        sys.stdout.write(
            f"{verb} {connection.id}: Close {added.close_user} <- Calendly {added.calendly_user}\n"
        )
    return 0


def _non_negative(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return value


def cmd_list(args: argparse.Namespace) -> int:
    services = load_services()
    everyone: list[Connection] = services.connections.list()
    end = None if args.limit is None else args.offset + args.limit
    connections = everyone[args.offset : end]
    if args.json:
        print_json([public(c) for c in connections])
        return 0
    if not everyone:
        sys.stdout.write("no connections yet: add one with `closesync connections add`\n")
        return 0
    print_table(
        ["ID", "NAME", "STATE", "CLOSE USER", "CALENDLY USER", "ADDED"],
        [
            [
                c.id,
                c.name,
                c.state.value,
                c.close_email or c.close_user_id,
                c.calendly_email or c.calendly_user_uri,
                when(c.created_at),
            ]
            for c in connections
        ],
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    services = load_services()
    connection: Connection = services.connections.get(args.id)
    if args.json:
        print_json(public(connection))
        return 0
    for key, value in public(connection).items():
        shown = when(value) if key.endswith("_at") and isinstance(value, float) else value
        sys.stdout.write(f"{key:26} {shown}\n")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from closesync.connect.leaving import remove_connection

    services = load_services()
    connection: Connection = services.connections.get(args.id)
    removal = remove_connection(
        services, connection, delete_links=args.delete_links, revoke=args.revoke
    )
    deleted, revoked = removal.links_deleted, removal.revoked
    if args.json:
        print_json({"id": args.id, "removed": True, "links_deleted": deleted, "revoked": revoked})
    else:
        links = (
            f"{deleted} link(s) deleted in Close"
            if deleted is not None
            else "its links in Close were left as they are"
        )
        grants = f"; revoked: {', '.join(revoked)}" if revoked else ""
        sys.stdout.write(f"removed {args.id}; {links}{grants}\n")
    return 0


def _set_state(args: argparse.Namespace, state: ConnectionState) -> int:
    services = load_services()
    connection: Connection = services.connections.set_state(args.id, state)
    # Paused: its webhook subscription goes; resumed: it gets one (failures only logged).
    Subscriptions(services).after_state_change(connection)
    if args.json:
        print_json(public(connection))
    else:
        sys.stdout.write(f"{connection.id} is {connection.state.value}\n")
    return 0


_CHOICE = {"include": True, "exclude": False, "default": None}


def cmd_set(args: argparse.Namespace) -> int:
    if args.secret is None and args.one_off is None:
        raise ConfigError("say what to change: --secret and/or --one-off include|exclude|default")
    services = load_services()
    current: Connection = services.connections.get(args.id)
    options = ConnectionOptions(
        include_secret=current.options.include_secret
        if args.secret is None
        else _CHOICE[args.secret],
        include_one_off=current.options.include_one_off
        if args.one_off is None
        else _CHOICE[args.one_off],
    )
    connection: Connection = services.connections.set_options(args.id, options)
    if args.json:
        print_json(public(connection))
    else:
        shown = {k: "default" if v is None else v for k, v in options.model_dump().items()}
        sys.stdout.write(f"{connection.id}: {shown}\n")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    return _set_state(args, ConnectionState.PAUSED)


def cmd_resume(args: argparse.Namespace) -> int:
    return _set_state(args, ConnectionState.ACTIVE)
