"""One run of one connection: the I/O steps between Calendly, the plan and Close, in order.

Split from `engine` so that the engine keeps the outcome handling (report, state, retries' class)
and this keeps the steps. Every write is idempotent (upsert by source_id, delete with 404 counted
as done) and recorded right after Close accepted it, so a run stopped anywhere loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from closesync.apis.calendly.client import EventTypeListing
from closesync.apis.credentials import TokenKeeper, shared_ref_of
from closesync.core.calendly_payloads import event_type_uri, uuid_of
from closesync.core.close_payloads import LinkPayload, SchedulingLink
from closesync.core.connection import Connection
from closesync.core.errors import (
    ApiError,
    AuthFailed,
    ConnectionRemoved,
    GrantRevoked,
    NotFound,
    Rejected,
)
from closesync.core.mapping import (
    MappingOptions,
    fingerprint,
    is_our_link,
    map_event_types,
    parse_source_id,
)
from closesync.core.plan import (
    CONNECTION_ID,
    DELETE_REFUSED,
    FetchVerdict,
    LinkRecord,
    ListingFacts,
    Plan,
    describe,
    fetch_verdict,
    make_plan,
    missing_from_listing,
)
from closesync.core.report import RunMode, RunReport
from closesync.store.sync_state import BackfillProgress
from closesync.sync.parts import Clients, Deadline, LockHandle, LockLost, Progress, RunDeps

T = TypeVar("T")


class ConnectionRun:
    """The steps of one run; built per run, discarded after."""

    def __init__(
        self,
        engine: RunDeps,
        connection: Connection,
        report: RunReport,
        lock: LockHandle | None,
        allow_mass_delete: bool,
        progress: Progress | None,
        deadline: Deadline | None = None,
    ) -> None:
        self.engine = engine
        self.connection = connection
        self.report = report
        self.lock = lock
        self.allow_mass_delete = allow_mass_delete
        self.progress = progress
        self.deadline = deadline
        self._clients: Clients | None = None

    @property
    def clients(self) -> Clients:
        if self._clients is None:
            self._clients = self.engine.clients_for(self.connection)
        return self._clients

    def api_calls(self) -> dict[str, int]:
        return self._clients.api_calls() if self._clients is not None else {}

    def calendly_grant_ref(self) -> str | None:
        """The shared Calendly grant this run's Calendly side last used (None: its own), as its
        keeper last found it stored: a reconnect may have moved it since the run began."""
        if self._clients is None:
            return self.connection.calendly_grant_ref
        return shared_ref_of(self._clients.calendly_tokens.lock_key)

    # -- the two ways to run -----------------------------------------------------------------

    def dry_run(self) -> None:
        """Plan and report, write nothing."""
        plan = self.plan()
        report = self.report
        report.planned = describe(plan)
        report.created, report.updated = len(plan.creates), len(plan.updates)
        report.deleted, report.unchanged = len(plan.deletes), len(plan.unchanged)
        report.kept = dict(plan.kept)
        self._report_held(plan)

    def execute(self) -> None:
        """Plan, then apply the plan to Close and record each accepted write."""
        plan = self.plan()
        if self.report.mode is RunMode.BACKFILL:
            plan = self._resume(plan)
        self.report.planned = describe(plan)
        self.apply(plan)
        if self.report.mode is RunMode.BACKFILL:
            self.engine.state.clear_backfill(self.connection.id)

    def _resume(self, plan: Plan) -> Plan:
        """Skip the forced pushes an interrupted backfill already made, and start the progress.

        Pushes go in source_id order and the cursor is the last one Close accepted, so a link at
        or before the cursor whose payload Close holds unchanged (the records were just rebuilt
        from Close) was pushed by the interrupted run and is not pushed again.
        """
        state, conn_id = self.engine.state, self.connection.id
        progress = state.backfill_progress(conn_id)
        if progress is not None and progress.cursor:
            cursor = progress.cursor
            records = state.records(conn_id)
            done = [
                p.source_id
                for p in plan.updates
                if p.source_id <= cursor
                and (r := records.get(p.source_id)) is not None
                and r.fingerprint == fingerprint(p)
            ]
            plan = replace(
                plan,
                updates=[p for p in plan.updates if p.source_id not in set(done)],
                unchanged=sorted([*plan.unchanged, *done]),
            )
        started = progress.started_at if progress is not None else self.engine.clock()
        # The cursor stays until a later push moves it: a resume stopped before its first push
        # must leave the next one the same skip, or it pushes again what was pushed.
        kept = progress.cursor if progress is not None else None
        state.set_backfill_progress(
            conn_id, BackfillProgress(started_at=started, cursor=kept, done=0, total=plan.writes)
        )
        return plan

    # -- planning ----------------------------------------------------------------------------

    def plan(self) -> Plan:
        """Read Calendly (and, for backfill and drift, Close) and decide every write."""
        connection = self.connection
        self._check_time("listing Calendly")
        # Misses are timed from when the listing began: it is what saw the event type missing.
        # By the clock every worker shares: the next listing may run on another host.
        listed_at = self.engine.shared_clock()
        listing = self._authed(
            self.clients.calendly_tokens,
            lambda: self.clients.calendly.list_event_types(connection.calendly_user_uri),
        )
        result = map_event_types(
            connection.calendly_user_uuid, listing.event_types, self._options()
        )
        for uri, reason in result.unmappable.items():
            self.report.failed[uri] = f"cannot be mapped: {reason}"
        for item in listing.invalid:
            self.report.failed[item.uri or "(event type without uri)"] = (
                f"Calendly returned an unreadable event type: {item.error}"
            )
        facts = _facts(listing, result.unmappable)
        mode = self.report.mode
        rebuilt = mode in (RunMode.BACKFILL, RunMode.DRIFT)
        records = (
            self._records_from_close() if rebuilt else self.engine.state.records(connection.id)
        )
        user_uuid = connection.calendly_user_uuid
        verdicts = {
            source_id: self._verdict(records[source_id])
            for source_id in missing_from_listing(records, result.links, facts, user_uuid)
        }
        return make_plan(
            desired=result.links,
            records=records,
            facts=facts,
            verdicts=verdicts,
            rejected=self.engine.state.rejected(connection.id),
            rule=self.engine.config.mass_delete,
            allow_mass_delete=self.allow_mass_delete,
            force=mode is RunMode.BACKFILL,
            now=listed_at,
            confirm_seconds=self.engine.config.delete_confirm_seconds,
            user_uuid=user_uuid,
        )

    def _options(self) -> MappingOptions:
        base = self.engine.config.mapping
        overrides = self.connection.options
        return MappingOptions(
            include_secret=base.include_secret
            if overrides.include_secret is None
            else overrides.include_secret,
            include_one_off=base.include_one_off
            if overrides.include_one_off is None
            else overrides.include_one_off,
        )

    def _verdict(self, record: LinkRecord) -> FetchVerdict:
        """A direct fetch of an event type missing from a complete listing."""
        uuid = uuid_of(record.event_type_uri)
        self._check_time("fetching an event type")
        try:
            event_type = self._authed(
                self.clients.calendly_tokens, lambda: self.clients.calendly.get_event_type(uuid)
            )
        except NotFound as error:
            # A proxy's 404 page is not Calendly saying the event type is gone.
            return FetchVerdict.GONE if error.from_api else FetchVerdict.UNKNOWN
        except AuthFailed:
            raise
        except ApiError:
            return FetchVerdict.UNKNOWN
        return fetch_verdict(event_type, self.connection.calendly_user_uuid)

    def _records_from_close(self) -> dict[str, LinkRecord]:
        """Rebuild the records from the links Close holds (backfill, drift), and store them."""
        state = self.engine.state
        self._check_time("listing Close")
        links = self._authed(self.clients.close_tokens, self.clients.close.list_scheduling_links)
        previous = state.records(self.connection.id)
        api_url = self.engine.config.calendly_api_url
        records: dict[str, LinkRecord] = {}
        for link in links:
            if not is_our_link(link, self.connection, self.engine.config.close_client_id):
                continue
            assert link.source_id is not None  # noqa: S101 - is_our_link checked it
            parsed = parse_source_id(link.source_id)
            assert parsed is not None  # noqa: S101 - is_our_link checked it
            old = previous.get(link.source_id)
            records[link.source_id] = LinkRecord(
                fingerprint=fingerprint(_payload_of(link)),
                event_type_uri=(old.event_type_uri if old else event_type_uri(api_url, parsed[1])),
                missing=old.missing if old else 0,
                missing_since=old.missing_since if old else None,
            )
        if not self.report.dry_run:
            state.replace_records(self.connection.id, records)
        return records

    # -- applying ----------------------------------------------------------------------------

    def apply(self, plan: Plan) -> None:
        """Write the plan to Close, recording each accepted write at once."""
        state, conn_id, report = self.engine.state, self.connection.id, self.report
        report.unchanged = len(plan.unchanged)
        report.kept = dict(plan.kept)
        self._report_held(plan)
        state.set_held(conn_id, report.held_deletions, report.held_reason, self.engine.clock())
        if plan.missing_counts:
            state.set_missing(conn_id, plan.missing_counts)
        if plan.lifted_refusals:
            state.forget_rejections(conn_id, plan.lifted_refusals)
        for source_id in plan.foreign:
            # Not this connection's link (see plan): only our record of it goes.
            state.forget(conn_id, source_id)
        for source_id in plan.still_rejected:
            report.failed[source_id] = "refused by Close before; not sent again until it changes"
        refusals = state.rejected_errors(conn_id) if plan.refused_deletes else {}
        for source_id in plan.refused_deletes:
            report.failed[source_id] = (
                f"Close refused to delete it before ({refusals.get(source_id, 'no reason kept')}); "
                "not asked again until a backfill"
            )
        total, done = plan.writes, 0
        records = state.records(conn_id) if plan.updates else {}
        upserts = sorted(
            [(p, True) for p in plan.creates] + [(p, False) for p in plan.updates],
            key=lambda item: item[0].source_id,
        )
        for payload, is_new in upserts:
            self._upsert(payload, is_new, records.get(payload.source_id))
            done += 1
            self._progress(done, total, payload.source_id)
        for deletion in plan.deletes:
            self._check_may_write()
            try:
                self._delete(deletion.source_id)
            except Rejected as error:
                # Like a refused upsert: recorded against this link; the other deletions go on.
                state.record_rejection(conn_id, deletion.source_id, DELETE_REFUSED, str(error))
                report.failed[deletion.source_id] = str(error)
            else:
                state.forget(conn_id, deletion.source_id)
                report.deleted += 1
            done += 1
            self._progress(done, total, None)

    def _delete(self, source_id: str) -> None:
        self._authed(self.clients.close_tokens, lambda: self.clients.close.delete_link(source_id))

    def _upsert(self, payload: LinkPayload, is_new: bool, old: LinkRecord | None) -> None:
        self._check_may_write()
        state, conn_id, report = self.engine.state, self.connection.id, self.report
        digest = fingerprint(payload)
        try:
            self._authed(self.clients.close_tokens, lambda: self.clients.close.upsert_link(payload))
        except Rejected as error:
            state.record_rejection(conn_id, payload.source_id, digest, str(error))
            report.failed[payload.source_id] = str(error)
            return
        record = LinkRecord(
            fingerprint=digest,
            event_type_uri=old.event_type_uri if old else _event_type_uri(self, payload.source_id),
            missing=0,
        )
        state.record_write(conn_id, payload.source_id, record)
        if is_new:
            report.created += 1
        else:
            report.updated += 1

    def _report_held(self, plan: Plan) -> None:
        """Put the held deletions in the report, the reason naming this connection's command."""
        self.report.held_deletions = [d.source_id for d in plan.held]
        self.report.held_reason = (
            None
            if plan.held_reason is None
            else plan.held_reason.replace(CONNECTION_ID, self.connection.id)
        )

    def _check_time(self, step: str) -> None:
        """Stop before `step` once the run's deadline (a worker's soft time limit) has passed."""
        if self.deadline is not None:
            self.deadline.check(step)

    def _check_may_write(self) -> None:
        """Stop before a Close write if the lock was lost, the connection is being removed or the
        run's deadline passed.

        The removal mark is read before every write, not only at the start: `connections remove`
        waits for the run lock, and a run that finds the mark stops and lets it go at once.
        """
        self._check_time("its next write")
        if self.lock is not None and not self.lock.held():
            raise LockLost("the run lock was lost; stopping before the next write")
        if self.engine.state.is_removed(self.connection.id):
            raise ConnectionRemoved(
                f"connection {self.connection.id} is being removed; stopping before the next write"
            )

    def _progress(self, done: int, total: int, cursor: str | None) -> None:
        if self.report.mode is RunMode.BACKFILL:
            state, conn_id = self.engine.state, self.connection.id
            current = state.backfill_progress(conn_id)
            state.set_backfill_progress(
                conn_id,
                BackfillProgress(
                    started_at=current.started_at if current else self.engine.clock(),
                    cursor=cursor or (current.cursor if current else None),
                    done=done,
                    total=total,
                ),
            )
        if self.progress is not None:
            self.progress(done, total)

    def _authed(self, keeper: TokenKeeper, call: Callable[[], T]) -> T:
        """Make a call; on a 401, refresh the token once and make it again."""
        before = keeper.current()
        try:
            return call()
        except GrantRevoked:
            raise
        except AuthFailed:
            keeper.refresh(before)
            return call()


def _event_type_uri(run: ConnectionRun, source_id: str) -> str:
    parsed = parse_source_id(source_id)
    return event_type_uri(run.engine.config.calendly_api_url, parsed[1] if parsed else source_id)


def _payload_of(link: SchedulingLink) -> LinkPayload:
    """The payload that would produce `link` as Close holds it (for drift fingerprints)."""
    return LinkPayload(
        source_id=link.source_id or "",
        name=link.name or "",
        url=link.url or "",
        description=link.description,
        source_type=link.source_type or "",
        duration_in_minutes=link.duration_in_minutes,
    )


def _facts(listing: EventTypeListing, unmappable: dict[str, str]) -> ListingFacts:
    listed = {uuid_of(et.uri) for et in listing.event_types}
    doubtful = {uuid_of(uri) for uri in unmappable}
    complete = True
    for item in listing.invalid:
        if item.uri is None:
            # Something unreadable was listed: any missing link could be it. Delete nothing.
            complete = False
        else:
            listed.add(uuid_of(item.uri))
            doubtful.add(uuid_of(item.uri))
    return ListingFacts(
        complete=complete, listed_uuids=frozenset(listed), doubtful_uuids=frozenset(doubtful)
    )
