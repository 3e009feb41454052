"""The tokens one connection is made from by hand. Pure data and decisions, no I/O.

`closesync connections add` takes one token set (from the environment or standard input);
`closesync connections import` takes one per JSON line. Both hand it to
`closesync.connect.by_tokens`, so that they check and refuse the same things.

Nothing here ever puts a token's value in a message: a malformed value may be a token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

# The tokens of a set: (field, what a person calls it).
TOKEN_FIELDS = {
    "close_access_token": "Close access token",
    "close_refresh_token": "Close refresh token",
    "calendly_token": "Calendly token",
    "calendly_refresh_token": "Calendly refresh token",
}


class TokenSet(BaseModel):
    """What `connections add` takes: one JSON line of `connections import`, field for field.

    Strict and closed: a misspelt field (`close_token`) or a number where a token belongs is an
    error, not a token silently left out.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    close_access_token: SecretStr
    calendly_token: SecretStr
    close_refresh_token: SecretStr | None = None
    calendly_refresh_token: SecretStr | None = None
    # Seconds until each access token expires; absent = not known (refreshed when refused).
    close_expires_in: int | None = None
    calendly_expires_in: int | None = None
    # A label for people reading `connections list`.
    name: str | None = None

    def token(self, field: str) -> str | None:
        """One token's value, or None when not given."""
        value: SecretStr | None = getattr(self, field)
        return None if value is None else value.get_secret_value()


def token_shape_problem(value: str) -> str | None:
    """Why `value` cannot be a token (it holds spaces or non-ASCII characters); None if it can."""
    if value.isascii() and value.isprintable() and " " not in value:
        return None
    return "it holds spaces or non-ASCII characters"


@dataclass(frozen=True)
class TokenLine:
    """One line of an import file: its number (from 1) and its token set."""

    number: int
    tokens: TokenSet


def _described(error: ValidationError) -> str:
    """Each problem as `field: message`, without the value pydantic would quote.

    An unknown field is named only when its name looks like a field's (lowercase letters and
    underscores, as `close_token`): a line with a token where a name belongs must not print it.
    """
    parts = []
    for problem in error.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in problem["loc"]) or "the line"
        if problem["type"] != "extra_forbidden":
            parts.append(f"{where}: {problem['msg']}")
        elif re.fullmatch(r"[a-z_]{1,40}", where):
            parts.append(f"{where}: not a field of a token set")
        else:
            parts.append("a field that is not one of a token set (its name could be a token)")
    return "; ".join(parts)


def parse_token_lines(lines: Iterable[str]) -> tuple[list[TokenLine], list[str]]:
    """The token sets of JSON lines (blank lines skipped), and what is wrong with the others.

    Each problem names its line number and the field, never a value. Any problem makes the
    whole file malformed (the caller stores nothing): a file half right is a file to fix.
    """
    found: list[TokenLine] = []
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value: Any = json.loads(line)
        except ValueError as error:
            column = getattr(error, "colno", None)
            at = f" (column {column})" if column else ""
            problems.append(f"line {number} is not JSON{at}")
            continue
        if not isinstance(value, dict):
            problems.append(f"line {number} is not a JSON object")
            continue
        try:
            found.append(TokenLine(number, TokenSet.model_validate(value)))
        except ValidationError as error:
            problems.append(f"line {number}: {_described(error)}")
    return found, problems


def independent_groups(keys_per_line: Sequence[Iterable[str]]) -> list[list[int]]:
    """Indexes of the lines, grouped so that no two groups share a key, each in line order.

    Lines sharing a key (a Close user, a Calendly user) must be applied one after the other, in
    file order, for the outcome to be the one of adding them one by one; groups sharing none
    may go concurrently. Union-find over the keys; groups ordered by their first line.
    """
    parent = list(range(len(keys_per_line)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    owner: dict[str, int] = {}
    for index, keys in enumerate(keys_per_line):
        for key in keys:
            if key in owner:
                first, second = root(owner[key]), root(index)
                parent[max(first, second)] = min(first, second)
            else:
                owner[key] = index
    groups: dict[int, list[int]] = {}
    for index in range(len(keys_per_line)):
        groups.setdefault(root(index), []).append(index)
    return [groups[first] for first in sorted(groups)]
