"""`closesync keys generate|rotate`: make a Fernet key, re-encrypt every stored grant.

Rotation (decisions.md): put the new key first in CLOSESYNC_ENCRYPTION_KEYS and keep the old one
after it, run `closesync keys rotate`, then drop the old key. Neither command prints a token;
`generate` prints only the new key, which is meant for the operator's secret store.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from closesync.cli.common import load_services, load_settings, print_json
from closesync.errors import ConfigError
from closesync.secretbox import FernetBox, generate_key


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser("keys", help="generate an encryption key, rotate keys")
    commands = parser.add_subparsers(dest="action", metavar="ACTION")
    commands.required = True
    generate = commands.add_parser("generate", help="print a new Fernet key")
    generate.set_defaults(func=cmd_generate)
    rotate = commands.add_parser(
        "rotate", help="re-encrypt every stored grant with the first CLOSESYNC_ENCRYPTION_KEYS key"
    )
    rotate.add_argument("--json", action="store_true", help="print JSON")
    rotate.set_defaults(func=cmd_rotate)


def cmd_generate(args: argparse.Namespace) -> int:
    sys.stdout.write(generate_key() + "\n")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    settings = load_settings()
    keys = settings.encryption_keys()
    if not keys:
        raise ConfigError(
            "CLOSESYNC_ENCRYPTION_KEYS is not set: put the new key first (and the old ones after "
            "it) before `closesync keys rotate`; `closesync keys generate` makes one"
        )
    box = FernetBox(keys)
    services = load_services(settings)
    count = services.connections.rotate_keys(box)
    if args.json:
        print_json({"re_encrypted": count, "keys": box.key_count})
    else:
        sys.stdout.write(
            f"re-encrypted {count} stored grant(s) with the first of {box.key_count} key(s); "
            "keys after the first can now be removed\n"
        )
    return 0
