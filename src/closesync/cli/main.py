"""Entry point of the `closesync` command: parses arguments and dispatches to one command module.

Each command lives in its own module under `closesync.cli` and exposes `register(subparsers)`,
which adds its parser and sets `func` (a callable taking the parsed namespace and returning the
exit code). Exit codes follow docs/decisions: 0 success, 1 a connection failed, 2 bad usage or
configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from closesync import __version__

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on bad usage already; this keeps the message on one clear line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"closesync: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered command."""
    from closesync.cli import commands

    parser = _Parser(prog="closesync", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"closesync {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for register in commands.REGISTRY:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
