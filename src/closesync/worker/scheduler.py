"""The scheduler process: enqueue `sync_all` on SYNC_CRON, and `drift_check` and
`reconcile_webhooks` (WEBHOOKS_ENABLED) on DRIFT_CRON.

Run as many as you like (one per host, or two for failover): only the leader enqueues. The leader
holds a Redis lock (`{p}:scheduler:leader`) renewed every third of its TTL; a follower tries to
take it every second, so a leader that died is replaced within LEADER_TTL_SECONDS, and one that
stopped cleanly (SIGTERM) releases it at once. Two leaders can still overlap for a moment (a
paused process whose lock expired); the per-tick SET NX in `enqueue_tick` makes that harmless.

Missed fire times are coalesced into one (APScheduler `coalesce=True`), and a fire later than
MISFIRE_GRACE_SECONDS is dropped: the next tick comes soon enough, and a burst of stale ticks
after a pause would only repeat work.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.blocking import BlockingScheduler
from celery import Celery

from closesync.core.errors import StoreUnavailable
from closesync.store.locks import RedisLock
from closesync.wiring.services import Services
from closesync.worker.enqueue import Tick, cron_of, enqueue_tick
from closesync.worker.schedule import cron_trigger

log = logging.getLogger(__name__)

# Seconds the leader lock lives without renewal: how long ticks may go unenqueued after the
# leader died. Shorter = faster failover, more renewals (one tiny Lua call per TTL/3).
LEADER_TTL_SECONDS = 15.0
# Seconds between a follower's attempts to become leader.
FOLLOWER_RETRY_SECONDS = 1.0
# Seconds a fire may run late (process paused, clock jump) and still enqueue.
MISFIRE_GRACE_SECONDS = 60


class Leadership:
    """Keeps trying to hold the leader lock; `leading` is set while it does."""

    def __init__(self, services: Services, ttl: float = LEADER_TTL_SECONDS) -> None:
        self.lock = RedisLock(services.redis, services.keys.scheduler_leader(), ttl)
        self.ttl = ttl
        self.leading = threading.Event()

    def run(self, stop: threading.Event) -> None:
        """Acquire, renew, re-acquire until `stop`; then release if held."""
        renewed = 0.0
        while not stop.is_set():
            try:
                if self.leading.is_set():
                    if self.lock.renew():
                        renewed = time.monotonic()
                    else:
                        self.leading.clear()
                        log.warning("lost the scheduler leadership")
                elif self.lock.acquire():
                    renewed = time.monotonic()
                    self.leading.set()
                    log.info("leading: this scheduler enqueues the ticks")
            except StoreUnavailable as error:
                log.warning("scheduler leadership check failed: %s", error)
                if self.leading.is_set() and time.monotonic() - renewed >= self.ttl:
                    self.leading.clear()
            stop.wait(self.ttl / 3 if self.leading.is_set() else FOLLOWER_RETRY_SECONDS)
        if self.leading.is_set():
            self.leading.clear()
            try:
                self.lock.release()
            except StoreUnavailable:
                log.warning("could not release the scheduler leadership; it expires by itself")


class TickScheduler:
    """APScheduler jobs for both ticks, enqueueing only while leading."""

    def __init__(self, services: Services, app: Celery, leadership: Leadership) -> None:
        self.services = services
        self.app = app
        self.leadership = leadership

    def fire(self, tick: Tick) -> None:
        """One scheduled fire: enqueue the tick if this scheduler leads."""
        if not self.leadership.leading.is_set():
            log.debug("not leading: %s tick left to the leader", tick)
            return
        try:
            slot, enqueued = enqueue_tick(self.services, self.app, tick)
        except StoreUnavailable as error:
            log.warning("could not enqueue the %s tick: %s", tick, error)
            return
        if enqueued:
            log.info("enqueued the %s tick %s", tick, slot, extra={"slot": slot})
        else:
            log.info("the %s tick %s was already enqueued", tick, slot, extra={"slot": slot})

    def build(self) -> BlockingScheduler:
        scheduler = BlockingScheduler(timezone="UTC")
        ticks: list[Tick] = ["sync", "drift"]
        if self.services.settings.webhooks_enabled:
            ticks.append("webhooks")
        for tick in ticks:
            scheduler.add_job(
                self.fire,
                trigger=cron_trigger(cron_of(self.services, tick)),
                args=[tick],
                id=f"closesync-{tick}",
                coalesce=True,
                misfire_grace_time=MISFIRE_GRACE_SECONDS,
                max_instances=1,
            )
        return scheduler


def run_scheduler(services: Services, app: Celery, stop: threading.Event) -> None:
    """Schedule and lead until `stop` is set; release the leadership on the way out."""
    leadership = Leadership(services)
    scheduler = TickScheduler(services, app, leadership).build()
    leader = threading.Thread(target=leadership.run, args=(stop,), name="leader", daemon=True)
    leader.start()

    def shutdown_on_stop() -> None:
        stop.wait()
        with contextlib.suppress(SchedulerNotRunningError):  # stopped before it started
            scheduler.shutdown(wait=False)

    threading.Thread(target=shutdown_on_stop, name="scheduler-stop", daemon=True).start()
    log.info(
        "scheduler started",
        extra={
            "sync_cron": services.settings.sync_cron,
            "drift_cron": services.settings.drift_cron,
        },
    )
    try:
        scheduler.start()
    finally:
        stop.set()
        leader.join(timeout=10)
        log.info("scheduler stopped")
