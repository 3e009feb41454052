"""The Celery tasks: thin shells that build the services, call the engine, and judge the report.

Arguments are ids and primitives only. Every task may be delivered twice (late acks): a tick is
claimed once by its slot (`SyncState.claim_tick`), and a second run of a connection either finds
the run lock held (and asks the holder to run once more) or writes nothing new, since the engine
records every write it made. A task of a connection that is being or was removed does nothing: the
engine finds the removal mark before any write, or the connection is gone.

What happens after a run is a pure decision (`verdict`), tested with literal reports:
rate-limited runs come back after the wait the API stated plus jitter; transient failures after a
capped exponential backoff with jitter; anything else (auth, forbidden, rejected data) is not
retried: the engine recorded it, and marked the connection needs_reauth for auth failures. A run
stopped by the soft time limit resumes at most MAX_SOFT_LIMIT_RESUMES times. The threads pool
enforces no Celery time limit, so the task also gives the engine a deadline at
TASK_SOFT_TIME_LIMIT: the run stops between two steps once it passed, and is resumed exactly like
a run the soft limit stopped.

The caps are this module's: the per-connection tasks set Celery's own `max_retries` to None, since
Celery's default (3, counted over every retry of a task) would otherwise end each of them first,
with a MaxRetriesExceededError instead of a decision.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_shutdown, worker_shutdown

from closesync.core.connection import ConnectionState
from closesync.core.errors import CloseSyncError, ConnectionNotFound, StoreUnavailable
from closesync.core.report import Outcome, RunMode, RunReport
from closesync.core.retry import Random, rate_limit_delay, transient_delay
from closesync.sync.parts import Deadline
from closesync.wiring.logs import bind
from closesync.wiring.observability import cron_checkin
from closesync.wiring.services import Services
from closesync.worker import celery_app as names
from closesync.worker.schedule import interval_after, spread_offset, spread_window, tick_ttl

log = logging.getLogger(__name__)

# Celery retries of one task before it gives up until the next tick. Transient: with the 60 s cap
# of retry.transient_delay, 8 retries span about 3 minutes of outage. Rate limits: the API says
# when to come back, so more patience is safe.
MAX_TRANSIENT_RETRIES = 8
MAX_RATE_LIMIT_RETRIES = 16
# Reruns one task does for syncs requested while it ran; more requests wait for the next tick.
MAX_RERUNS = 3
# Seconds before a run stopped by the soft time limit resumes (a backfill resumes where it was).
RESUME_AFTER_SECONDS = 1.0
# Resumes of a run stopped by the soft time limit before the task gives up until the next tick:
# a long backfill resumes where it stopped and needs a few, but a step that always overruns the
# limit (an API answering slower than it) must not loop for ever. Counted in the task's
# `resumes` argument, apart from the other retries.
MAX_SOFT_LIMIT_RESUMES = 3
# A backfill or drift check that found a sync running comes back after this many seconds (the
# holder's rerun would be a plain sync), at most this many times.
LOCKED_RETRY_SECONDS = 15.0
MAX_LOCKED_RETRIES = 20


@dataclass(frozen=True)
class RetryVerdict:
    """What to do after a run: retry after `countdown` seconds, or not."""

    retry: bool
    countdown: float = 0.0
    reason: str = ""


def retry_verdict(report: RunReport, retries: int, rand: Random) -> RetryVerdict:
    """Retry or give up, from the report of a run that was the `retries`-th retry."""
    if report.outcome is Outcome.SKIPPED and report.failure == "locked":
        # A sync asked the holder to run once more; a backfill or drift check must run itself.
        if report.mode is RunMode.SYNC or retries >= MAX_LOCKED_RETRIES:
            return RetryVerdict(False, reason="another run holds the connection")
        return RetryVerdict(True, rate_limit_delay(LOCKED_RETRY_SECONDS, rand), "connection busy")
    if report.outcome is not Outcome.FAILED:
        return RetryVerdict(False, reason=report.outcome.value)
    if report.failure == "rate_limited":
        if retries >= MAX_RATE_LIMIT_RETRIES:
            return RetryVerdict(False, reason="rate limited too often; the next tick tries again")
        wait = report.retry_after if report.retry_after is not None else 1.0
        return RetryVerdict(True, rate_limit_delay(wait, rand), "rate limited")
    if report.failure == "transient":
        if retries >= MAX_TRANSIENT_RETRIES:
            return RetryVerdict(False, reason="transient errors persist; the next tick tries again")
        return RetryVerdict(True, transient_delay(retries, rand), "transient error")
    # auth (connection now needs_reauth), forbidden, rejected, locked, error: a retry would
    # meet the same answer. The report holds the cause for `closesync status`.
    return RetryVerdict(False, reason=report.failure or "failed")


# --- services, one set per worker process ---------------------------------------------------------

_services: Services | None = None
_services_lock = threading.Lock()


def get_services() -> Services:
    """The process's Services, built from the settings on first use (after the pool forked)."""
    global _services  # noqa: PLW0603 - one per process by design; tests inject with use_services
    with _services_lock:
        if _services is None:
            from closesync.settings import load_settings

            _services = Services.build(load_settings())
        return _services


def use_services(services: Services | None) -> None:
    """Make the tasks of this process use `services` (tests; `None` forgets them)."""
    global _services  # noqa: PLW0603
    with _services_lock:
        _services = services


@worker_process_shutdown.connect  # a prefork child stopping
@worker_shutdown.connect  # the worker stopping: the threads pool runs the tasks in it
def close_services(**_: Any) -> None:
    """Close the process's HTTP connections as its worker stops."""
    with _services_lock:
        services = _services
    if services is not None:
        services.close()


# --- fan-out --------------------------------------------------------------------------------------


def fan_out(services: Services, app: Celery, *, tick: str, slot: str, cron: str, task: str) -> int:
    """Claim the tick and enqueue `task` for every active connection, spread over the window.

    A second delivery of the same tick finds the claim taken and enqueues nothing. The claim is
    taken before the fan-out: a worker dying mid-fan-out loses the rest of this tick (the next
    tick runs them) rather than risking a tick fanned out twice.
    """
    settings = services.settings
    interval = interval_after(cron, slot)
    if not services.state.claim_tick(tick, slot, tick_ttl(interval)):
        log.info("tick already fanned out: %s %s", tick, slot, extra={"slot": slot})
        return 0
    window = spread_window(
        interval, settings.sync_spread_fraction, settings.broker_visibility_timeout
    )
    count = 0
    for connection in services.connections.list():
        if connection.state is not ConnectionState.ACTIVE:
            continue
        app.send_task(
            task, args=[connection.id, slot], countdown=spread_offset(connection.id, window)
        )
        count += 1
    log.info(
        "tick %s %s: enqueued %d connections over %.0f s",
        tick,
        slot,
        count,
        window,
        extra={"slot": slot, "connections": count},
    )
    return count


def pair_organizations(services: Services) -> int:
    """Re-read every connected Calendly organization's members and pair waiting Close users.

    Members join Calendly after the Close user authorized; without this daily pass they would
    wait until an admin connects the organization again. A failure is logged, never raised: the
    drift check of the connections that exist must still run.
    """
    from closesync.connect.organizations import Organizations

    organizations = Organizations(services)
    if not organizations.credentials.refs():
        return 0
    try:
        paired = organizations.pair_waiting()
    except CloseSyncError as error:
        log.warning("pairing organization members failed: %s", error)
        return 0
    for connection in paired:
        log.info("paired a waiting Close user", extra={"connection_id": connection.id})
    return len(paired)


# --- running a connection -------------------------------------------------------------------------


def run_connection(
    task: Task[Any, Any], connection_id: str, mode: RunMode, resumes: int = 0
) -> str:
    """Run the engine, rerun once per request that arrived meanwhile, then retry or not.

    `resumes`: how often this task already resumed after the soft time limit.
    """
    services = get_services()
    settings = services.settings
    # Counted from the task's start, as Celery's soft limit is, over its reruns too.
    deadline = Deadline.after(settings.task_soft_time_limit, "TASK_SOFT_TIME_LIMIT")
    engine = services.engine(wait_budget=settings.task_inline_wait_seconds)
    with bind(connection_id=connection_id, task_id=task.request.id):
        try:
            try:
                report = engine.run(connection_id, mode=mode, deadline=deadline)
            except ConnectionNotFound:
                # Removed (its removal mark expired too) or never stored: a queued or
                # redelivered task of it has nothing to do, and is no error.
                log.info("the connection no longer exists: nothing to run")
                return "removed"
            except StoreUnavailable as error:
                # Redis went away before the run could even be recorded: nothing was lost.
                countdown = transient_delay(task.request.retries, random.random)
                log.warning("Redis unavailable; retrying in %.1f s: %s", countdown, error)
                if task.request.retries >= MAX_TRANSIENT_RETRIES:
                    raise
                raise task.retry(countdown=countdown, max_retries=None) from None
            reruns = 0
            # SKIPPED means another run holds the lock: it, not this task, owns the rerun.
            while (
                report.outcome in (Outcome.OK, Outcome.PARTIAL)
                and reruns < MAX_RERUNS
                and services.state.pop_rerun(connection_id)
            ):
                reruns += 1
                log.info("a sync was requested while this run lasted: running once more")
                report = engine.run(connection_id, mode=RunMode.SYNC, deadline=deadline)
        except SoftTimeLimitExceeded:
            # The engine released the lock on the way out and stored the run's report as failed;
            # what was written stays recorded.
            return resume_after_time_limit(task, resumes)
        if report.failure == "deadline":
            # The engine's own soft limit: stopped between steps, report stored, lock released.
            return resume_after_time_limit(task, resumes)
        decision = retry_verdict(report, task.request.retries, random.random)
        if decision.retry:
            log.info(
                "retrying in %.1f s: %s",
                decision.countdown,
                decision.reason,
                extra={"run_id": report.run_id, "retries": task.request.retries},
            )
            raise task.retry(countdown=decision.countdown, max_retries=None)
        if report.outcome is Outcome.FAILED:
            log.warning(
                "not retried (%s): %s",
                decision.reason,
                report.error,
                extra={"run_id": report.run_id},
            )
        return report.outcome.value


def resume_after_time_limit(task: Task[Any, Any], resumes: int) -> str:
    """Resume a run the soft time limit (or the engine's deadline) stopped, a bounded number of
    times; `resumes`: how often this task already resumed."""
    if resumes >= MAX_SOFT_LIMIT_RESUMES:
        log.warning(
            "run stopped by the soft time limit %d times; not resumed: the next tick tries again",
            resumes + 1,
        )
        return Outcome.FAILED.value
    log.warning(
        "run stopped by the soft time limit; resuming shortly (%d of %d)",
        resumes + 1,
        MAX_SOFT_LIMIT_RESUMES,
    )
    raise task.retry(
        args=tuple(task.request.args or ()),
        kwargs={**(task.request.kwargs or {}), "resumes": resumes + 1},
        countdown=RESUME_AFTER_SECONDS,
    )


# --- the tasks --------------------------------------------------------------------------------


@shared_task(bind=True, name=names.SYNC_ALL)
def sync_all(self: Task[Any, Any], slot: str) -> int:
    """Fan out one sync_connection per active connection for the tick `slot`."""
    services = get_services()
    cron = services.settings.sync_cron
    with cron_checkin("closesync-sync-all", cron):
        return fan_out(
            services, self.app, tick="sync", slot=slot, cron=cron, task=names.SYNC_CONNECTION
        )


@shared_task(bind=True, name=names.SYNC_CONNECTION, max_retries=None)
def sync_connection(
    self: Task[Any, Any], connection_id: str, slot: str | None = None, resumes: int = 0
) -> str:
    """Sync one connection (`slot`: the tick that asked, for the logs)."""
    with bind(slot=slot):
        return run_connection(self, connection_id, RunMode.SYNC, resumes)


@shared_task(bind=True, name=names.BACKFILL, max_retries=None)
def backfill(self: Task[Any, Any], connection_id: str, resumes: int = 0) -> str:
    """Full reconciliation of one connection against what Close holds."""
    return run_connection(self, connection_id, RunMode.BACKFILL, resumes)


@shared_task(bind=True, name=names.DRIFT_CHECK)
def drift_check(self: Task[Any, Any], slot: str) -> int:
    """Pair waiting organization users, then fan out one drift_connection per connection."""
    services = get_services()
    cron = services.settings.drift_cron
    with cron_checkin("closesync-drift-check", cron):
        pair_organizations(services)
        return fan_out(
            services, self.app, tick="drift", slot=slot, cron=cron, task=names.DRIFT_CONNECTION
        )


@shared_task(bind=True, name=names.DRIFT_CONNECTION, max_retries=None)
def drift_connection(
    self: Task[Any, Any], connection_id: str, slot: str | None = None, resumes: int = 0
) -> str:
    """Compare one connection's links in Close with the desired ones and repair the drift."""
    with bind(slot=slot):
        return run_connection(self, connection_id, RunMode.DRIFT, resumes)
