"""The tokens `closesync connections add` takes, without them having to go on the command line.

A token in argv is seen by every user of the host (`ps`, /proc/PID/cmdline) and kept in the
shell's history. So each token comes from its environment variable (`TOKEN_VARIABLES`) or, with
`--tokens-from-stdin`, from `NAME=value` lines on standard input (what a secret manager or a file
kept out of the repo can pipe in). The token flags still work, for the scripts that use them,
with a one-line warning on stderr. Nothing here prints or logs a token's value.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from closesync.core.errors import ConfigError

try:
    import termios
except ImportError:  # not a POSIX system: standard input is read as it comes
    termios = None  # type: ignore[assignment]

# Each token `add` takes: the variable (and the NAME on standard input) that carries it.
TOKEN_VARIABLES = {
    "close_access_token": "CLOSESYNC_CLOSE_ACCESS_TOKEN",
    "close_refresh_token": "CLOSESYNC_CLOSE_REFRESH_TOKEN",
    "calendly_token": "CLOSESYNC_CALENDLY_TOKEN",
    "calendly_refresh_token": "CLOSESYNC_CALENDLY_REFRESH_TOKEN",
}
TOKEN_FLAGS = {
    "close_access_token": "Close OAuth access token",
    "close_refresh_token": "Close OAuth refresh token",
    "calendly_token": "Calendly access or personal token",
    "calendly_refresh_token": "Calendly OAuth refresh token",
}
_REQUIRED = {"close_access_token": "Close access token", "calendly_token": "Calendly token"}


@dataclass(frozen=True)
class Tokens:
    """The tokens given to `add`, and for each the place it came from (for messages)."""

    values: dict[str, str]
    sources: dict[str, str]

    def get(self, name: str) -> str | None:
        return self.values.get(name)


def parse_token_lines(text: str) -> dict[str, str]:
    """`NAME=value` lines (blank lines, `#` comments and a leading `export` allowed) by NAME.

    Errors name the line number only, never what the line holds: a malformed line may be a token.
    """
    known = {variable: name for name, variable in TOKEN_VARIABLES.items()}
    found: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        variable, equals, value = line.partition("=")
        variable = variable.strip()
        if not equals or not variable.isidentifier():
            raise ConfigError(f"line {number} of standard input is not NAME=value")
        if variable not in known:
            # Not named: a token pasted without NAME= parses as a "name" when it ends in base64
            # padding (`…NA==` splits at its first `=`), and echoing it would print the token.
            raise ConfigError(
                f"line {number} of standard input names none of "
                + ", ".join(TOKEN_VARIABLES.values())
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found[known[variable]] = value
    return found


def read_stdin() -> str:
    """Standard input to its end; from a terminal, with echo off, so typed tokens stay off screen.

    Like `getpass`, but for several lines up to Ctrl-D. The terminal's settings are restored
    however the read ends (Ctrl-C included).
    """
    if termios is None or not sys.stdin.isatty():
        return sys.stdin.read()
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
    try:
        # Said once echo is off: whoever waits for this line may type.
        sys.stderr.write("closesync: type NAME=value lines (not shown), then Ctrl-D\n")
        sys.stderr.flush()
        return sys.stdin.read()
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


def gather_tokens(args: argparse.Namespace) -> Tokens:
    """Each token from its flag, else standard input (`--tokens-from-stdin`), else the environment.

    A token flag still works, but puts the token in argv: one warning line on stderr says so.
    """
    stdin = parse_token_lines(read_stdin()) if args.tokens_from_stdin else {}
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    flagged: list[str] = []
    for name, variable in TOKEN_VARIABLES.items():
        flag = "--" + name.replace("_", "-")
        given = getattr(args, name)
        if given:
            values[name], sources[name] = given, flag
            flagged.append(flag)
        elif stdin.get(name):
            values[name], sources[name] = stdin[name], f"{variable} on standard input"
        elif os.environ.get(variable):
            values[name], sources[name] = os.environ[variable], variable
    if flagged:
        sys.stderr.write(
            f"closesync: warning: {', '.join(flagged)} put tokens in the process list and the "
            f"shell history; set {', '.join(TOKEN_VARIABLES.values())} or "
            "pass them as NAME=value lines with --tokens-from-stdin instead\n"
        )
    for name, what in _REQUIRED.items():
        if name not in values:
            raise ConfigError(
                f"no {what}: set {TOKEN_VARIABLES[name]}, give it on standard input with "
                f"--tokens-from-stdin, or pass --{name.replace('_', '-')}"
            )
    return Tokens(values, sources)
