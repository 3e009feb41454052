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


def polls_webhook_connections(expression: str, webhooks_expression: str, slot: str) -> bool:
    """Whether the tick `slot` of `expression` (SYNC_CRON) also polls the connections whose
    webhooks are active: it does when SYNC_CRON_WITH_WEBHOOKS fired since the tick before it,
    i.e. it is the first tick at or after each of that cron's fires. Neither cron need divide
    the other; the rarer poll is at most one SYNC_CRON interval late."""
    fire = datetime.fromisoformat(slot)
    before = previous_fire(cron_trigger(expression), fire - timedelta(seconds=1))
    return previous_fire(cron_trigger(webhooks_expression), fire) > before


def webhook_run_deadline(
    expression: str,
    webhooks_expression: str,
    last: float,
    fraction: float,
    visibility_timeout: float,
) -> float:
    """`run_deadline` of a connection whose webhooks are active: the window's end of the first
    SYNC_CRON tick at or after the next SYNC_CRON_WITH_WEBHOOKS fire after `last`. Later `last`
    never gives an earlier deadline."""
    rare = next_fire(cron_trigger(webhooks_expression), datetime.fromtimestamp(last, UTC))
    # run_deadline looks strictly after its `last`: a tick at the rare fire itself counts.
    return run_deadline(expression, rare.timestamp() - 0.001, fraction, visibility_timeout)
