"""Entry point of the `closesync` command: parses arguments and dispatches to one command module.

Each command lives in its own module under `closesync.cli` and exposes `register(subparsers)`,
which adds its parser and sets `func` (a callable taking the parsed namespace and returning the
exit code). Exit codes (decisions.md): 0 success, 1 a connection failed (or Redis is down), 2 bad
usage or configuration. Errors print as one line on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from closesync import __version__
from closesync.core.errors import (
    ApiError,
    CloseSyncError,
    ConfigError,
    ConnectionNotFound,
    EncryptionError,
    PairingRefused,
    StoreUnavailable,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """Bad usage exits with 2 and one clear line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"closesync: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered command."""
    from closesync.cli import commands

    parser = _Parser(
        prog="closesync",
        description="Keeps Close scheduling links equal to Calendly event types.",
    )
    parser.add_argument("--version", action="version", version=f"closesync {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for register in commands.registry():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except (ConfigError, ConnectionNotFound, EncryptionError, PairingRefused) as error:
        sys.stderr.write(f"closesync: {error}\n")
        return EXIT_USAGE
    except (StoreUnavailable, ApiError, CloseSyncError) as error:
        sys.stderr.write(f"closesync: {error}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write("closesync: interrupted\n")
        return 130
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
