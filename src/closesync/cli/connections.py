"""`closesync connections …`: add, list, show, remove, pause and resume connections.

Adding resolves both users (Close `GET /me/`, Calendly `GET /users/me`), which also proves both
tokens work; nothing is stored unless both answered, the Close organization may connect
(CLOSE_ORGANIZATION_IDS) and no other connection has that Calendly user (exit 2, naming it). A
Close user of several organizations is refused: `/me/` lists them all, and only a token
response (which `add` never sees) says which one a token is for.
Output never contains a token.

`add` takes its tokens without them going on the command line (`closesync.cli.token_input`).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from pydantic import SecretStr

from closesync.apis.calendly.client import CalendlyClient
from closesync.apis.close.client import CloseClient
from closesync.cli.common import print_json, print_table, when
from closesync.cli.token_input import TOKEN_FLAGS, TOKEN_VARIABLES, Tokens, gather_tokens
from closesync.connect.saving import save_connection
from closesync.core.calendly_payloads import User
from closesync.core.close_payloads import Me
from closesync.core.connection import (
    Connection,
    ConnectionOptions,
    ConnectionState,
    Grant,
    Grants,
    connection_between,
)
from closesync.core.errors import ApiError, AuthFailed, ConfigError, Forbidden
from closesync.core.retry import WaitBudget
from closesync.wiring.services import Services, load_services


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser("connections", help="add, list, show, remove, pause, resume")
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

    listing = commands.add_parser("list", help="every connection")
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


def _check_token_shape(source: str, value: str | None) -> None:
    """A token is printable ASCII without spaces; say where a bad one came from, never its value."""
    if value is not None and not (value.isascii() and value.isprintable() and " " not in value):
        raise ConfigError(f"{source} is not a token: it holds spaces or non-ASCII characters")


def _resolve(services: Services, tokens: Tokens) -> tuple[Me, User]:
    """Both users behind the given tokens; a refused token becomes a one-line ConfigError."""
    for name, source in tokens.sources.items():
        _check_token_shape(source, tokens.get(name))
    settings = services.settings
    budget = WaitBudget(settings.inline_wait_budget_seconds)
    close_token = tokens.values["close_access_token"]
    calendly_token = tokens.values["calendly_token"]
    close = CloseClient(
        http=services.api_http("Close", settings.close_api_url, budget),
        token=lambda: close_token,
    )
    calendly = CalendlyClient(
        http=services.api_http("Calendly", settings.calendly_api_url, budget),
        token=lambda: calendly_token,
    )
    try:
        me = close.get_me()
    except (AuthFailed, Forbidden) as error:
        raise ConfigError(f"the Close access token was refused: {error}") from None
    try:
        user = calendly.get_current_user()
    except (AuthFailed, Forbidden) as error:
        raise ConfigError(f"the Calendly token was refused: {error}") from None
    return me, user


def cmd_add(args: argparse.Namespace) -> int:
    services = load_services()
    services.require_key()  # before the tokens are checked at the APIs: they could not be stored
    tokens = gather_tokens(args)
    try:
        me, user = _resolve(services, tokens)
    except ApiError as error:
        raise ApiError(
            f"could not check the tokens: {error}",
            api=error.api,
            method=error.method,
            endpoint=error.endpoint,
            status=error.status,
        ) from None
    if me.organization_id is None and len(me.organizations) > 1:
        # Only Close's token response names a token's organization, and `add` has none: a guess
        # (the first listed, the only allowed one) could label a token of another organization.
        raise ConfigError(
            f"the Close user belongs to {len(me.organizations)} Close organizations and an access "
            "token alone does not say which one it is for; connect this user with `closesync "
            "connect` or `closesync web`, which learn it from Close; nothing was stored"
        )
    if not services.settings.close_organization_allowed(me.organization_id):
        raise ConfigError(
            f"the Close user's organization {me.organization_id} is not one this closesync "
            "serves (CLOSE_ORGANIZATION_IDS); nothing was stored"
        )
    now = time.time()
    grants = Grants(
        close=Grant(
            kind="oauth",
            access_token=SecretStr(tokens.values["close_access_token"]),
            refresh_token=_secret(tokens.get("close_refresh_token")),
            expires_at=now + args.close_expires_in if args.close_expires_in else None,
        ),
        calendly=Grant(
            kind="oauth" if tokens.get("calendly_refresh_token") else "pat",
            access_token=SecretStr(tokens.values["calendly_token"]),
            refresh_token=_secret(tokens.get("calendly_refresh_token")),
            expires_at=now + args.calendly_expires_in if args.calendly_expires_in else None,
        ),
    )
    existing: Connection | None = services.connections.find_by_close_user(me.id)
    connection = connection_between(existing, me, user, name=args.name, now=now)
    # Updating a connection: under its refresh locks, revoking the grants it replaces.
    save_connection(services, existing, connection, grants)
    if args.json:
        print_json({**public(connection), "updated": existing is not None})
    else:
        verb = "updated" if existing else "added"
        sys.stdout.write(
            f"{verb} {connection.id}: Close {me.email or me.id}"
            f" <- Calendly {user.email or user.uri}\n"
        )
    return 0


def _secret(value: str | None) -> SecretStr | None:
    return SecretStr(value) if value else None


def cmd_list(args: argparse.Namespace) -> int:
    services = load_services()
    connections: list[Connection] = services.connections.list()
    if args.json:
        print_json([public(c) for c in connections])
        return 0
    if not connections:
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
