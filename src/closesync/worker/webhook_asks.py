"""How webhook deliveries ask for syncs: debounced through the Redis schedule, never a countdown.

A sync published with a countdown breaks the worker's one-message-at-a-time bound: Celery raises
the prefetch for every ETA message, so one worker takes a whole burst and holds it unacked, and
past the visibility timeout the Redis transport redelivers it (duplicate runs). So a delivery
writes its connections into the `webhook` schedule (`closesync.store.schedule`) due one
WEBHOOK_DEBOUNCE_SECONDS later, ZADD LT: the first delivery of a burst sets the time and the
ones after it keep it, one entry per connection. The drain chain (`closesync.worker.tasks.drain`)
publishes what is due through the sync markers, plain tasks with no countdown, so a sync already
queued or running still coalesces the ask (`closesync.core.queueing`). When no drain has the
turn (the schedule was idle), the delivery publishes one, due with its entries: the only
countdown task, one per schedule at a time.

A team event type that no connection holds yet may be hosted by any connection of the
organization: the request does not read them (10,000 of them took 4.5 s inside it). It publishes
one `webhook_fan_out` task (on the fan-out queue, one per organization and type within the
window), which backfills the holders index once, asks the holders it then finds, or else spreads
at most WEBHOOK_FANOUT_MAX of the organization's connections over WEBHOOK_FANOUT_WINDOW_SECONDS
through the same schedule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from celery import Celery

from closesync.store.index_backfill import IndexBackfill
from closesync.wiring.services import Services
from closesync.worker import celery_app as names
from closesync.worker.enqueue import ask_for_syncs, broker_errors, publish_drain
from closesync.worker.schedule import spread_offset

log = logging.getLogger(__name__)

# The schedule kind of the syncs webhook deliveries asked for (and the slot their runs log).
WEBHOOK = "webhook"


@dataclass
class WebhookAsker:
    """What the webhook receiver asks syncs with (`closesync.web.webhooks.SyncAsker`)."""

    services: Services
    app: Celery
    clock: Callable[[], float] = field(default=time.time)

    def __call__(self, ids: list[str]) -> list[str]:
        """Schedule a sync of each connection one debounce from now (an earlier entry stays),
        and make sure a drain comes; the ids asked. Debounce 0: published at once."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return []
        debounce = self.services.settings.webhook_debounce_seconds
        if not debounce:
            return ask_for_syncs(self.services, self.app, wanted)
        now = self.clock()
        self.services.schedule.add(WEBHOOK, dict.fromkeys(wanted, now + debounce))
        publish_drain(self.services, self.app, WEBHOOK, WEBHOOK, debounce)
        return wanted

    def organization(self, grant_ref: str, event_type_uuid: str) -> bool:
        """Publish the fan-out of organization `grant_ref` for team type `event_type_uuid`
        (no connection holds it), unless a delivery of this burst did; whether this call did."""
        schedule = self.services.schedule
        window = self.services.settings.webhook_fanout_window_seconds
        if not schedule.claim_fan_out(grant_ref, event_type_uuid, window + 1):
            return False
        try:
            with broker_errors("publishing a webhook fan-out"):
                self.app.send_task(
                    names.WEBHOOK_FAN_OUT,
                    args=[grant_ref, event_type_uuid],
                    ignore_result=True,
                    add_to_parent=False,
                )
        except BaseException:
            schedule.release_fan_out(grant_ref, event_type_uuid)
            raise
        return True


def webhook_asker(services: Services, app: Celery) -> WebhookAsker:
    """The asker of a web process: deliveries' syncs through the `webhook` schedule."""
    return WebhookAsker(services, app)


def fan_out_team_type(
    services: Services,
    app: Celery,
    grant_ref: str,
    event_type_uuid: str,
    *,
    clock: Callable[[], float] = time.time,
) -> int:
    """Schedule the syncs a team type no connection held asks for (module docstring): its
    holders once the index is backfilled, else at most WEBHOOK_FANOUT_MAX of the organization's
    connections spread over the window. How many were scheduled."""
    settings = services.settings
    IndexBackfill(services.redis, services.keys).holders()
    served = services.connections.of_organization(grant_ref)
    held = services.state.holders(event_type_uuid) & served
    if held:
        chosen, window = sorted(held), 0.0
    else:
        ordered = sorted(served)
        chosen, window = (
            ordered[: settings.webhook_fanout_max],
            settings.webhook_fanout_window_seconds,
        )
        if len(ordered) > len(chosen):
            log.warning(
                "a team event type no connection holds: %d of the organization's %d connections "
                "asked (WEBHOOK_FANOUT_MAX); the others find it at their next poll",
                len(chosen),
                len(ordered),
            )
    if not chosen:
        return 0
    start = clock() + settings.webhook_debounce_seconds
    services.schedule.add(WEBHOOK, {c: start + spread_offset(c, window) for c in chosen})
    publish_drain(services, app, WEBHOOK, WEBHOOK, settings.webhook_debounce_seconds)
    log.info(
        "team event type fan-out: %d connection(s) scheduled over %.0f s",
        len(chosen),
        window,
        extra={"connections": len(chosen)},
    )
    return len(chosen)
