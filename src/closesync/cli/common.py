"""What the commands share: printing tables and JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any


def print_json(value: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


# Colours for the values a person scans for; NO_COLOR (rich honours it) turns them off.
_VALUE_STYLES: dict[str, dict[str, str]] = {
    "STATE": {"active": "green", "paused": "yellow", "needs_reauth": "red"},
    "OUTCOME": {"ok": "green", "partial": "yellow", "failed": "red"},
}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """An aligned table on stdout; empty cells print as '-'.

    On a terminal: a bold header over a rule, columns folded (not cut) to the width. Anywhere
    else (a pipe, a file, cron): the header line, then one line per row, no escape codes, no
    rule, nothing wrapped or cut, no trailing spaces, so `grep` and `awk` work on it.
    """
    # Imported here: every command module loads this one at startup, and rich costs ~30-60 ms.
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(file=sys.stdout)
    terminal = console.is_terminal
    table = Table(
        box=box.SIMPLE_HEAD if terminal else None,
        show_edge=False,
        pad_edge=False,
        # Two spaces between columns, as before: a cell's right padding plus the divider (a
        # space in SIMPLE_HEAD) on a terminal; both paddings without a box.
        padding=(0, 1, 0, 0) if terminal else (0, 1),
    )
    for index, header in enumerate(headers):
        # The first column is the id people copy into the next command: other columns fold
        # first when the terminal is narrow.
        table.add_column(str(header), overflow="fold", no_wrap=index == 0)
    for row in rows:
        cells = []
        for header, value in zip(headers, row, strict=True):
            shown = "-" if value is None or value == "" else str(value)
            # Text, not str: a name such as "Sales [EU]" must not be read as rich markup.
            cells.append(Text(shown, style=_VALUE_STYLES.get(str(header), {}).get(shown, "")))
        table.add_row(*cells)
    if terminal:
        console.print(table)
        return
    # Wide enough that no cell is ever wrapped or cut; rich pads the last column, so strip it.
    console.width = 1_000_000
    with console.capture() as captured:
        console.print(table)
    for line in captured.get().splitlines():
        sys.stdout.write(line.rstrip() + "\n")


def when(timestamp: float | None) -> str:
    """A Unix time as `2026-11-25 14:03:07Z`."""
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")
