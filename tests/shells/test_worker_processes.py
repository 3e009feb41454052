"""How `closesync worker` shares its runs at once between worker processes (pure)."""

from __future__ import annotations

import pytest

from closesync.cli.worker_processes import Split, split


@pytest.mark.parametrize(
    ("concurrency", "processes", "cores", "expected"),
    [
        (32, 0, 2, Split(2, 16)),  # the default on a 2-core host: both cores, 32 runs in all
        (64, 0, 1, Split(1, 64)),
        (65, 0, 2, Split(2, 33)),  # shares rounded up: never fewer runs at once than asked
        (1, 0, 8, Split(1, 1)),  # one run at a time is one process
        (3, 0, 8, Split(3, 1)),
        (64, 4, 2, Split(4, 16)),  # an explicit count wins over the cores
        (64, 1, 8, Split(1, 64)),
    ],
)
def test_split_shares_runs_between_processes(
    concurrency: int, processes: int, cores: int, expected: Split
) -> None:
    """One process per core by default, never more processes than runs, shares rounded up."""
    assert split(concurrency, processes, cores) == expected


def test_split_without_runs_raises_naming_concurrency() -> None:
    """Zero runs at once is refused, naming what was wrong."""
    with pytest.raises(ValueError, match="concurrency must be at least 1, not 0"):
        split(0, 0, 2)
