"""`closesync connections import FILE|-`: many connections at once, from JSON lines of token sets.

Each line is one JSON object with the fields `connections add` takes: `close_access_token` and
`calendly_token`, optionally `close_refresh_token`, `calendly_refresh_token`,
`close_expires_in`, `calendly_expires_in` (seconds) and `name`; blank lines are skipped.

The file is read and checked whole first. A line that is not a JSON object, misses a required
field, has a field of the wrong type or one `add` does not take makes the file malformed: exit 2,
each such line named by its number (never its content), nothing stored, no API called. Then every
line goes through the steps of `connections add` (`closesync.connect.by_tokens`), `--concurrency`
lines at a time: a line whose tokens are refused, whose Close organization is not served or whose
Calendly user another connection has fails alone, nothing of it stored, and the others are
stored; exit 1 if any line failed. One result per line, in file order, on standard output:
`line N: added conn_…` or `line N: failed: why` (`--json`: one JSON object per line); a count on
standard error at the end. Never a token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from closesync.connect.by_tokens import Added, Outcome, connect_many
from closesync.core.errors import ConfigError
from closesync.core.token_set import TokenLine, parse_token_lines
from closesync.wiring.services import load_services

# Lines resolved at once: each waits on two API calls, so 16 keep a 100 ms API busy at ~80
# lines a second without coming near either API's rate limits for one organization's users.
DEFAULT_CONCURRENCY = 16
MAX_CONCURRENCY = 128


def register(commands: argparse._SubParsersAction[Any]) -> None:
    parser = commands.add_parser(
        "import",
        help="add or update many connections from JSON lines of token sets",
        description="Each line of FILE (- for standard input) is a JSON object with the fields "
        "`connections add` takes: close_access_token, calendly_token, and optionally "
        "close_refresh_token, calendly_refresh_token, close_expires_in, calendly_expires_in "
        "and name. Every line is added as `connections add` would, several at a time. Exit 2 "
        "and nothing stored if a line is malformed; exit 1 if any line was refused (the others "
        "are stored).",
    )
    parser.add_argument("file", metavar="FILE", help="the JSON lines; - reads standard input")
    parser.add_argument(
        "--concurrency",
        type=_concurrency,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"lines checked at the APIs at once (default {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.set_defaults(func=cmd_import)


def _concurrency(text: str) -> int:
    """An argparse type: a whole number from 1 to MAX_CONCURRENCY."""
    value = int(text) if text.isdigit() else 0
    if not 1 <= value <= MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1 to {MAX_CONCURRENCY}")
    return value


def _read(file: str) -> str:
    """The whole input; ConfigError naming the file (never its content) if it cannot be read."""
    try:
        return sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{file} is not UTF-8 text; nothing was imported") from None
    except OSError as error:
        raise ConfigError(f"cannot read {file}: {error.strerror}; nothing was imported") from None


def cmd_import(args: argparse.Namespace) -> int:
    services = load_services()
    services.require_key()  # before any line is checked at the APIs: none could be stored
    where = "standard input" if args.file == "-" else args.file
    lines, problems = parse_token_lines(_read(args.file).split("\n"))
    if problems:
        for problem in problems:
            sys.stderr.write(f"closesync: {where}: {problem}\n")
        sys.stderr.write(
            f"closesync: {where} is malformed ({len(problems)} line(s) above); "
            "nothing was imported\n"
        )
        return 2
    if not lines:
        sys.stderr.write(f"closesync: no token sets in {where}; nothing to import\n")
        return 0
    counts = {"added": 0, "updated": 0, "failed": 0}

    def on_result(line: TokenLine, outcome: Outcome) -> None:
        if isinstance(outcome, Added):
            verb = "updated" if outcome.updated else "added"
            counts[verb] += 1
            _print_added(line, outcome, verb, as_json=args.json)
        else:
            counts["failed"] += 1
            if args.json:
                _json_line({"line": line.number, "ok": False, "error": str(outcome)})
            else:
                sys.stdout.write(f"line {line.number}: failed: {outcome}\n")
        sys.stdout.flush()

    connect_many(services, lines, concurrency=args.concurrency, on_result=on_result)
    sys.stderr.write(
        f"closesync: {len(lines) - counts['failed']} of {len(lines)} line(s) imported: "
        f"{counts['added']} added, {counts['updated']} updated, {counts['failed']} failed\n"
    )
    return 1 if counts["failed"] else 0


def _print_added(line: TokenLine, added: Added, verb: str, *, as_json: bool) -> None:
    connection = added.connection
    if as_json:
        # The fields `connections add --json` prints, with the line it came from.
        public = connection.model_dump(mode="json")
        _json_line({"line": line.number, "ok": True, "updated": added.updated, **public})
        return
    sys.stdout.write(
        f"line {line.number}: {verb} {connection.id}: Close {added.close_user} <- Calendly "
        f"{added.calendly_user}\n"
    )


def _json_line(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value, sort_keys=True, default=str) + "\n")
