"""The command modules; each contributes `register(subparsers)`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Register = Callable[["argparse._SubParsersAction[Any]"], None]


def registry() -> list[Register]:
    """Every command, in the order `closesync --help` lists them."""
    from closesync.cli import connect, connections, keys, status, sync, web

    commands: list[Register] = [
        sync.register,
        status.register,
        connections.register,
        connect.register,
        keys.register,
        web.register,
    ]
    try:
        from closesync.sandbox import cli as sandbox_cli
    except ImportError:  # pragma: no cover - the sandbox CLI is being written
        return commands
    return [*commands, sandbox_cli.register]
