"""The command modules; each contributes `register(subparsers)`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Register = Callable[["argparse._SubParsersAction[Any]"], None]


def registry() -> list[Register]:
    """Every command, in the order `closesync --help` lists them."""
    from closesync.cli import connect, connections, daemon, demo, keys, status, sync, web, webhooks
    from closesync.sandbox import cli as sandbox_cli

    commands: list[Register] = [
        sync.register,
        status.register,
        connections.register,
        daemon.register,
        connect.register,
        keys.register,
        webhooks.register,
        web.register,
        demo.register,
        sandbox_cli.register,
    ]
    return commands
