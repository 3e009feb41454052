"""Schedule arithmetic: cron expressions, tick slots and the fan-out spread. Pure functions.

A tick's identity is its *slot*: the scheduled fire time as an ISO string in UTC. The scheduler,
a system cron running `closesync sync --all --enqueue`, and a redelivered `sync_all` all name the
same tick by the same slot, so a Redis SET NX on it makes every second enqueue a no-op.

Cron expressions are UTC. Five fields are standard crontab (minute hour day month weekday, where
weekday 0 and 7 are Sunday, as in crontab, not APScheduler 3's Monday-is-0). Six fields put
*seconds first* (`*/2 * * * * *` = every two seconds): meant for tests and demos that cannot
wait a minute per tick.

Nothing here reads a clock, Redis or Celery: callers pass `now`.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta

from apscheduler.triggers.cron import CronTrigger

from closesync.core.errors import ConfigError

_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")
# How far back `previous_fire` looks before giving up: a cron that never fired within about a
# year (e.g. 30 February) is a configuration mistake.
_LOOKBACK_LIMIT = timedelta(days=400)


def _weekday_names(field: str) -> str:
    """Crontab weekday numbers (0/7 = Sunday) as names, which APScheduler reads unambiguously."""

    def part(text: str) -> str:
        body, slash, step = text.partition("/")
        body = re.sub(r"\d+", lambda m: _weekday(m.group()), body)
        return body + slash + step

    return ",".join(part(piece) for piece in field.split(","))


def _weekday(number: str) -> str:
    value = int(number)
    if value > 7:
        raise ValueError(f"weekday {value} is not 0-7")
    return _WEEKDAYS[value]


def cron_trigger(expression: str) -> CronTrigger:
    """A UTC CronTrigger for a 5-field crontab or a 6-field seconds-first expression."""
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ConfigError(
            f"cron expression {expression!r} needs 5 fields (minute hour day month weekday) "
            "or 6 (seconds first)"
        )
    second, minute, hour, day, month, weekday = fields
    try:
        return CronTrigger(
            second=second,
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=_weekday_names(weekday),
            timezone=UTC,
        )
    except ValueError as error:
        raise ConfigError(f"cron expression {expression!r} is not valid: {error}") from None


def next_fire(trigger: CronTrigger, after: datetime) -> datetime:
    """The first fire time strictly after `after`."""
    fire: datetime | None = trigger.get_next_fire_time(None, after + timedelta(microseconds=1))
    if fire is None:
        raise ConfigError("the cron expression never fires again")
    return fire


def previous_fire(trigger: CronTrigger, now: datetime) -> datetime:
    """The most recent fire time at or before `now`: the slot of the current tick."""
    back = timedelta(seconds=1)
    while back <= _LOOKBACK_LIMIT:
        fire: datetime | None = trigger.get_next_fire_time(None, now - back)
        if fire is not None and fire <= now:
            while (following := next_fire(trigger, fire)) <= now:
                fire = following
            return fire
        back *= 2
    raise ConfigError("the cron expression has not fired within a year")


def slot_of(fire_time: datetime) -> str:
    """A tick's identity: its fire time in UTC, ISO 8601, whole seconds."""
    return fire_time.astimezone(UTC).replace(microsecond=0).isoformat()


def current_slot(expression: str, now: datetime) -> str:
    """The slot of the most recent tick of `expression` at `now`."""
    return slot_of(previous_fire(cron_trigger(expression), now))


def interval_after(expression: str, slot: str) -> float:
    """Seconds from the tick `slot` to the tick after it (cron gaps need not be equal)."""
    fire = datetime.fromisoformat(slot)
    return (next_fire(cron_trigger(expression), fire) - fire).total_seconds()


def spread_window(interval: float, fraction: float, visibility_timeout: float) -> float:
    """Seconds over which one tick's runs are spread.

    At most `fraction` of the interval (decisions.md: at most half), so every connection runs
    once per tick; and at most half the broker's visibility timeout (30 min by default), as
    before the spread moved from countdown tasks (which the Redis broker redelivers when held
    longer than that) to a schedule in Redis: a daily drift check still ends within that
    time of the hour its cron picked.
    """
    return max(0.0, min(interval * fraction, visibility_timeout / 2))


def spread_offset(connection_id: str, window: float) -> float:
    """Offset (seconds, < `window`) of a connection's run within its tick.

    A hash of the id, not a random draw: a connection keeps the same place in every tick, so its
    runs stay one interval apart, and any process computes the same offset.
    """
    if window <= 0:
        return 0.0
    digest = hashlib.sha256(connection_id.encode()).digest()
    share = int.from_bytes(digest[:8], "big") / 2**64
    return round(share * window, 3)


def tick_ttl(interval: float) -> int:
    """Seconds a tick claim lives: past any redelivery of the tick, and at least a minute."""
    return max(60, int(interval * 2))


def run_deadline(expression: str, last: float, fraction: float, visibility_timeout: float) -> float:
    """Unix time by which a connection last run at `last` (Unix time) should have run again.

    The first tick after `last` runs every active connection within its spread window, so a
    connection not run by the window's end is behind schedule (`closesync status` shows the
    lag). Later `last` never gives an earlier deadline, as `core.status.summarize` needs: one
    tick's window ends before the next tick fires (the spread fraction is at most 1).
    """
    trigger = cron_trigger(expression)
    fire = next_fire(trigger, datetime.fromtimestamp(last, UTC))
    interval = (next_fire(trigger, fire) - fire).total_seconds()
    return fire.timestamp() + spread_window(interval, fraction, visibility_timeout)


# Ticks of one SYNC_CRON_WITH_WEBHOOKS interval past which the crons are a mistake (every second
# for more than a day): `webhook_poll_turn` walks them.
_MAX_TICKS_PER_WEBHOOK_INTERVAL = 100_000


def webhook_poll_turn(expression: str, webhooks_expression: str, slot: str) -> tuple[int, int]:
    """(turn, ticks): the tick `slot` of `expression` (SYNC_CRON) is turn `turn` (0-based) of
    the `ticks` SYNC_CRON ticks within the SYNC_CRON_WITH_WEBHOOKS interval that holds it.

    A connection whose webhooks are active is polled at one tick per such interval, its own
    (`webhook_poll_due`), so that the hourly poll of the whole fleet is spread over the hour's
    ticks instead of landing on one. A webhooks cron more frequent than SYNC_CRON gives every
    interval one tick (or the tick's own): (0, 1), everyone polled at every tick.
    """
    sync, rare = cron_trigger(expression), cron_trigger(webhooks_expression)
    fire = datetime.fromisoformat(slot)
    start = previous_fire(rare, fire)
    end = next_fire(rare, start)
    tick = next_fire(sync, start - timedelta(microseconds=1))  # the first at or after start
    turn = ticks = 0
    while tick < end:
        if tick < fire:
            turn += 1
        ticks += 1
        if ticks > _MAX_TICKS_PER_WEBHOOK_INTERVAL:
            raise ConfigError(
                f"SYNC_CRON {expression!r} fires more than {_MAX_TICKS_PER_WEBHOOK_INTERVAL} times "
                f"per SYNC_CRON_WITH_WEBHOOKS {webhooks_expression!r} interval"
            )
        tick = next_fire(sync, tick)
    return turn, max(ticks, 1)


def webhook_poll_due(connection_id: str, turn: int, ticks: int) -> bool:
    """Whether a connection whose webhooks are active is polled at turn `turn` of `ticks`.

    Its place is a stable hash of its id as a fraction of the interval (not modulo `ticks`): a
    connection keeps about the same point in every interval even when two intervals hold
    different numbers of ticks (crons that do not divide each other), so it goes unpolled at
    most one interval plus one tick. The hash is salted apart from `spread_offset`'s, so the
    connections of one turn still spread over the whole of their tick's window.
    """
    if ticks <= 1:
        return True
    digest = hashlib.sha256(b"webhook-poll:" + connection_id.encode()).digest()
    share = int.from_bytes(digest[:8], "big") / 2**64
    return min(ticks - 1, int(share * ticks)) == turn


def webhook_run_deadline(
    expression: str,
    webhooks_expression: str,
    last: float,
    fraction: float,
    visibility_timeout: float,
) -> float:
    """`run_deadline` of a connection whose webhooks are active: it is polled once per
    SYNC_CRON_WITH_WEBHOOKS interval at its own tick, so after a run at `last` the next poll
    falls within the interval that starts at the next fire of that cron: by the window's end of
    that interval's last SYNC_CRON tick. Later `last` never gives an earlier deadline."""
    rare = cron_trigger(webhooks_expression)
    following = next_fire(rare, next_fire(rare, datetime.fromtimestamp(last, UTC)))
    sync = cron_trigger(expression)
    tick = previous_fire(sync, following - timedelta(microseconds=1))
    interval = (next_fire(sync, tick) - tick).total_seconds()
    return tick.timestamp() + spread_window(interval, fraction, visibility_timeout)
