"""Schedule arithmetic: slots, intervals and the fan-out spread, pinned with literal values."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from closesync.core.errors import ConfigError
from closesync.worker.schedule import (
    current_slot,
    interval_after,
    run_deadline,
    spread_offset,
    spread_window,
    tick_ttl,
)


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def test_current_slot_between_ticks_is_previous_fire_time() -> None:
    """Between two ticks the current slot is the most recent fire time, in ISO UTC."""
    assert current_slot("*/5 * * * *", at(2026, 3, 4, 10, 7, 30)) == "2026-03-04T10:05:00+00:00"


def test_current_slot_on_fire_time_is_that_fire_time() -> None:
    """At a fire time exactly, that fire time is the slot."""
    assert current_slot("*/5 * * * *", at(2026, 3, 4, 10, 5)) == "2026-03-04T10:05:00+00:00"


def test_current_slot_six_fields_reads_seconds_first() -> None:
    """A six-field expression puts seconds first: every two seconds here."""
    now = datetime(2026, 3, 4, 10, 0, 3, 500000, tzinfo=UTC)
    assert current_slot("*/2 * * * * *", now) == "2026-03-04T10:00:02+00:00"


def test_current_slot_daily_cron_looks_back_to_yesterday() -> None:
    """Before today's fire time, the daily slot is yesterday's."""
    assert current_slot("17 3 * * *", at(2026, 3, 4, 2, 0)) == "2026-03-03T03:17:00+00:00"


def test_current_slot_weekday_zero_is_sunday_as_in_crontab() -> None:
    """Weekday 0 is Sunday (crontab), not Monday (APScheduler 3)."""
    # 2026-03-01 is a Sunday; on Wednesday 4 March the last "Sunday 09:00" is 1 March.
    assert current_slot("0 9 * * 0", at(2026, 3, 4, 12, 0)) == "2026-03-01T09:00:00+00:00"
    assert current_slot("0 9 * * 7", at(2026, 3, 4, 12, 0)) == "2026-03-01T09:00:00+00:00"


def test_current_slot_same_tick_from_two_clocks_is_one_slot() -> None:
    """Two enqueuers firing a few seconds apart name the same tick."""
    first = current_slot("*/5 * * * *", at(2026, 3, 4, 10, 5, 0))
    second = current_slot("*/5 * * * *", at(2026, 3, 4, 10, 5, 4))
    assert first == second


def test_cron_trigger_wrong_field_count_raises_config_error() -> None:
    """A cron expression of four fields is a configuration error naming the expected shape."""
    with pytest.raises(ConfigError, match="5 fields"):
        current_slot("*/5 * * *", at(2026, 3, 4))


def test_cron_trigger_bad_value_raises_config_error() -> None:
    """An impossible minute is a configuration error."""
    with pytest.raises(ConfigError, match="not valid"):
        current_slot("99 * * * *", at(2026, 3, 4))


def test_interval_after_regular_cron_is_its_period() -> None:
    """Every five minutes: 300 s between ticks."""
    assert interval_after("*/5 * * * *", "2026-03-04T10:05:00+00:00") == 300.0


def test_interval_after_irregular_cron_is_gap_to_next_fire() -> None:
    """At 09:00 and 17:00: 8 h after the morning tick, 16 h after the evening one."""
    assert interval_after("0 9,17 * * *", "2026-03-04T09:00:00+00:00") == 8 * 3600.0
    assert interval_after("0 9,17 * * *", "2026-03-04T17:00:00+00:00") == 16 * 3600.0


def test_spread_window_half_interval_when_below_visibility() -> None:
    """A 5-minute tick spreads its runs over the first 150 s."""
    assert spread_window(300.0, 0.5, 3600.0) == 150.0


def test_spread_window_capped_by_visibility_timeout() -> None:
    """A daily tick spreads over at most half the visibility timeout, not half a day."""
    assert spread_window(86400.0, 0.5, 3600.0) == 1800.0


def test_spread_window_zero_fraction_runs_all_at_once() -> None:
    """Fraction 0 gives no spread."""
    assert spread_window(300.0, 0.0, 3600.0) == 0.0


def test_spread_offset_hash_of_id_gives_literal_offsets() -> None:
    """The offset is a hash of the connection id: the same in every process and every tick."""
    assert spread_offset("conn_000000000001", 150.0) == 39.104
    assert spread_offset("conn_abcdefabcdef", 150.0) == 103.748


def test_spread_offset_many_ids_stay_inside_window_and_spread() -> None:
    """Offsets fall inside the window and cover it roughly evenly."""
    offsets = [spread_offset(f"conn_{n:012x}", 100.0) for n in range(1000)]
    assert all(0.0 <= o < 100.0 for o in offsets)
    quarters = [sum(1 for o in offsets if q * 25 <= o < (q + 1) * 25) for q in range(4)]
    assert all(200 <= q <= 300 for q in quarters)


def test_spread_offset_empty_window_is_zero() -> None:
    """No window, no countdown."""
    assert spread_offset("conn_000000000001", 0.0) == 0.0


def test_tick_ttl_outlives_two_intervals_and_a_minute() -> None:
    """A claim lives two intervals, and never less than a minute."""
    assert tick_ttl(300.0) == 600
    assert tick_ttl(2.0) == 60


def test_run_deadline_is_the_end_of_the_next_ticks_spread_window() -> None:
    """Run at 10:03:10 with ticks every 5 minutes spread over half: due again by 10:07:30."""
    last = at(2026, 3, 4, 10, 3, 10).timestamp()
    deadline = run_deadline("*/5 * * * *", last, 0.5, 3600)
    assert deadline == at(2026, 3, 4, 10, 7, 30).timestamp()


def test_run_deadline_workdays_cron_waits_for_monday_window_capped_by_visibility() -> None:
    """Run on a Friday of a workdays cron: due on Monday, within half the visibility timeout."""
    friday = at(2026, 3, 6, 9, 0, 5).timestamp()
    deadline = run_deadline("0 9 * * 1-5", friday, 0.5, 3600)
    assert deadline == at(2026, 3, 9, 9, 30).timestamp()
