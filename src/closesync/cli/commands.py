"""The command modules; each contributes `register(subparsers)`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Register = Callable[["argparse._SubParsersAction[Any]"], None]


def registry() -> list[Register]:
    """Every command, in the order `closesync --help` lists them."""
    from closesync.cli import connections, status, sync
    from closesync.sandbox import cli as sandbox_cli

    return [
        sync.register,
        status.register,
        connections.register,
        sandbox_cli.register,
    ]
