"""The fleet benchmark's results and the one table they print as.

Kept apart from fleet.py, which starts and drives the processes; this only formats numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PHASES = ("first", "steady")


@dataclass
class Phase:
    """One pass over the fleet by one peer."""

    seconds: float
    reported: int
    total: int
    calendly: int
    close: int
    sandbox_cpu_pct: float
    peer_cpu_pct: float
    timed_out: bool = False
    # Most threads the sandbox had at once (one per open client connection).
    sandbox_threads: int = 0
    # The sequential naive peer is timed on `sample` connections and scaled to `total`.
    sample: int | None = None

    def per_conn(self, calls: int) -> str:
        """Calls per connection, only for a complete pass (a timed-out one was cut midway)."""
        return "-" if self.timed_out else f"{calls / max(self.sample or self.reported, 1):.1f}"


@dataclass
class Row:
    config: str
    n: int
    phases: dict[str, Phase] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    notes: list[str] = field(default_factory=list)


def describe_phase(phase: Phase) -> str:
    if phase.timed_out:
        return f"timed out after {phase.seconds:.0f} s ({phase.reported}/{phase.total} reported)"
    scaled = f" (timed on {phase.sample}, scaled)" if phase.sample else ""
    return (
        f"{phase.seconds:.1f} s{scaled}, sandbox CPU {phase.sandbox_cpu_pct:.0f} %, "
        f"at most {phase.sandbox_threads} sandbox threads"
    )


def _seconds(phase: Phase | None) -> str:
    if phase is None:
        return "-"
    if phase.timed_out:
        return f">{phase.seconds:.0f} (t/o)"
    return f"~{phase.seconds:.1f}" if phase.sample else f"{phase.seconds:.1f}"


def _pair(row: Row, value: Callable[[Phase], Any], fmt: str) -> str:
    parts = [format(value(row.phases[p]), fmt) if p in row.phases else "-" for p in PHASES]
    return " / ".join(parts)


HEADERS = (
    "configuration",
    "N",
    "first run s",
    "steady tick s",
    "Calendly calls/conn",
    "Close calls/conn",
    "peak RSS MB",
    "peer CPU %",
    "sandbox CPU %",
    "closesync time / this",
)


def _ratio(ours: Row | None, row: Row) -> str:
    if ours is None or ours is row:
        return "-"
    parts = []
    for phase in PHASES:
        a, b = ours.phases.get(phase), row.phases.get(phase)
        if a is None or b is None or a.timed_out or b.timed_out or b.seconds <= 0:
            parts.append("-")
        else:
            parts.append(f"{a.seconds / b.seconds:.2f}")
    return " / ".join(parts)


def table(rows: list[Row]) -> list[str]:
    lines: list[list[str]] = [list(HEADERS)]
    for row in rows:
        ours = next((r for r in rows if r.n == row.n and r.config.startswith("closesync")), None)
        lines.append(
            [
                row.config,
                f"{row.n:,}",
                _seconds(row.phases.get("first")),
                _seconds(row.phases.get("steady")),
                _pair(row, lambda p: p.per_conn(p.calendly), ""),
                _pair(row, lambda p: p.per_conn(p.close), ""),
                f"{row.peak_rss_mb:.0f}",
                _pair(row, lambda p: p.peer_cpu_pct, ".0f"),
                _pair(row, lambda p: p.sandbox_cpu_pct, ".0f"),
                _ratio(ours, row),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]
    return [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
