"""Runs one connection: list Calendly, map, plan, write to Close, record. The sync's one shell.

The decisions live in `mapping` and `plan` (pure); this module does the I/O around them in the
order that keeps the promises of the sync:

- nothing is written twice: a fingerprint is recorded only after Close accepted the write, and a
  run whose desired links match the records writes nothing to Close;
- nothing is lost: a rate limit or transient error stops the run for a retry, and what was
  written before it stays recorded; a 400 on one link is recorded against it and the rest go on;
- nothing is deleted on doubt: deletions follow only a complete listing (see `plan`).

One run per connection at a time: the run lock (renewed while the run lasts) is checked before
every write, so a run that lost its lock stops writing. A connection being removed carries a
removal mark (`connections remove`): a run checks it before it starts, once it holds the lock, and
before every write, and stops (SKIPPED, failure "removed", no report kept) when it finds it. The
engine does not decide retries: it records what happened in the `RunReport` and the caller (CLI
or Celery task) decides.

A grant refused after its one refresh marks what failed, naming the side: the connection itself
(needs_reauth) for its own grant, or, for a Calendly organization's shared grant, that shared
credential, once, and every connection reading it is skipped until the organization reconnects
(which clears the mark: they are all back at once). A Close-side failure is always the
connection's own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from pydantic import ValidationError

from closesync import meters
from closesync.core.connection import (
    Connection,
    ConnectionState,
    own_grant_refused,
    shared_grant_refused,
    side_of_api,
)
from closesync.core.errors import (
    AuthFailed,
    CloseSyncError,
    ConnectionRemoved,
    DeadlineReached,
    Forbidden,
    RateLimited,
    Rejected,
    RetryableError,
    RunLocked,
    StoreUnavailable,
)
from closesync.core.report import Outcome, RunMode, RunReport
from closesync.store.connections import ConnectionStore
from closesync.store.sync_state import SyncState
from closesync.sync.parts import Clients, Deadline, EngineConfig, LockHandle, Progress
from closesync.sync.run import ConnectionRun

log = logging.getLogger(__name__)


class SyncEngine:
    """Runs connections; holds no state between runs."""

    def __init__(
        self,
        *,
        config: EngineConfig,
        connections: ConnectionStore,
        state: SyncState,
        run_lock: Callable[[str, int], AbstractContextManager[LockHandle]],
        clients_for: Callable[[Connection], Clients],
        clock: Callable[[], float] = time.time,
        shared_clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.connections = connections
        self.state = state
        self.run_lock = run_lock
        self.clients_for = clients_for
        # `clock` times this process's reports; `shared_clock` (Redis's, from the services)
        # times the listings, whose misses another worker may confirm (run.py).
        self.clock = clock
        self.shared_clock = shared_clock or clock

    def run(
        self,
        connection_id: str,
        *,
        mode: RunMode = RunMode.SYNC,
        dry_run: bool = False,
        allow_mass_delete: bool = False,
        progress: Progress | None = None,
        deadline: Deadline | None = None,
    ) -> RunReport:
        """Run one connection once and return its report (kept unless a dry run).

        Past `deadline` the run stops before its next step (failure "deadline"), with what it
        wrote recorded, for the caller to resume.

        Every closesync error of the run (API, Redis, decryption, stored state that no longer
        parses) ends up in the report as a failure, never raised; only an error that prevents
        even reading the connection or storing the report is raised.

        Every concluded report is counted (`closesync.meters.observe_run`): outcome, duration
        and the links written, also when the run was interrupted (a soft time limit, a bug) and
        the error is raised: its FAILED report and what it wrote must show in the metrics too.
        """
        report = RunReport(
            connection_id=connection_id, mode=mode, dry_run=dry_run, started_at=self.clock()
        )
        try:
            return self._run(
                report,
                mode=mode,
                dry_run=dry_run,
                allow_mass_delete=allow_mass_delete,
                progress=progress,
                deadline=deadline,
            )
        finally:
            # Not concluded (the record could not even be read): nothing ran, nothing to count.
            if report.finished_at is not None:
                meters.observe_run(report)

    def _run(
        self,
        report: RunReport,
        *,
        mode: RunMode,
        dry_run: bool,
        allow_mass_delete: bool,
        progress: Progress | None,
        deadline: Deadline | None,
    ) -> RunReport:
        connection_id = report.connection_id
        # Before the record: once a removal erased it, `get` would raise ConnectionNotFound.
        if self.state.is_removed(connection_id):
            return self._removed(report)
        connection = self.connections.get(connection_id)
        why_not = self._why_not_run(connection)
        if why_not is not None:
            return self._skip(report, why_not)
        if dry_run:
            run = ConnectionRun(self, connection, report, None, allow_mass_delete, progress)
            return self._conclude(connection, report, run, run.dry_run, keep=False)
        for attempt in (1, 2):
            try:
                with self.run_lock(connection_id, self.config.run_lock_ttl) as lock:
                    if self.state.is_removed(connection_id):
                        # Marked while we waited for the lock: the remover may have taken it
                        # and let it go already. Released at once, so no lock key is left.
                        return self._removed(report)
                    if attempt == 2:
                        # Our own request below: we are the run it asked for.
                        self.state.pop_rerun(connection_id)
                    # Read again under the lock: a reconnect while we waited (another Calendly
                    # user, new grants) must not be run with the record read before it.
                    connection = self.connections.get(connection_id)
                    why_not = self._why_not_run(connection)
                    if why_not is not None:
                        return self._skip(report, why_not)
                    run = ConnectionRun(
                        self, connection, report, lock, allow_mass_delete, progress, deadline
                    )
                    return self._conclude(connection, report, run, run.execute, keep=True)
            except RunLocked:
                if attempt == 1:
                    # The run in progress runs once more when it ends (see the Celery task).
                    # Its holder may have ended just before the request landed, finding none:
                    # so try the lock once more before leaving it the request.
                    try:
                        self.state.request_rerun(connection_id)
                    except ConnectionRemoved:
                        # The holder is `connections remove`: nothing is left to run.
                        return self._removed(report)
        report.failure = "locked"
        return self._skip(report, "another run of this connection is in progress")

    def _why_not_run(self, connection: Connection) -> str | None:
        """Why the connection is not to be run now (paused, a grant refused), or None."""
        if connection.state is not ConnectionState.ACTIVE:
            return f"connection is {connection.state.value}; not synced"
        ref = connection.calendly_grant_ref
        refused = self.connections.shared_refused(ref) if ref is not None else None
        if refused is not None:
            # Not tried again: every run would spend a refresh on a grant Calendly refused.
            return f"needs_reauth: {refused}"
        return None

    def _removed(self, report: RunReport) -> RunReport:
        """The connection is being removed: the run writes nothing, and leaves no report."""
        report.failure = "removed"
        log.info(
            "run skipped: the connection is being removed",
            extra={"connection_id": report.connection_id, "run_id": report.run_id},
        )
        return self._skip(report, "the connection is being removed; not synced")

    def _skip(self, report: RunReport, why: str) -> RunReport:
        report.outcome = Outcome.SKIPPED
        report.errors.append(why)
        report.finished_at = self.clock()
        return report

    def _conclude(
        self,
        connection: Connection,
        report: RunReport,
        run: ConnectionRun,
        body: Callable[[], None],
        *,
        keep: bool,
    ) -> RunReport:
        try:
            # Before any call: which Calendly user to read comes from the public record.
            self.connections.check_calendly_user(connection)
            body()
        except ConnectionRemoved:
            # Marked during the run: it stopped before its next write; the remover finishes.
            keep = False
            self._removed(report)
        except (CloseSyncError, ValidationError) as error:
            self._fail(connection, report, error, run.calendly_grant_ref())
        except BaseException as error:
            # A time limit, an interruption or a bug: the report must not say "ok".
            report.outcome = Outcome.FAILED
            report.failure = "error"
            report.errors.append(f"run interrupted: {type(error).__name__}")
            raise
        finally:
            report.api_calls = run.api_calls()
            report.finished_at = self.clock()
            if report.failed and report.outcome is Outcome.OK:
                report.outcome = Outcome.PARTIAL
            if keep:
                try:
                    self.state.push_report(connection.id, report, self.config.reports_kept)
                except ConnectionRemoved:
                    # Marked after the last write: the report would bring a key of it back.
                    self._removed(report)
        if report.failure == "removed":
            return report
        log.info(
            "run finished: %s",
            report.outcome.value,
            extra={
                "connection_id": connection.id,
                "run_id": report.run_id,
                "mode": report.mode.value,
                # "created" would clash with LogRecord.created (logging raises KeyError).
                "links_created": report.created,
                "updated": report.updated,
                "deleted": report.deleted,
                "unchanged": report.unchanged,
                "failed": len(report.failed),
                "held": len(report.held_deletions),
            },
        )
        return report

    def _fail(
        self, connection: Connection, report: RunReport, error: Exception, ref: str | None
    ) -> None:
        """Record the failure; `ref`: the shared Calendly grant the run was using, if any."""
        report.outcome = Outcome.FAILED
        report.errors.append(
            f"stored state could not be read: {error.error_count()} invalid field(s)"
            if isinstance(error, ValidationError)
            else str(error)
        )
        report.failure = failure_kind(error)
        if isinstance(error, RateLimited):
            report.retry_after = error.wait_seconds
        if isinstance(error, AuthFailed) and not report.dry_run:
            # Reached only after one refresh was tried (or none was possible): someone must
            # authorize again; what failed leaves the schedule until then.
            self._needs_reauth(connection, error, ref)
        log.warning(
            "run failed: %s",
            error,
            extra={"connection_id": connection.id, "run_id": report.run_id},
        )

    def _needs_reauth(self, connection: Connection, error: AuthFailed, ref: str | None) -> None:
        """Mark the grant that failed: the shared organization credential `ref` (the one the
        run's Calendly side used, which a reconnect may have changed since the run began), or
        this connection."""
        side = side_of_api(error.api)
        if side == "calendly" and ref is not None:
            # The organization's grant, not this user's: one mark for all its connections.
            if self.connections.mark_shared_refused(ref, shared_grant_refused(ref, str(error))):
                log.warning(
                    "the shared Calendly credential %s was refused; its connections wait",
                    ref,
                    extra={"connection_id": connection.id},
                )
            return
        self.connections.set_state(
            connection.id,
            ConnectionState.NEEDS_REAUTH,
            reason=own_grant_refused(side, str(error)),
        )


def failure_kind(error: BaseException) -> str:
    """The retry class of a failure, for the caller that decides on retries."""
    if isinstance(error, RateLimited):
        return "rate_limited"
    if isinstance(error, (RetryableError, StoreUnavailable)):
        return "transient"
    if isinstance(error, AuthFailed):
        return "auth"
    if isinstance(error, Forbidden):
        return "forbidden"
    if isinstance(error, Rejected):
        return "rejected"
    if isinstance(error, RunLocked):
        return "locked"
    if isinstance(error, DeadlineReached):
        return "deadline"
    return "error"
