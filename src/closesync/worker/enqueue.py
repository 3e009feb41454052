"""Putting work on the queues: a scheduled tick, or chosen connections, for the workers to run.

`enqueue_tick` is shared by the scheduler process and `closesync sync --all --enqueue` (system
cron, a Kubernetes CronJob): both name the tick by the slot of the cron's most recent fire time
and claim it with SET NX, so however many of them fire for one tick, one `sync_all` is enqueued.
Chosen connections go through their sync markers (`ask_for_syncs`): a connection whose sync is
queued already, or asked of the run in progress, gets no second one. `publish_drain` starts the
chain of drains of a schedule in Redis (`closesync.store.schedule`) unless one has the turn.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Literal

from celery import Celery
from kombu.exceptions import OperationalError

from closesync.core.errors import StoreUnavailable
from closesync.wiring.services import Services
from closesync.worker import celery_app as names
from closesync.worker.celery_app import create_app
from closesync.worker.publish import Message, publish
from closesync.worker.schedule import current_slot, interval_after, tick_ttl

# "webhooks": the daily reconciliation of the webhook subscriptions, on the drift check's cron.
Tick = Literal["sync", "drift", "webhooks"]

# Seconds a drain's turn outlives the countdown it was published with: room for a worker that
# is busy when the drain is due. A chain that died is replaced by the next tick's fan-out (or
# the next webhook delivery) once the turn lapsed.
DRAIN_TURN_GRACE_SECONDS = 30.0

_TICK_TASKS = {
    "sync": names.SYNC_ALL,
    "drift": names.DRIFT_CHECK,
    "webhooks": names.RECONCILE_WEBHOOKS,
}


def claim_name(tick: Tick) -> str:
    """The claim an enqueuer takes; `sync_all` itself claims the plain tick name."""
    return f"enqueue-{tick}"


def cron_of(services: Services, tick: Tick) -> str:
    s = services.settings
    return s.sync_cron if tick == "sync" else s.drift_cron  # the reconciliation: daily too


@contextmanager
def broker_errors(action: str) -> Iterator[None]:
    try:
        yield
    except OperationalError as error:
        raise StoreUnavailable(f"the broker cannot be reached while {action}: {error}") from error


def enqueue_tick(
    services: Services, app: Celery, tick: Tick, now: datetime | None = None
) -> tuple[str, bool]:
    """Enqueue the current tick of `tick`'s cron once; (slot, whether this call enqueued it)."""
    cron = cron_of(services, tick)
    slot = current_slot(cron, now or datetime.now(UTC))
    ttl = tick_ttl(interval_after(cron, slot))
    if not services.state.claim_tick(claim_name(tick), slot, ttl):
        return slot, False
    try:
        with broker_errors(f"enqueueing the {tick} tick {slot}"):
            app.send_task(_TICK_TASKS[tick], args=[slot])
    except BaseException:
        # Not enqueued after all: let the next enqueuer (or a retry) have the tick.
        services.redis.delete(services.keys.tick(claim_name(tick), slot))
        raise
    return slot, True


def ask_for_syncs(services: Services, app: Celery, ids: list[str]) -> list[str]:
    """Ask for a sync of each connection now: the ids whose task this call published.

    The others are coalesced (`closesync.core.queueing`): a sync of theirs is queued already,
    or asked of the run in progress, and runs after this ask.
    """
    task_ids = {connection_id: str(uuid.uuid4()) for connection_id in dict.fromkeys(ids)}
    chosen = services.state.ask_syncs(task_ids)
    try:
        with broker_errors("enqueueing syncs"):
            publish(app, [Message(names.SYNC_CONNECTION, [c, None], task_ids[c]) for c in chosen])
    except BaseException:
        # Not published after all: the next ask must not be coalesced into nothing.
        for connection_id in chosen:
            services.state.withdraw_sync(connection_id, task_ids[connection_id])
        raise
    return chosen


def publish_drain(services: Services, app: Celery, kind: str, slot: str, delay: float) -> bool:
    """Publish a drain of the `kind` schedule `delay` seconds from now, unless a chain of drains
    has the turn already (it drains what is there when it runs); whether this call published.

    The one countdown task of a schedule: at most one per kind is on the queue at a time.
    """
    schedule = services.schedule
    drain_id = str(uuid.uuid4())
    if not schedule.pass_drain(kind, drain_id, delay + DRAIN_TURN_GRACE_SECONDS):
        return False
    try:
        with broker_errors(f"publishing the drain of the {kind} schedule"):
            app.send_task(
                names.DRAIN_SCHEDULE,
                args=[kind, slot],
                task_id=drain_id,
                countdown=delay or None,
                ignore_result=True,
                add_to_parent=False,
            )
    except BaseException:
        schedule.take_drain(kind, drain_id)
        raise
    return True


def enqueue_sync(services: Services, ids: list[str] | None) -> dict[str, object]:
    """`sync --enqueue`: the current tick (ids None, i.e. --all) or these connections now.

    What was enqueued: `{"tick", "slot", "enqueued": bool}` for a tick, else
    `{"task": "sync", "enqueued": [ids], "already_queued": [ids]}`; the CLI prints it.
    """
    app = create_app(services.settings)
    try:
        if ids is None:
            slot, enqueued = enqueue_tick(services, app, "sync")
            return {"tick": "sync", "slot": slot, "enqueued": enqueued}
        published = ask_for_syncs(services, app, ids)
        coalesced = [c for c in dict.fromkeys(ids) if c not in set(published)]
        return {"task": "sync", "enqueued": published, "already_queued": coalesced}
    finally:
        app.close()


def enqueue_backfill(services: Services, ids: list[str]) -> dict[str, object]:
    """`backfill --enqueue`: one backfill task per connection, on the backfill queue."""
    app = create_app(services.settings)
    try:
        with broker_errors("enqueueing backfills"):
            for connection_id in ids:
                app.send_task(names.BACKFILL, args=[connection_id])
        return {"task": "backfill", "enqueued": ids}
    finally:
        app.close()
