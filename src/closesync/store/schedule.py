"""A tick's spread, held in Redis: when each connection's run of the tick is due.

The fan-out does not publish a tick's runs with countdowns: the Redis transport hands a countdown
task to a worker at once, which holds it in memory, unacknowledged, until it is due (10,000
connections = 10,000 held messages, each redelivered if held past the visibility timeout). It
writes the due times into a sorted set instead (`{p}:schedule:{kind}`), and a drain task
publishes the runs that are due, a batch at a time, then hands over to the next drain (see
`closesync.worker.tasks`). The key layout is in `closesync.store.keys`.

A connection is in a schedule once (ZADD LT: a run still waiting from the last tick keeps its
earlier time), and two drains racing over the same entries are harmless: the sync marker
(`SyncState.ask_syncs`) lets one task through per connection.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import redis

from closesync.store.client import guard
from closesync.store.keys import Keys, as_text, watched

# Entries per ZADD: a fleet of 100,000 connections is 100 commands in one round trip, none of
# them big enough to hold Redis up.
_ADD_CHUNK = 1000


class Schedule:
    """The due times of a kind of tick (`sync`, `drift`), and who drains them next."""

    def __init__(self, redis: redis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    @guard("scheduling a tick's runs")
    def add(self, kind: str, due: Mapping[str, float]) -> None:
        """Schedule each connection id at its due time (epoch seconds), keeping earlier ones."""
        if not due:
            return
        items = list(due.items())
        key = self.keys.schedule(kind)
        with self.redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(items), _ADD_CHUNK):
                pipe.zadd(key, dict(items[start : start + _ADD_CHUNK]), lt=True)
            pipe.execute()

    @guard("reading the due runs")
    def due(self, kind: str, now: float, limit: int) -> list[str]:
        """Up to `limit` connection ids due at `now`, earliest first."""
        raw = self.redis.zrangebyscore(self.keys.schedule(kind), "-inf", now, start=0, num=limit)
        return [as_text(member) for member in raw]  # type: ignore[arg-type]  # no WITHSCORES

    @guard("removing published runs")
    def remove(self, kind: str, conn_ids: Iterable[str]) -> None:
        ids = list(conn_ids)
        if ids:
            self.redis.zrem(self.keys.schedule(kind), *ids)

    @guard("reading the next due run")
    def next_due(self, kind: str) -> float | None:
        """When the earliest entry is due; None when the schedule is empty."""
        first = self.redis.zrange(self.keys.schedule(kind), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    @guard("counting the scheduled runs")
    def size(self, kind: str) -> int:
        return int(self.redis.zcard(self.keys.schedule(kind)))

    @guard("claiming a webhook fan-out")
    def claim_fan_out(self, ref: str, event_type_uuid: str, ttl_seconds: float) -> bool:
        """Whether this call may publish the fan-out of organization `ref` for a team type no
        connection holds: one per (organization, type) within `ttl_seconds` (a burst's first)."""
        key = self.keys.webhook_fan_out(ref, event_type_uuid)
        ms = max(1, int(ttl_seconds * 1000))
        return bool(self.redis.set(key, "1", nx=True, px=ms))

    @guard("releasing a webhook fan-out claim")
    def release_fan_out(self, ref: str, event_type_uuid: str) -> None:
        """The fan-out could not be published: the next delivery may publish it."""
        self.redis.delete(self.keys.webhook_fan_out(ref, event_type_uuid))

    @guard("handing over the drain")
    def pass_drain(self, kind: str, drain_id: str, ttl_seconds: float) -> bool:
        """Whether `drain_id` may be the next drain: no other chain of drains has the turn.

        The turn lapses after `ttl_seconds`, so a chain that died (its worker lost with the
        drain message) does not stop the next tick's fan-out from starting another.
        """
        ms = max(1, int(ttl_seconds * 1000))
        return bool(self.redis.set(self.keys.schedule_drain(kind), drain_id, nx=True, px=ms))

    @guard("taking the drain's turn")
    def take_drain(self, kind: str, drain_id: str) -> None:
        """The drain `drain_id` runs: its turn ends, so that it may hand the next one over."""
        key = self.keys.schedule_drain(kind)

        def apply(pipe: redis.client.Pipeline) -> None:
            holder = pipe.get(key)
            pipe.multi()
            if holder is not None and as_text(holder) == drain_id:
                pipe.delete(key)

        watched(self.redis, key, apply)
