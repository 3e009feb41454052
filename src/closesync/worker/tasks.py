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

A tick is spread through a schedule in Redis, not countdowns: `fan_out` writes each connection's
due time there and publishes what is due, and a chain of `drain_schedule` tasks (one at a time,
each a second apart at most, on the `fanout` queue with the fan-outs) publishes the rest as it
falls due, in batches over one producer. Webhook deliveries use a schedule of their own
(`webhook`, closesync.worker.webhook_asks) drained the same way, and `webhook_fan_out` spreads a
team type nobody holds over it. Every sync asked for goes through the connection's sync
marker (`closesync.core.queueing`): at most one sync per connection is queued, a task clears the
marker as it starts, a task that met the run lock hands its ask to the holder (which runs once
more), and a retry of a sync is the queued one, or gives way to the one queued meanwhile. A run
that leaves with the ask still handed to it (its reruns ran out, or it met the lock of a holder
that had just ended) publishes it as a fresh sync.

The caps are this module's: the per-connection tasks set Celery's own `max_retries` to None, since
Celery's default (3, counted over every retry of a task) would otherwise end each of them first,
with a MaxRetriesExceededError instead of a decision.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from celery import Celery, Task, shared_task
from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded
from celery.signals import worker_process_shutdown, worker_shutdown

from closesync.core.connection import Connection, ConnectionState
from closesync.core.errors import CloseSyncError, ConnectionNotFound, StoreUnavailable
from closesync.core.queueing import next_drain_in
from closesync.core.report import Outcome, RunMode, RunReport
from closesync.core.retry import Random, rate_limit_delay, transient_delay
from closesync.core.webhooks import ServedIndex
from closesync.sync.parts import Deadline
from closesync.wiring.logs import bind
from closesync.wiring.observability import cron_checkin
from closesync.wiring.services import Services
from closesync.worker import celery_app as names
from closesync.worker.enqueue import ask_for_syncs, publish_drain
from closesync.worker.publish import Message, PublishFailed, publish
from closesync.worker.schedule import (
    interval_after,
    spread_offset,
    spread_window,
    tick_ttl,
    webhook_poll_due,
    webhook_poll_turn,
)
from closesync.worker.webhook_asks import WEBHOOK, fan_out_team_type

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


Kind = Literal["sync", "drift", "webhook"]

# The per-connection task each schedule runs (`webhook`: the syncs deliveries asked for,
# closesync.worker.webhook_asks). Only syncs are coalesced by the sync marker
# (closesync.core.queueing); a drift check is daily, and its schedule holds a connection once.
_RUNS: dict[str, str] = {
    "sync": names.SYNC_CONNECTION,
    "drift": names.DRIFT_CONNECTION,
    WEBHOOK: names.SYNC_CONNECTION,
}
# Due runs a drain takes from a schedule at a time: one ZRANGE, two pipelines of markers and
# one flush of published messages per batch.
DRAIN_BATCH = 500


def fan_out(
    services: Services,
    app: Celery,
    *,
    tick: Kind,
    slot: str,
    cron: str,
    clock: Callable[[], float] = time.time,
) -> int:
    """Claim the tick and schedule every active connection's run of it, spread over the window.

    The runs go into the tick's schedule in Redis (`closesync.store.schedule`) at their hashed
    offsets, and the ones due now are published at once; drain tasks publish the rest as they
    fall due. No run waits in a worker as a countdown task. A second delivery of the same tick
    finds the claim taken and schedules nothing. The claim is taken before the fan-out: a
    worker dying before the schedule is written loses this tick (the next tick runs them)
    rather than risking a tick fanned out twice; once written, the schedule survives it.
    """
    settings = services.settings
    interval = interval_after(cron, slot)
    if not services.state.claim_tick(tick, slot, tick_ttl(interval)):
        log.info("tick already fanned out: %s %s", tick, slot, extra={"slot": slot})
        return 0
    window = spread_window(
        interval, settings.sync_spread_fraction, settings.broker_visibility_timeout
    )
    now = clock()
    polled = _polled(services, tick, slot, cron)
    due = {
        connection.id: now + spread_offset(connection.id, window)
        for connection in services.connections.list()
        if connection.state is ConnectionState.ACTIVE and polled(connection)
    }
    services.schedule.add(tick, due)
    log.info(
        "tick %s %s: scheduled %d connections over %.0f s",
        tick,
        slot,
        len(due),
        window,
        extra={"slot": slot, "connections": len(due)},
    )
    drain(services, app, kind=tick, slot=slot, clock=clock)
    return len(due)


def _polled(services: Services, tick: Kind, slot: str, cron: str) -> Callable[[Connection], bool]:
    """Which active connections a tick runs: a drift check all of them; a sync tick those whose
    webhooks are not active, and of the others those whose own turn of the
    SYNC_CRON_WITH_WEBHOOKS interval this tick is (`schedule.webhook_poll_due`: pure
    arithmetic, so the fleet's rarer poll is spread over the interval's ticks); a member of an
    organization whose shared credential is refused at every tick. The records an owner index
    names, and the organizations' refusals, are read in a few batched calls, none per
    connection."""
    settings = services.settings
    if tick != "sync" or not settings.webhooks_enabled:
        return lambda connection: True
    turn, ticks = webhook_poll_turn(cron, settings.sync_cron_with_webhooks, slot)
    if ticks <= 1:
        return lambda connection: True
    served = ServedIndex(services.webhooks.current())
    # An organization whose shared credential Calendly refused: its deliveries cannot be acted
    # on (and those of the refusal are lost), so its members are polled at SYNC_CRON.
    refs = served.organization_refs()
    refused = {r for r, why in services.connections.shared_refused_of(refs).items() if why}
    return lambda c: (
        c.calendly_grant_ref in refused
        or not served.active(c.id, c.calendly_grant_ref)
        or webhook_poll_due(c.id, turn, ticks)
    )


def drain(
    services: Services,
    app: Celery,
    *,
    kind: Kind,
    slot: str,
    drain_id: str | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Publish the runs of `kind` due now, then hand the schedule over to the next drain.

    `drain_id`: this drain's task id, when it runs as the drain task that had the turn. What a
    failed publish left in the schedule is tried again by the next drain. How many were
    published.
    """
    schedule = services.schedule
    if drain_id is not None:
        schedule.take_drain(kind, drain_id)
    published = 0
    try:
        while ids := schedule.due(kind, clock(), DRAIN_BATCH):
            published += _publish_runs(services, app, kind, slot, ids)
            schedule.remove(kind, ids)
            if len(ids) < DRAIN_BATCH:
                break
    except PublishFailed as error:
        log.warning("publishing the due %s runs failed; the next drain retries: %s", kind, error)
    if published:
        log.debug("published %d %s runs of %s", published, kind, slot, extra={"slot": slot})
    _hand_over(services, app, kind, slot, clock())
    return published


def _publish_runs(
    services: Services, app: Celery, kind: Kind, slot: str, conn_ids: Sequence[str]
) -> int:
    """Publish the runs of `conn_ids`, each at most once queued (syncs): how many were."""
    # Celery's own id format: a dashed uuid, which the log redaction leaves readable.
    task_ids = {conn_id: str(uuid.uuid4()) for conn_id in conn_ids}
    syncs = _RUNS[kind] == names.SYNC_CONNECTION
    chosen = services.state.ask_syncs(task_ids) if syncs else list(conn_ids)
    messages = [Message(_RUNS[kind], [conn_id, slot], task_ids[conn_id]) for conn_id in chosen]
    try:
        publish(app, messages)
    except PublishFailed:
        if syncs:
            _withdraw(services, {conn_id: task_ids[conn_id] for conn_id in chosen})
        raise
    return len(chosen)


def _withdraw(services: Services, asks: dict[str, str]) -> None:
    """Publishing failed: clear the markers set for it, so that the next ask publishes."""
    try:
        for conn_id, task_id in asks.items():
            services.state.withdraw_sync(conn_id, task_id)
    except StoreUnavailable as error:
        # The same Redis is likely the broker that failed: the markers expire by themselves.
        log.warning("could not withdraw the sync markers: %s", error)


def _hand_over(services: Services, app: Celery, kind: Kind, slot: str, now: float) -> None:
    """Publish the next drain (one countdown task of a second at most), unless one is coming."""
    delay = next_drain_in(services.schedule.next_due(kind), now)
    if delay is not None:
        publish_drain(services, app, kind, slot, delay)


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
                if mode is RunMode.SYNC and task.request.id:
                    # From now on an ask wants a run after this one: it queues one more.
                    services.state.sync_started(connection_id, task.request.id)
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
            # A sync asked for during this run is either queued (its own task will run it) or
            # was handed to this run by a task that met the lock: `pop_rerun` takes the latter.
            while (
                report.outcome in (Outcome.OK, Outcome.PARTIAL)
                and reruns < MAX_RERUNS
                and services.state.pop_rerun(connection_id)
            ):
                reruns += 1
                log.info("a sync was requested while this run lasted: running once more")
                report = engine.run(connection_id, mode=RunMode.SYNC, deadline=deadline)
            _pass_on_owed_rerun(task, services, connection_id, report, reruns)
        except SoftTimeLimitExceeded:
            # The engine released the lock on the way out and stored the run's report as failed;
            # what was written stays recorded.
            return resume_after_time_limit(task, services, connection_id, mode, resumes)
        if report.failure == "deadline":
            # The engine's own soft limit: stopped between steps, report stored, lock released.
            return resume_after_time_limit(task, services, connection_id, mode, resumes)
        decision = retry_verdict(report, task.request.retries, random.random)
        if decision.retry:
            log.info(
                "retrying in %.1f s: %s",
                decision.countdown,
                decision.reason,
                extra={"run_id": report.run_id, "retries": task.request.retries},
            )
            retry_later(
                task, services, connection_id, mode, countdown=decision.countdown, max_retries=None
            )
            return report.outcome.value
        if report.outcome is Outcome.FAILED:
            log.warning(
                "not retried (%s): %s",
                decision.reason,
                report.error,
                extra={"run_id": report.run_id},
            )
        return report.outcome.value


def _pass_on_owed_rerun(
    task: Task[Any, Any], services: Services, connection_id: str, report: RunReport, reruns: int
) -> None:
    """Leaving with a rerun still owed: publish a fresh sync rather than lose the ask.

    Two ways to leave with the `holder` marker set: the reruns ran out (an ask arrived during
    the last one), or this task met the lock (SKIPPED) of a holder that will not rerun (an
    inline `closesync sync`) or that ended just after the request landed. A failed run owes
    nothing here: its retry takes the marker over (`retry_later`).
    """
    ran_out = report.outcome in (Outcome.OK, Outcome.PARTIAL) and reruns >= MAX_RERUNS
    locked = report.outcome is Outcome.SKIPPED and report.failure == "locked"
    if not (ran_out or locked):
        return
    if locked and services.state.lock_held(connection_id):
        return  # the holder runs on: it reruns (a worker) or passes the ask on as it ends
    if services.state.pop_rerun(connection_id):
        log.info("a sync asked for while leaving is published afresh")
        ask_for_syncs(services, task.app, [connection_id])


def retry_later(
    task: Task[Any, Any], services: Services, connection_id: str, mode: RunMode, **options: Any
) -> None:
    """Raise the task's retry, unless a sync queued meanwhile replaces it (then return).

    A sync's retry is one more queued sync: it takes the connection's marker, so that asks
    coalesce into it, or gives way to the task that has it. A retry that cannot be published
    gives the marker back.
    """
    task_id = task.request.id if mode is RunMode.SYNC else None
    if task_id and not services.state.requeue_sync(connection_id, task_id):
        log.info("a sync of this connection is queued already: it replaces this retry")
        return
    try:
        retry: Retry = task.retry(throw=False, **options)
    except Reject:
        # Celery drops a task whose retry it could not publish: let the next ask publish.
        if task_id:
            _withdraw(services, {connection_id: task_id})
        raise
    raise retry from None


def resume_after_time_limit(
    task: Task[Any, Any], services: Services, connection_id: str, mode: RunMode, resumes: int
) -> str:
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
    retry_later(
        task,
        services,
        connection_id,
        mode,
        args=tuple(task.request.args or ()),
        kwargs={**(task.request.kwargs or {}), "resumes": resumes + 1},
        countdown=RESUME_AFTER_SECONDS,
    )
    return Outcome.FAILED.value


# --- the tasks --------------------------------------------------------------------------------


@shared_task(bind=True, name=names.SYNC_ALL)
def sync_all(self: Task[Any, Any], slot: str) -> int:
    """Schedule one sync_connection per active connection for the tick `slot`."""
    services = get_services()
    cron = services.settings.sync_cron
    with cron_checkin("closesync-sync-all", cron):
        return fan_out(services, self.app, tick="sync", slot=slot, cron=cron)


@shared_task(bind=True, name=names.DRAIN_SCHEDULE)
def drain_schedule(self: Task[Any, Any], kind: Kind, slot: str) -> int:
    """Publish the runs of the `kind` schedule that are due, and hand over to the next drain."""
    return drain(get_services(), self.app, kind=kind, slot=slot, drain_id=self.request.id)


@shared_task(bind=True, name=names.WEBHOOK_FAN_OUT)
def webhook_fan_out(self: Task[Any, Any], grant_ref: str, event_type_uuid: str) -> int:
    """Schedule the syncs of a team type no connection holds (closesync.worker.webhook_asks)."""
    return fan_out_team_type(get_services(), self.app, grant_ref, event_type_uuid)


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
    """Pair waiting organization users, then schedule one drift_connection per connection."""
    services = get_services()
    cron = services.settings.drift_cron
    with cron_checkin("closesync-drift-check", cron):
        pair_organizations(services)
        return fan_out(services, self.app, tick="drift", slot=slot, cron=cron)


@shared_task(bind=True, name=names.DRIFT_CONNECTION, max_retries=None)
def drift_connection(
    self: Task[Any, Any], connection_id: str, slot: str | None = None, resumes: int = 0
) -> str:
    """Compare one connection's links in Close with the desired ones and repair the drift."""
    with bind(slot=slot):
        return run_connection(self, connection_id, RunMode.DRIFT, resumes)


# Owners one reconcile_webhooks task reconciles before it hands the rest of the pass to the
# next one: at most a few Calendly calls each (listing, delete, create within their 5 s call
# budgets), DEFAULT_CONCURRENCY at a time, well within the task's 240 s soft limit; smaller
# batches cost one more message each.
RECONCILE_BATCH = 100


@shared_task(bind=True, name=names.RECONCILE_WEBHOOKS)
def reconcile_webhooks(self: Task[Any, Any], slot: str, after: str | None = None) -> int:
    """Reconcile the webhook subscriptions closesync owns with Calendly (daily, DRIFT_CRON):
    re-create the disabled and missing ones (and sync what they serve), retry the pending ones,
    delete our orphans. RECONCILE_BATCH owners per task: each task publishes the next one,
    resuming after the last owner it did (`after`), so a pass of any fleet size ends within a
    day and none of it repeats. How many owners of this batch failed (logged; the next day
    tries again)."""
    from closesync.connect.webhook_reconcile import Reconciler, next_batch, targets

    services = get_services()
    settings = services.settings
    cron = settings.drift_cron
    if not settings.webhooks_enabled:
        return 0
    # Only the pass's first task claims the slot; a continuation is one message of that claim.
    first = after is None
    if first and not services.state.claim_tick(
        "webhooks", slot, tick_ttl(interval_after(cron, slot))
    ):
        log.info("webhook reconciliation already ran: %s", slot, extra={"slot": slot})
        return 0
    with cron_checkin("closesync-reconcile-webhooks", cron):
        connections, refs, resume = next_batch(*targets(services, None), after, RECONCILE_BATCH)
        outcomes = Reconciler(services, lambda ids: ask_for_syncs(services, self.app, ids)).run(
            connections, refs, sweep=first
        )
    if resume is not None:
        # Published before this task acks: a crash from here redelivers this batch (every step
        # of it idempotent) rather than lose the rest of the pass.
        self.app.send_task(names.RECONCILE_WEBHOOKS, args=[slot, resume])
    failed = sum(outcome.failed for outcome in outcomes)
    log.info(
        "webhook reconciliation %s: %d owners, %d failed",
        slot,
        len(outcomes),
        failed,
        extra={"slot": slot},
    )
    return failed
