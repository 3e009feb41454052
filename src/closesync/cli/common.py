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


# Rows per table rich draws on a terminal: rich takes ~0.8 ms a row, so a fleet's table is drawn
# page by page (the first page shows at once) rather than after seconds of silence.
TERMINAL_PAGE_ROWS = 200
# Characters that would break a row over several lines (or move the cursor) in piped output.
_BREAKS = {code: " " for code in (*range(0x20), 0x7F, 0x85, 0x2028, 0x2029)}


def _shown(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """An aligned table on stdout; empty cells print as '-'.

    On a terminal: a bold header over a rule, columns folded (not cut) to the width. Anywhere
    else (a pipe, a file, cron): the header line, then one line per row, no escape codes, no
    rule, nothing wrapped or cut, no trailing spaces, so `grep` and `awk` work on it.
    """
    # Imported here: every command module loads this one at startup, and rich costs ~30-60 ms.
    from rich.console import Console

    console = Console(file=sys.stdout)
    if not console.is_terminal:
        _plain_table(headers, rows)
        return
    _terminal_table(console, headers, rows)


def _plain_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """The piped layout, written directly: columns two spaces apart, each as wide as its widest
    cell (in terminal cells, as rich counts them), lines right-stripped; control characters
    print as spaces so that a row is always one line. Fast: 10,000 rows in a few tens of ms,
    where drawing them with rich took seconds."""
    from rich.cells import cell_len

    def cell(value: Any) -> tuple[str, int]:
        text = _shown(value)
        if text.isascii() and text.isprintable():  # the common case, one cell per character
            return text, len(text)
        text = text.translate(_BREAKS)
        return text, cell_len(text)

    table = [[cell(header) for header in headers]]
    table.extend([cell(value) for value in row] for row in rows)
    widths = [max(row[i][1] for row in table) for i in range(len(headers))]
    write = sys.stdout.write
    for row in table:
        padded = [
            text + " " * (width - size) for (text, size), width in zip(row, widths, strict=True)
        ]
        write("  ".join(padded).rstrip() + "\n")


def _terminal_table(console: Any, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table that fits the terminal is written directly, in rich's look (bold header, a rule,
    coloured values): rich takes ~1 ms a row, seconds for a fleet. One that does not fit is
    rich's to fold, TERMINAL_PAGE_ROWS rows per table, every page given the same widths (`_fit`)
    so that the columns line up from one page to the next."""
    from rich import box
    from rich.cells import cell_len
    from rich.table import Table
    from rich.text import Text

    shown = [[_shown(value) for value in row] for row in rows]
    widths = [
        max([cell_len(str(header))] + [cell_len(row[i]) for row in shown])
        for i, header in enumerate(headers)
    ]
    if sum(widths) + 2 * (len(widths) - 1) <= console.width and all(
        cell.isprintable() for row in shown for cell in row
    ):
        _fitting_table(console, headers, shown, widths)
        return
    pages = [shown[i : i + TERMINAL_PAGE_ROWS] for i in range(0, len(shown), TERMINAL_PAGE_ROWS)]
    fixed = _fit(widths, console.width - 2 * (len(widths) - 1)) if len(pages) > 1 else None
    for number, page in enumerate(pages or [[]]):
        table = Table(
            box=box.SIMPLE_HEAD,
            show_edge=False,
            show_header=number == 0,
            pad_edge=False,
            # Two spaces between columns, as before: a cell's right padding plus the divider
            # (a space in SIMPLE_HEAD).
            padding=(0, 1, 0, 0),
        )
        for index, header in enumerate(headers):
            # The first column is the id people copy into the next command: other columns fold
            # first when the terminal is narrow.
            table.add_column(
                str(header),
                overflow="fold",
                no_wrap=index == 0,
                width=fixed[index] if fixed else None,
            )
        for row in page:
            # Text, not str: a name such as "Sales [EU]" must not be read as rich markup.
            table.add_row(
                *(
                    Text(cell, style=_VALUE_STYLES.get(str(header), {}).get(cell, ""))
                    for header, cell in zip(headers, row, strict=True)
                )
            )
        console.print(table)


def _fit(widths: list[int], available: int) -> list[int]:
    """Column widths within `available` cells: the widest column but the first (the id) gives
    up a cell at a time, as rich folds, so that every page of one table gets the same widths."""
    fitted = list(widths)
    while sum(fitted) > available:
        narrowable = [i for i in range(1, len(fitted)) if fitted[i] > 1]
        if not narrowable:
            break
        fitted[max(narrowable, key=lambda i: fitted[i])] -= 1
    return fitted


def _fitting_table(
    console: Any, headers: Sequence[str], rows: list[list[str]], widths: list[int]
) -> None:
    """rich's SIMPLE_HEAD table without rich's per-cell layout work: the styles come from rich
    (its colour system, NO_COLOR, a dumb terminal), the layout is fixed widths."""
    from rich.cells import cell_len
    from rich.console import COLOR_SYSTEMS
    from rich.style import Style

    system = COLOR_SYSTEMS.get(console.color_system or "")
    styles: dict[str, Style] = {}

    def styled(text: str, name: str) -> str:
        if not name or system is None:
            return text
        style = styles.get(name)
        if style is None:
            parsed = Style.parse(name)
            style = styles[name] = parsed.without_color if console.no_color else parsed
        return style.render(text, color_system=system)

    def padded(text: str, width: int) -> str:
        return text + " " * (width - cell_len(text))

    write = console.file.write
    header = "  ".join(padded(str(h), w) for h, w in zip(headers, widths, strict=True))
    write(styled(header, "bold") + "\n")
    write("\u2500" * (sum(widths) + 2 * (len(widths) - 1)) + "\n")
    for row in rows:
        cells = [
            styled(padded(cell, width), _VALUE_STYLES.get(str(header), {}).get(cell, ""))
            for header, cell, width in zip(headers, row, widths, strict=True)
        ]
        write("  ".join(cells).rstrip() + "\n")


def when(timestamp: float | None) -> str:
    """A Unix time as `2026-11-25 14:03:07Z`."""
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")
