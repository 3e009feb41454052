"""What closesync knows of each connection's links and runs: records, rejections, held
deletions, reports, sync markers (queued or rerun, `closesync.core.queueing`), backfill progress
and scheduler ticks.

The key layout is in `closesync.store.keys`. Writes for one connection assume the caller holds that
connection's run lock (`closesync.store.locks`). Every write of a connection's state is refused with
ConnectionRemoved once the connection carries its removal mark (`connections remove`): a run that
read the connection before it went must not bring any of its keys back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis

from closesync.core.errors import ConnectionRemoved
from closesync.core.mapping import parse_source_id
from closesync.core.plan import LinkRecord, Misses
from closesync.core.queueing import (
    HOLDER,
    ask_publishes,
    holder_reruns,
    queued_by,
    retry_takes_over,
    start_clears,
)
from closesync.core.report import RunReport
from closesync.store.client import guard
from closesync.store.keys import Fields, Keys, as_text, watched

# Queues writes on a pipeline in MULTI mode; what it returns is ignored.
Queue = Callable[[redis.client.Pipeline], object]

# Seconds a sync marker lives by default; Services sets it to BROKER_VISIBILITY_TIMEOUT.
QUEUED_TTL_SECONDS = 3600
# Connections whose status facts one pipeline reads (`status_facts`): few round trips for a
# fleet (20 for 10,000 connections), while one reply stays a few megabytes at most.
FACTS_BATCH = 500
# Two scripts, each the one-round-trip form of what would otherwise be WATCH, a read and
# MULTI/EXEC (three round trips), run on every steady run: Redis runs a script atomically, so
# each keeps the guarantee of the transaction it replaces. They hold no decision: which marker
# value a sync clears is `closesync.core.queueing`'s, read first.
# Delete KEYS[1] if it still holds ARGV[1]; 1 if deleted.
_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Unless KEYS[1] (the removal mark) exists, push ARGV[1] onto the list KEYS[2] and keep its
# newest ARGV[2]; 1 if pushed, 0 if the connection is being removed.
_PUSH_UNLESS_REMOVED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
return 1
"""
# The one spelling of an empty `errors` in a report's JSON: pydantic writes it compact, and a
# quote inside a JSON string is escaped, so this text appears only as that empty field (the
# other dicts of a report hold strings or numbers, never lists). Reports containing it are
# skipped unparsed when looking for the last error; any other spelling is simply parsed.
_NO_ERRORS = '"errors":[]'


@dataclass(frozen=True)
class HeldDeletions:
    """Deletions the mass-delete guard held back, waiting for `--allow-mass-delete`."""

    source_ids: list[str]
    reason: str | None
    at: float


@dataclass(frozen=True)
class BackfillProgress:
    """How far a backfill got, so an interrupted one can resume from `cursor`."""

    started_at: float
    cursor: str | None = None
    done: int = 0
    total: int | None = None


@dataclass(frozen=True)
class StatusFacts:
    """What `closesync status` shows of one connection's runs, read for many in one batch."""

    last: RunReport | None
    # The newest error among the reports read, and when its run finished.
    last_error: str | None
    last_error_at: float | None
    held: HeldDeletions | None
    backfill: BackfillProgress | None


def _held(raw: str | None) -> HeldDeletions | None:
    if raw is None:
        return None
    data = json.loads(raw)
    return HeldDeletions(list(data["source_ids"]), data["reason"], float(data["at"]))


def _backfill(raw: dict[Any, Any]) -> BackfillProgress | None:
    if not raw:
        return None
    return BackfillProgress(
        started_at=float(raw["started_at"]),
        cursor=as_text(raw.get("cursor") or "") or None,
        done=int(raw.get("done", 0)),
        total=int(raw["total"]) if raw.get("total") else None,
    )


def _facts(reports: list[str], held: str | None, backfill: dict[Any, Any]) -> StatusFacts:
    last = RunReport.model_validate_json(reports[0]) if reports else None
    errored = last if last is not None and last.error else None
    if errored is None:
        errored = next(
            (
                report
                for report in (
                    RunReport.model_validate_json(raw)
                    for raw in reports[1:]
                    if _NO_ERRORS not in raw
                )
                if report.error
            ),
            None,
        )
    return StatusFacts(
        last=last,
        last_error=errored.error if errored else None,
        last_error_at=errored.finished_at if errored else None,
        held=_held(held),
        backfill=_backfill(backfill),
    )


_SUCCEEDED = frozenset({"ok", "partial"})


def _last_success(reports: list[bytes | str]) -> float | None:
    """When the newest successful run of `reports` (newest first) finished, else the start of the
    oldest of them; None when there is none."""
    oldest: float | None = None
    for raw in reports:
        data = json.loads(as_text(raw))
        if data.get("outcome") in _SUCCEEDED and not data.get("dry_run"):
            finished = data.get("finished_at")
            return float(finished if finished is not None else data["started_at"])
        oldest = float(data["started_at"])
    return oldest


class SyncState:
    """Per-connection sync bookkeeping: link records, rejections, holds, reports, flags."""

    def __init__(
        self, redis: redis.Redis, keys: Keys, queued_ttl: int = QUEUED_TTL_SECONDS
    ) -> None:
        self.redis = redis
        self.keys = keys
        # Seconds a sync marker lives: the broker's visibility timeout. A queued task either
        # starts (and clears its marker) or, its worker dead, is delivered again within that
        # time; a marker older than that outlived every delivery of its task (lost, purged, or
        # stuck behind a backlog that long), so the next ask may publish again. A lost task thus
        # holds its connection back at most this long, and a backlog grows by at most one task
        # per connection per this long, not one per tick.
        self.queued_ttl = queued_ttl
        self._delete_if_equal = redis.register_script(_DELETE_IF_EQUAL)
        self._push_unless_removed = redis.register_script(_PUSH_UNLESS_REMOVED)

    # --- the deployment's clock -------------------------------------------------------------------

    @guard("reading Redis's clock")
    def now(self) -> float:
        """Epoch seconds by Redis's clock (TIME), the one clock every worker and host shares.

        A time one worker stores and another compares against (when a listing first missed an
        event type) must not depend on whose clock is off: a worker 15 minutes slow would
        otherwise make the next worker's listing look 15 minutes later.
        """
        seconds, micros = self.redis.time()
        return float(seconds) + float(micros) / 1e6

    # --- the removal mark ------------------------------------------------------------------------

    @guard("reading the removal mark")
    def is_removed(self, conn_id: str) -> bool:
        """Whether the connection is being (or was lately) removed: its runs must not write."""
        return bool(self.redis.exists(self.keys.removed(conn_id)))

    def _unless_removed(self, conn_id: str, queue: Queue) -> None:
        """Apply the writes `queue` puts on the pipeline in one MULTI/EXEC, unless removed.

        The mark is WATCHed: a removal marked between the check and the EXEC aborts the EXEC and
        the retry finds the mark, so no write lands after `connections remove` began. That costs
        two more round trips per write, next to the HTTP call each write follows.
        """
        mark = self.keys.removed(conn_id)

        def apply(pipe: redis.client.Pipeline) -> None:
            if pipe.exists(mark):
                raise ConnectionRemoved(
                    f"connection {conn_id} is being removed: its sync state is not written"
                )
            pipe.multi()
            queue(pipe)

        watched(self.redis, mark, apply)

    # --- link records ---------------------------------------------------------------------------

    @guard("reading link records")
    def records(self, conn_id: str) -> dict[str, LinkRecord]:
        raw = self.redis.hgetall(self.keys.links(conn_id))
        return {as_text(sid): LinkRecord(**json.loads(value)) for sid, value in raw.items()}

    @guard("recording a write")
    def record_write(self, conn_id: str, source_id: str, record: LinkRecord) -> None:
        """Close accepted `record`: remember it, and forget any earlier rejection of the link."""

        holders = self._holders_of(source_id)

        def queue(pipe: redis.client.Pipeline) -> None:
            pipe.hset(self.keys.links(conn_id), source_id, json.dumps(asdict(record)))
            pipe.hdel(self.keys.rejected(conn_id), source_id)
            if holders is not None:
                pipe.sadd(holders, conn_id)

        self._unless_removed(conn_id, queue)

    @guard("forgetting a link")
    def forget(self, conn_id: str, source_id: str) -> None:
        """Close no longer holds the link: drop its record and any refusal of it."""
        holders = self._holders_of(source_id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.keys.links(conn_id), source_id)
            pipe.hdel(self.keys.rejected(conn_id), source_id)
            if holders is not None:
                pipe.srem(holders, conn_id)
            pipe.execute()

    def _holders_of(self, source_id: str) -> str | None:
        """The holders index of the event type a source_id names; None: not closesync's format."""
        parsed = parse_source_id(source_id)
        return None if parsed is None else self.keys.event_type_holders(parsed[1])

    @guard("reading who holds an event type")
    def holders(self, event_type_uuid: str) -> set[str]:
        """The connections holding a link of event type `event_type_uuid` (its connected hosts)."""
        members = self.redis.smembers(self.keys.event_type_holders(event_type_uuid))
        return {as_text(member) for member in members}

    @guard("recording missing counts")
    def set_missing(self, conn_id: str, counts: Mapping[str, Misses]) -> None:
        """Set `missing` (and `missing_since`) of existing records; others are ignored."""
        if not counts:
            return
        key = self.keys.links(conn_id)
        ordered = sorted(counts)
        current = self.redis.hmget(key, ordered)
        updates: Fields = {
            source_id: json.dumps(
                {
                    **json.loads(raw),
                    "missing": counts[source_id].count,
                    "missing_since": counts[source_id].since,
                }
            )
            for source_id, raw in zip(ordered, current, strict=True)
            if raw is not None
        }
        if updates:
            self._unless_removed(conn_id, lambda pipe: pipe.hset(key, mapping=updates))

    @guard("replacing link records")
    def replace_records(self, conn_id: str, records: dict[str, LinkRecord]) -> None:
        """Swap every record at once (backfill rebuilds them from what Close holds)."""
        key = self.keys.links(conn_id)
        encoded: Fields = {sid: json.dumps(asdict(rec)) for sid, rec in records.items()}
        # The caller holds the run lock: no other writer changes the records meanwhile.
        before = {self._holders_of(as_text(sid)) for sid in self.redis.hkeys(key)}
        after = {self._holders_of(sid) for sid in records}
        dropped = sorted(h for h in before - after if h is not None)
        added = sorted(h for h in after if h is not None)

        def queue(pipe: redis.client.Pipeline) -> None:
            pipe.delete(key)
            if encoded:
                pipe.hset(key, mapping=encoded)
            for holders in dropped:
                pipe.srem(holders, conn_id)
            for holders in added:
                pipe.sadd(holders, conn_id)

        self._unless_removed(conn_id, queue)

    # --- rejections -----------------------------------------------------------------------------

    def _rejections(self, conn_id: str) -> dict[str, dict[str, str]]:
        raw = self.redis.hgetall(self.keys.rejected(conn_id))
        return {as_text(sid): json.loads(value) for sid, value in raw.items()}

    @guard("reading rejections")
    def rejected(self, conn_id: str) -> dict[str, str]:
        """source_id -> fingerprint of the payload Close refused."""
        return {sid: entry["fingerprint"] for sid, entry in self._rejections(conn_id).items()}

    @guard("reading rejections")
    def rejected_errors(self, conn_id: str) -> dict[str, str]:
        """source_id -> why Close refused it."""
        return {sid: entry["error"] for sid, entry in self._rejections(conn_id).items()}

    @guard("forgetting rejections")
    def forget_rejections(self, conn_id: str, source_ids: list[str]) -> None:
        """Drop the rejections of these links (a refused deletion of a link desired again)."""
        if source_ids:
            key = self.keys.rejected(conn_id)
            self._unless_removed(conn_id, lambda pipe: pipe.hdel(key, *source_ids))

    @guard("recording a rejection")
    def record_rejection(self, conn_id: str, source_id: str, fingerprint: str, error: str) -> None:
        entry = json.dumps({"fingerprint": fingerprint, "error": error})
        key = self.keys.rejected(conn_id)
        self._unless_removed(conn_id, lambda pipe: pipe.hset(key, source_id, entry))

    # --- held deletions -------------------------------------------------------------------------

    @guard("recording held deletions")
    def set_held(self, conn_id: str, source_ids: list[str], reason: str | None, at: float) -> None:
        """Remember the held deletions; an empty list clears them."""
        if not source_ids:
            self.redis.delete(self.keys.held(conn_id))
            return
        held = json.dumps({"source_ids": source_ids, "reason": reason, "at": at})
        key = self.keys.held(conn_id)
        self._unless_removed(conn_id, lambda pipe: pipe.set(key, held))

    @guard("reading held deletions")
    def held(self, conn_id: str) -> HeldDeletions | None:
        raw = self.redis.get(self.keys.held(conn_id))
        return _held(None if raw is None else as_text(raw))

    # --- reports --------------------------------------------------------------------------------

    @guard("storing a run report")
    def push_report(self, conn_id: str, report: RunReport, keep: int) -> None:
        """Prepend the report and keep only the newest `keep` (refused once removal began)."""
        keys = [self.keys.removed(conn_id), self.keys.reports(conn_id)]
        if not self._push_unless_removed(keys, [report.model_dump_json(), max(keep, 1)]):
            raise ConnectionRemoved(
                f"connection {conn_id} is being removed: its sync state is not written"
            )

    @guard("reading run reports")
    def reports(self, conn_id: str, limit: int = 20) -> list[RunReport]:
        """Newest first."""
        if limit <= 0:
            return []
        raw = self.redis.lrange(self.keys.reports(conn_id), 0, limit - 1)
        return [RunReport.model_validate_json(item) for item in raw]

    @guard("reading the last run report")
    def last_report(self, conn_id: str) -> RunReport | None:
        raw = self.redis.lindex(self.keys.reports(conn_id), 0)
        return None if raw is None else RunReport.model_validate_json(raw)

    # --- the sync marker: at most one queued sync per connection (closesync.core.queueing) -----

    @guard("asking for syncs")
    def ask_syncs(self, asks: Mapping[str, str]) -> list[str]:
        """Ask for a sync of each connection id, by the task id that would run it.

        The ids whose task must now be published, in the order given: the marker names that task.
        Any other ask is coalesced into the task already queued or the rerun of the run in
        progress; a connection being removed is asked nothing. Batched: two round trips for the
        lot, and one transaction more only per stale `holder` marker.
        """
        ids = list(asks)
        if not ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for conn_id in ids:
                pipe.exists(self.keys.removed(conn_id))
                pipe.set(
                    self.keys.queued(conn_id),
                    queued_by(asks[conn_id]),
                    nx=True,
                    ex=self.queued_ttl,
                )
            replies = pipe.execute()
        publish: set[str] = set()
        undo: list[str] = []
        contested: list[str] = []
        for conn_id, removed, taken in zip(ids, replies[::2], replies[1::2], strict=True):
            if removed:
                if taken:
                    undo.append(conn_id)
            elif taken:
                publish.add(conn_id)
            else:
                contested.append(conn_id)
        if undo:
            # Set by us a moment ago (NX), so still ours: a removed connection gets no key back.
            self.redis.delete(*(self.keys.queued(conn_id) for conn_id in undo))
        if contested:
            with self.redis.pipeline(transaction=False) as pipe:
                for conn_id in contested:
                    pipe.get(self.keys.queued(conn_id))
                    pipe.exists(self.keys.run_lock(conn_id))
                seen = pipe.execute()
            for conn_id, marker, locked in zip(contested, seen[::2], seen[1::2], strict=True):
                text = None if marker is None else as_text(marker)
                if ask_publishes(text, bool(locked)) and self._ask_again(conn_id, asks[conn_id]):
                    publish.add(conn_id)
        return [conn_id for conn_id in ids if conn_id in publish]

    def _ask_again(self, conn_id: str, task_id: str) -> bool:
        """The marker was stale (or gone) when looked at: set it for `task_id` if it still is."""
        marker_key = self.keys.queued(conn_id)
        lock_key = self.keys.run_lock(conn_id)

        def apply(pipe: redis.client.Pipeline) -> bool:
            pipe.watch(lock_key)  # type: ignore[no-untyped-call]
            marker = pipe.get(marker_key)
            text = None if marker is None else as_text(marker)
            if not ask_publishes(text, bool(pipe.exists(lock_key))):
                pipe.multi()
                return False
            pipe.multi()
            pipe.set(marker_key, queued_by(task_id), ex=self.queued_ttl)
            return True

        return watched(self.redis, marker_key, apply)

    @guard("withdrawing a sync")
    def withdraw_sync(self, conn_id: str, task_id: str) -> None:
        """The task `task_id` could not be published after all: let the next ask publish."""
        self._clear_if(conn_id, lambda marker: start_clears(marker, task_id))

    @guard("starting a sync")
    def sync_started(self, conn_id: str, task_id: str) -> None:
        """The task `task_id` starts: an ask from now on wants a run after this one."""
        self._clear_if(conn_id, lambda marker: start_clears(marker, task_id))

    @guard("re-queueing a sync")
    def requeue_sync(self, conn_id: str, task_id: str) -> bool:
        """The task `task_id` is about to be retried: whether it now owes the next sync.

        False when another task is queued for the connection: that one runs it instead.
        """
        key = self.keys.queued(conn_id)

        def apply(pipe: redis.client.Pipeline) -> bool:
            marker = pipe.get(key)
            owes = retry_takes_over(None if marker is None else as_text(marker), task_id)
            pipe.multi()
            if owes:
                pipe.set(key, queued_by(task_id), ex=self.queued_ttl)
            return owes

        return watched(self.redis, key, apply)

    @guard("reading the sync state of connections")
    def status_facts(self, conn_ids: Sequence[str], *, depth: int) -> list[StatusFacts]:
        """Each connection's last report, last error (within its newest `depth` reports), held
        deletions and backfill progress, in the order of `conn_ids`.

        Read in pipelines of FACTS_BATCH connections (an LRANGE and an HGETALL each, one MGET
        of their held deletions), not three round trips per connection: what makes `closesync
        status` take seconds for 10,000 of them. Not a transaction: each connection's facts are
        as consistent as reading them one by one.
        """
        found: list[StatusFacts] = []
        for start in range(0, len(conn_ids), FACTS_BATCH):
            batch = conn_ids[start : start + FACTS_BATCH]
            with self.redis.pipeline(transaction=False) as pipe:
                for conn_id in batch:
                    pipe.lrange(self.keys.reports(conn_id), 0, max(depth, 1) - 1)
                for conn_id in batch:
                    pipe.hgetall(self.keys.backfill(conn_id))
                pipe.mget([self.keys.held(conn_id) for conn_id in batch])
                replies = pipe.execute()
            count = len(batch)
            reports, backfills, held = replies[:count], replies[count : 2 * count], replies[-1]
            for index in range(count):
                texts = [as_text(raw) for raw in reports[index]]
                raw_held = held[index]
                found.append(
                    _facts(texts, None if raw_held is None else as_text(raw_held), backfills[index])
                )
        return found

    @guard("reading when connections last synced")
    def last_synced(self, conn_ids: Sequence[str], *, depth: int) -> list[float | None]:
        """For each of `conn_ids`, when its last successful run (ok or partial) finished, looked
        for among its newest `depth` reports, in pipelines of FACTS_BATCH connections.

        A connection none of whose `depth` newest runs succeeded gets the start of the oldest of
        them: it has not synced since at least then, a lower bound of its lag. None: no report.
        Each report is read as plain JSON (two fields), not as a RunReport, as the metrics do
        this for the whole fleet.
        """
        found: list[float | None] = []
        for start in range(0, len(conn_ids), FACTS_BATCH):
            batch = conn_ids[start : start + FACTS_BATCH]
            with self.redis.pipeline(transaction=False) as pipe:
                for conn_id in batch:
                    pipe.lrange(self.keys.reports(conn_id), 0, max(depth, 1) - 1)
                replies = pipe.execute()
            found.extend(_last_success(reports) for reports in replies)
        return found

    @guard("requesting a rerun")
    def request_rerun(self, conn_id: str) -> None:
        """Ask the run holding the lock to run once more, unless a task is queued already."""
        key = self.keys.queued(conn_id)
        self._unless_removed(
            conn_id, lambda pipe: pipe.set(key, HOLDER, nx=True, ex=self.queued_ttl)
        )

    @guard("reading the rerun request")
    def pop_rerun(self, conn_id: str) -> bool:
        """Whether the holder of the lock was asked to run once more; the request is consumed."""
        return self._clear_if(conn_id, holder_reruns)

    @guard("reading the run lock")
    def lock_held(self, conn_id: str) -> bool:
        """Whether a run of the connection holds its run lock now."""
        return bool(self.redis.exists(self.keys.run_lock(conn_id)))

    def _clear_if(self, conn_id: str, clears: Callable[[str | None], bool]) -> bool:
        """Delete the marker if `clears` says so of its value; whether it was deleted.

        A read, then (only when it clears) a delete of that very value: one round trip when the
        marker stays, two when it goes, where a WATCH transaction took three. A marker changed
        between the two is judged again, as a transaction aborted by its WATCH would be.
        """
        key = self.keys.queued(conn_id)
        while True:
            raw = self.redis.get(key)
            marker = None if raw is None else as_text(raw)
            if marker is None or not clears(marker):
                # Nothing to delete: the read alone is the answer (no key is no marker to clear).
                return marker is None and clears(None)
            if self._delete_if_equal([key], [marker]):
                return True

    # --- backfill progress ----------------------------------------------------------------------

    @guard("reading backfill progress")
    def backfill_progress(self, conn_id: str) -> BackfillProgress | None:
        return _backfill(self.redis.hgetall(self.keys.backfill(conn_id)))

    @guard("recording backfill progress")
    def set_backfill_progress(self, conn_id: str, progress: BackfillProgress) -> None:
        fields: Fields = {
            "started_at": repr(progress.started_at),
            "cursor": progress.cursor or "",
            "done": str(progress.done),
            "total": "" if progress.total is None else str(progress.total),
        }
        key = self.keys.backfill(conn_id)
        self._unless_removed(conn_id, lambda pipe: pipe.hset(key, mapping=fields))

    @guard("clearing backfill progress")
    def clear_backfill(self, conn_id: str) -> None:
        self.redis.delete(self.keys.backfill(conn_id))

    # --- scheduler ticks ------------------------------------------------------------------------

    @guard("claiming a scheduler tick")
    def claim_tick(self, name: str, slot: str, ttl_seconds: int) -> bool:
        """True for exactly one caller per (name, slot) within `ttl_seconds`."""
        return bool(self.redis.set(self.keys.tick(name, slot), "1", nx=True, ex=ttl_seconds))
