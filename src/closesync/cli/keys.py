"""`closesync keys generate|rotate`: make a Fernet key, re-encrypt every stored grant.

Rotation (decisions.md): put the new key first in CLOSESYNC_ENCRYPTION_KEYS and keep the old one
after it, roll that list out to EVERY process (workers, scheduler, web), run `closesync keys
rotate`, check with `closesync keys check` that nothing is sealed under an older key, then drop
the old key. A process still on the old list would keep sealing refreshed grants under the old
key, and dropping it too early would make those unreadable. Neither command prints a token;
`generate` prints only the new key, which is meant for the operator's secret store.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from closesync.cli.common import print_json
from closesync.core.errors import ConfigError
from closesync.settings import load_settings
from closesync.store.key_rotation import check_keys, rotate_keys
from closesync.store.secretbox import FernetBox, generate_key
from closesync.wiring.services import load_services


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser("keys", help="generate an encryption key, rotate keys")
    commands = parser.add_subparsers(dest="action", metavar="ACTION")
    commands.required = True
    generate = commands.add_parser("generate", help="print a new Fernet key")
    generate.set_defaults(func=cmd_generate)
    rotate = commands.add_parser(
        "rotate", help="re-encrypt every stored grant with the first CLOSESYNC_ENCRYPTION_KEYS key"
    )
    rotate.add_argument(
        "--seal-plaintext",
        action="store_true",
        help="also encrypt grants stored unencrypted (CLOSESYNC_ALLOW_PLAINTEXT_TOKENS); only if "
        "no one but this deployment can write to Redis: whatever is there becomes a grant",
    )
    rotate.add_argument("--json", action="store_true", help="print JSON")
    rotate.set_defaults(func=cmd_rotate)

    check = commands.add_parser(
        "check", help="count grants sealed under the first key, an older key, or none"
    )
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(func=cmd_check)


def cmd_generate(args: argparse.Namespace) -> int:
    sys.stdout.write(generate_key() + "\n")
    return 0


def _boxes(what: str) -> tuple[Any, FernetBox, FernetBox]:
    settings = load_settings()
    keys = settings.encryption_keys()
    if not keys:
        raise ConfigError(
            "CLOSESYNC_ENCRYPTION_KEYS is not set: put the new key first (and the old ones after "
            f"it) before `closesync keys {what}`; `closesync keys generate` makes one"
        )
    return load_services(settings), FernetBox(keys), FernetBox(keys[:1])


def cmd_rotate(args: argparse.Namespace) -> int:
    services, box, first = _boxes("rotate")
    # The box the processes use: with CLOSESYNC_REQUIRE_BOUND_GRANTS it binds no unbound value.
    sealing = FernetBox(
        services.settings.encryption_keys(),
        require_bound=services.settings.closesync_require_bound_grants,
    )
    count = rotate_keys(services.redis, services.keys, sealing, seal_plaintext=args.seal_plaintext)
    counts = check_keys(services.redis, services.keys, box, first)
    if args.json:
        print_json({"re_encrypted": count, "keys": box.key_count, **counts})
        return 0 if counts["unreadable"] + counts["unencrypted"] == 0 else 1
    sys.stdout.write(
        f"re-encrypted {count} stored grant(s) with the first of {box.key_count} key(s)\n"
    )
    return _report(counts)


def cmd_check(args: argparse.Namespace) -> int:
    services, box, first = _boxes("check")
    counts = check_keys(services.redis, services.keys, box, first)
    if args.json:
        print_json(counts)
        pending = counts["older_key"] + counts["unencrypted"] + counts["unreadable"]
        return 0 if pending + counts["unbound"] == 0 else 1
    return _report(counts)


def _report(counts: dict[str, int]) -> int:
    sys.stdout.write(
        f"{counts['current']} grant(s) sealed with the first key, {counts['older_key']} with an "
        f"older key, {counts['unencrypted']} unencrypted, {counts['unreadable']} that no "
        "configured key opens (or sealed for another connection); "
        f"{counts['unbound']} not yet bound to their connection\n"
    )
    if counts["unreadable"]:
        sys.stdout.write("some grants cannot be read: those connections must be connected again\n")
        return 1
    if counts["unencrypted"]:
        # Not simply "rotate encrypts them": anyone who can write to Redis can plant one.
        sys.stdout.write(
            "some grants are stored unencrypted, and runs refuse them: if this deployment "
            "stored them (CLOSESYNC_ALLOW_PLAINTEXT_TOKENS) and no one else can write to this "
            "Redis, `closesync keys rotate --seal-plaintext` encrypts them; otherwise connect "
            "those users again\n"
        )
        return 1
    if counts["unbound"]:
        sys.stdout.write(
            "some grants were sealed before grants were bound to their connection: "
            "`closesync keys rotate` binds them (to the key each sits under), then set "
            "CLOSESYNC_REQUIRE_BOUND_GRANTS=true\n"
        )
        return 1
    if counts["older_key"]:
        sys.stdout.write(
            "keep the older keys: some process still seals with them; roll the key list out "
            "everywhere and rotate again\n"
        )
        return 1
    sys.stdout.write("keys after the first can now be removed\n")
    return 0
