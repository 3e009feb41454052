"""The list of command modules; each contributes `register(subparsers)`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Register = Callable[["argparse._SubParsersAction[Any]"], None]


def _load() -> list[Register]:
    from closesync.sandbox import cli as sandbox_cli

    return [sandbox_cli.register]


REGISTRY: list[Register] = _load()
