"""Putting work on the queues: a scheduled tick, or chosen connections, for the workers to run.

`enqueue_tick` is shared by the scheduler process and `closesync sync --all --enqueue` (system
cron, a Kubernetes CronJob): both name the tick by the slot of the cron's most recent fire time
and claim it with SET NX, so however many of them fire for one tick, one `sync_all` is enqueued.
Chosen connections go through their sync markers (`ask_for_syncs`): a connection whose sync is
queued already, or asked of the run in progress, gets no second one.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
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
def _broker(action: str) -> Iterator[None]:
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
        with _broker(f"enqueueing the {tick} tick {slot}"):
            app.send_task(_TICK_TASKS[tick], args=[slot])
    except BaseException:
        # Not enqueued after all: let the next enqueuer (or a retry) have the tick.
        services.redis.delete(services.keys.tick(claim_name(tick), slot))
        raise
    return slot, True


def ask_for_syncs(
    services: Services, app: Celery, ids: list[str], countdown: float | None = None
) -> list[str]:
    """Ask for a sync of each connection now: the ids whose task this call published.

    The others are coalesced (`closesync.core.queueing`): a sync of theirs is queued already,
    or asked of the run in progress, and runs after this ask. `countdown`: seconds the published
    tasks wait before they start, during which further asks coalesce into them (a debounce).
    """
    task_ids = {connection_id: str(uuid.uuid4()) for connection_id in dict.fromkeys(ids)}
    chosen = services.state.ask_syncs(task_ids)
    try:
        with _broker("enqueueing syncs"):
            publish(
                app,
                [Message(names.SYNC_CONNECTION, [c, None], task_ids[c], countdown) for c in chosen],
            )
    except BaseException:
        # Not published after all: the next ask must not be coalesced into nothing.
        for connection_id in chosen:
            services.state.withdraw_sync(connection_id, task_ids[connection_id])
        raise
    return chosen


def webhook_asker(services: Services, app: Celery) -> Callable[[list[str]], list[str]]:
    """What the webhook receiver asks syncs with: `ask_for_syncs`, debounced.

    A burst of deliveries for a connection makes one run: the first publishes a sync that starts
    WEBHOOK_DEBOUNCE_SECONDS later, and the ones after it coalesce into it through the sync
    marker, which also bounds the tasks a worker holds for their countdown to one per connection.
    A delivery during the run publishes one more, so the run that reads Calendly comes after it.
    """
    debounce = services.settings.webhook_debounce_seconds

    def ask(ids: list[str]) -> list[str]:
        return ask_for_syncs(services, app, ids, countdown=debounce or None)

    return ask


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
        with _broker("enqueueing backfills"):
            for connection_id in ids:
                app.send_task(names.BACKFILL, args=[connection_id])
        return {"task": "backfill", "enqueued": ids}
    finally:
        app.close()
