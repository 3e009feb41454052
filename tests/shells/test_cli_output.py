"""The CLI's human output (tables, progress bar, the demo's view), with and without a terminal."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import cast

import pytest
from rich.console import Console

from closesync.cli.common import print_table
from closesync.cli.demo_runner import Demo, _render, _view
from closesync.cli.sync import _bar

# An id longer than a narrow terminal, and values wider than rich's default 80 columns.
LONG_ID = "conn_" + "0123456789ab" * 4
WIDE = "https://api.calendly.com/users/" + "f" * 120
ESCAPE = "\x1b"
# An SGR sequence setting a foreground or background colour (bold, reset etc. are not colour).
_SGR = re.compile(r"\x1b\[([0-9;]*)m")


def _colours(text: str) -> list[str]:
    """Every colour parameter of every SGR sequence in text."""
    found = []
    for params in _SGR.findall(text):
        for param in params.split(";"):
            if param and (30 <= int(param) <= 49 or 90 <= int(param) <= 107):
                found.append(param)
    return found


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich decides from the environment too: take out whatever a CI runner may have set."""
    for name in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)
    # A CI runner's TERM may be "dumb", where rich draws neither colours nor live displays.
    monkeypatch.setenv("TERM", "xterm-256color")


@pytest.fixture
def terminal_env(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make rich treat the captured stdout as a 200-column terminal."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")


def _table() -> tuple[list[str], list[list[object]]]:
    return (
        ["ID", "NAME", "STATE", "CALENDLY USER", "OUTCOME"],
        [
            [LONG_ID, "Sales [EU] :smile:", "active", WIDE, "ok"],
            ["conn_aa", None, "needs_reauth", "", "failed"],
        ],
    )


def test_print_table_not_a_terminal_plain_lines_with_every_id_in_full(
    clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Piped: a header line and one line per row, no escapes, nothing wrapped, cut or padded."""
    print_table(*_table())
    out = capsys.readouterr().out
    assert ESCAPE not in out
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["ID", "NAME", "STATE", "CALENDLY", "USER", "OUTCOME"]
    assert lines[1].split("  ")[0] == LONG_ID
    assert WIDE in lines[1]
    # Markup-looking names are printed as they are, empty cells as '-'.
    assert "Sales [EU] :smile:" in lines[1]
    assert lines[2].split() == ["conn_aa", "-", "needs_reauth", "-", "failed"]
    assert all(line == line.rstrip() for line in lines)
    # The columns stay aligned, so `awk`/`cut` on the text see the same column at one offset.
    assert lines[0].index("STATE") == lines[1].index("active") == lines[2].index("needs_reauth")


def test_print_table_not_a_terminal_keeps_the_two_space_layout(
    clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Piped output is the layout scripts were written against: columns two spaces apart."""
    print_table(["ID", "STATE"], [["conn_1", "active"], ["conn_22", "paused"]])
    assert capsys.readouterr().out == ("ID       STATE\nconn_1   active\nconn_22  paused\n")


def test_print_table_narrow_terminal_folds_other_columns_and_keeps_the_id_whole(
    terminal_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a narrow terminal the other columns fold (nothing is cut); the id stays on one line."""
    monkeypatch.setenv("COLUMNS", "60")
    print_table(["ID", "NAME", "CALENDLY USER"], [["conn_0123456789ab", "Sales team", WIDE]])
    plain = _SGR.sub("", capsys.readouterr().out)
    assert all(len(line) <= 60 for line in plain.splitlines())
    assert plain.splitlines()[2].split()[0] == "conn_0123456789ab"
    # Folded, not cut: all 120 f of the wide value are still there.
    assert plain.count("f") == 120


def test_print_table_no_color_terminal_has_no_colour_codes(
    terminal_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """NO_COLOR turns the state colours off on a terminal (the same table has them without it)."""
    print_table(*_table())
    coloured = capsys.readouterr().out
    assert "\x1b[32mactive" in coloured
    assert "\x1b[31mneeds_reauth" in coloured
    assert "\x1b[32mok" in coloured
    monkeypatch.setenv("NO_COLOR", "1")
    print_table(*_table())
    out = capsys.readouterr().out
    assert _colours(out) == []
    assert LONG_ID in out


def test_print_table_fitting_terminal_bold_header_rule_and_coloured_states(
    terminal_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A table that fits the terminal: bold header, a rule, coloured values, none with NO_COLOR."""
    rows = [["conn_1", "Sales [EU]", "active"], ["conn_22", None, "needs_reauth"]]
    print_table(["ID", "NAME", "STATE"], rows)
    out = capsys.readouterr().out
    assert "\x1b[1mID" in out
    assert "\x1b[32mactive" in out
    assert "\x1b[31mneeds_reauth" in out
    plain = _SGR.sub("", out).splitlines()
    assert plain[1] == "\u2500" * len(plain[0])
    assert plain[2].startswith("conn_1   Sales [EU]  ")
    assert plain[0].index("STATE") == plain[2].index("active") == plain[3].index("needs_reauth")
    monkeypatch.setenv("NO_COLOR", "1")
    print_table(["ID", "NAME", "STATE"], rows)
    assert _colours(capsys.readouterr().out) == []


def test_print_table_many_rows_too_wide_header_once_and_columns_aligned_across_pages(
    terminal_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows past one page on a narrow terminal: one header, and every page's columns line up."""
    monkeypatch.setenv("COLUMNS", "70")
    rows = [[f"conn_{i:03}", "x" * (90 if i == 0 else 1), "active"] for i in range(250)]
    print_table(["ID", "NAME", "STATE"], rows)
    lines = _SGR.sub("", capsys.readouterr().out).splitlines()
    assert sum(line.split()[:1] == ["ID"] for line in lines) == 1
    rows_drawn = [line for line in lines if line.startswith("conn_")]
    assert len(rows_drawn) == 250
    assert len({line.index("active") for line in rows_drawn}) == 1


def test_bar_disabled_yields_no_bar_and_writes_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without a terminal on stderr (or with --json) there is no bar and no output at all."""
    with _bar(3, enabled=False) as bar:
        assert bar is None
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("force_terminal", "term"), [(False, "xterm-256color"), (True, "dumb")], ids=["pipe", "dumb"]
)
def test_bar_console_not_an_interactive_terminal_writes_nothing(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, force_terminal: bool, term: str
) -> None:
    """A bar asked for on a stderr that is not a terminal (or a dumb one) writes nothing at all."""
    monkeypatch.setenv("TERM", term)
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=force_terminal)
    with _bar(3, enabled=True, console=console) as bar:
        assert bar is None
    assert stream.getvalue() == ""


def test_bar_terminal_counts_connections_and_writes_of_the_set_then_erases_itself(
    clean_env: None,
) -> None:
    """On a terminal one bar covers the set: connections done of all, the writes of every run so
    far, the connection last heard from; it is erased at the end."""
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=100)
    with _bar(3, enabled=True, console=console) as bar:
        assert bar is not None
        bar.progress_of("conn_0123456789aa")(2, 4)
        bar.progress_of("conn_0123456789ab")(3, 5)
        bar.finished("conn_0123456789ab")
        bar.console.print("a report line", markup=False)
    drawn = stream.getvalue()
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    assert "1/3 connections  5/9 writes  conn_0123456789ab" in plain
    assert "a report line" in plain
    # Transient: after its last drawing the bar's line is erased.
    assert "\x1b[2K" in drawn[drawn.rindex("5/9 writes") :]


def test_cli_startup_does_not_import_rich() -> None:
    """Building the parser (every command's startup) leaves rich unimported: it costs 30-60 ms."""
    code = (
        "import sys\n"
        "from closesync.cli.main import build_parser\n"
        "build_parser()\n"
        "print(sorted(m for m in sys.modules if m == 'rich' or m.startswith('rich.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


@dataclass
class _FakeDemo:
    """What `_render` reads of a Demo: its rows, the log of edits and the last plain frame."""

    table: list[tuple[str, str, int, int, bool, str]]
    log: list[str] = field(default_factory=list)
    last_frame: str = ""

    def rows(self) -> list[tuple[str, str, int, int, bool, str]]:
        return self.table


def test_demo_render_without_terminal_prints_plain_frames_only_on_change(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without a terminal: a plain frame per change, none when nothing changed, no escapes."""
    demo = _FakeDemo([("conn_0123456789ab", "user0@example.com", 4, 3, False, "-")])
    _render(cast(Demo, demo), 1.0, None)
    _render(cast(Demo, demo), 2.0, None)
    demo.table = [("conn_0123456789ab", "user0@example.com", 4, 4, True, "ok +1 ~0 -0")]
    demo.log.append("  3.0 s  Ada Lovelace: delete an event type")
    _render(cast(Demo, demo), 3.0, None)
    out = capsys.readouterr().out
    assert ESCAPE not in out
    assert out.count("--- ") == 2
    assert "--- " + "  2.0 s" not in out
    frames = out.split("--- ")[1:]
    assert "syncing" in frames[0]
    assert "in sync" in frames[1]
    assert "ok +1 ~0 -0" in frames[1]
    assert "Ada Lovelace: delete an event type" in frames[1]


def test_demo_view_on_a_terminal_shows_every_connection_and_the_edits(clean_env: None) -> None:
    """The live view: title, one row per connection with its counts and state, the last edits."""
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=100, color_system="standard")
    rows = [
        ("conn_0123456789ab", "user0@example.com", 4, 4, True, "ok +0 ~1 -0"),
        ("conn_ba9876543210", "user1@example.com", 5, 4, False, "-"),
    ]
    log = [f"{i:5.1f} s  edit {i}" for i in range(8)]
    console.print(_view(rows, log, 12.5))
    drawn = stream.getvalue()
    assert "\x1b[32min sync" in drawn
    assert "\x1b[33msyncing" in drawn
    plain = _SGR.sub("", drawn)
    assert "closesync demo -  12.5 s" in plain
    row = next(line for line in plain.splitlines() if "conn_0123456789ab" in line)
    assert row.split() == [
        "conn_0123456789ab", "user0@example.com", "4", "4", "in", "sync", "ok", "+0", "~1", "-0",
    ]  # fmt: skip
    # Only the last six edits are shown.
    assert "edit 1" not in plain
    assert all(f"edit {i}" in plain for i in range(2, 8))
