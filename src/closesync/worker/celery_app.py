"""The Celery app factory: broker, queues and the settings that make delivery at-least-once.

Tasks are idempotent (the engine writes nothing twice and a run lock keeps runs of one connection
apart), so the app is tuned to never lose a task rather than to never run one twice.

REDIS_URL may be `redis://`, `rediss://` or `sentinel://host:26379;sentinel://host2:26379/0`;
for Sentinel, name the master with `?master_name=mymaster` on the URL (removed before kombu sees
it) or it defaults to `mymaster`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from celery import Celery

from closesync.core.errors import ConfigError
from closesync.settings import Settings
from closesync.store.broker_queues import BACKFILL_QUEUE, FANOUT_QUEUE, SYNC_QUEUE
from closesync.store.client import DEFAULT_SENTINEL_MASTER
from closesync.store.keys import Keys

# The queue names (sync, backfill, fanout) are `closesync.store.broker_queues`'s.
# Task names are part of the wire format between the enqueuers and the workers: never rename.
SYNC_ALL = "closesync.sync_all"
SYNC_CONNECTION = "closesync.sync_connection"
BACKFILL = "closesync.backfill"
DRIFT_CHECK = "closesync.drift_check"
DRIFT_CONNECTION = "closesync.drift_connection"
DRAIN_SCHEDULE = "closesync.drain_schedule"
RECONCILE_WEBHOOKS = "closesync.reconcile_webhooks"
WEBHOOK_FAN_OUT = "closesync.webhook_fan_out"
# Seconds a task result is kept in Redis: only eager tests and `celery inspect` look at them.
RESULT_EXPIRES_SECONDS = 3600


def worker_queues(requested: str) -> str:
    """The queues a worker consumes: the fan-out queue first, then those asked for, once each.

    Dedicating workers to `sync` or `backfill` must never leave the fan-outs without a consumer:
    they are short, and a tick that nobody fans out would silently run nothing.
    """
    named = [queue.strip() for queue in requested.split(",") if queue.strip()]
    return ",".join(dict.fromkeys([FANOUT_QUEUE, *named]))


def broker_url_and_options(url: str) -> tuple[str, dict[str, Any]]:
    """The URL kombu should see, and the transport options the URL implies (Sentinel master)."""
    if not url.startswith("sentinel://"):
        return url, {}
    master = DEFAULT_SENTINEL_MASTER
    cleaned = []
    for part in url.split(";"):
        pieces = urlsplit(part)
        query = parse_qsl(pieces.query)
        master = next((v for k, v in query if k == "master_name"), master)
        rest = urlencode([(k, v) for k, v in query if k != "master_name"])
        cleaned.append(urlunsplit(pieces._replace(query=rest)))
    return ";".join(cleaned), {"master_name": master}


def check_time_limits(settings: Settings) -> None:
    """ConfigError unless soft < hard time limit < visibility timeout, and the run lock fits."""
    soft, hard = settings.task_soft_time_limit, settings.task_time_limit
    visibility = settings.broker_visibility_timeout
    if not soft < hard < visibility:
        raise ConfigError(
            "TASK_SOFT_TIME_LIMIT < TASK_TIME_LIMIT < BROKER_VISIBILITY_TIMEOUT must hold "
            f"(got {soft} < {hard} < {visibility}): a task still running when the visibility "
            "timeout ends is delivered a second time"
        )
    if visibility <= settings.run_lock_ttl_seconds:
        raise ConfigError(
            f"BROKER_VISIBILITY_TIMEOUT ({visibility} s) must exceed RUN_LOCK_TTL_SECONDS "
            f"({settings.run_lock_ttl_seconds} s): a task redelivered after a crash must find "
            "the crashed run's lock expired, or it is skipped"
        )


def celery_config(settings: Settings, broker_url: str) -> dict[str, Any]:
    """The Celery settings, each with why."""
    check_time_limits(settings)
    url, sentinel = broker_url_and_options(broker_url)
    visibility = settings.broker_visibility_timeout
    transport = {
        **sentinel,
        # Seconds before an unacknowledged message (its worker died) is delivered again; must
        # exceed the longest task, which the time limits guarantee.
        "visibility_timeout": visibility,
        # Look for such abandoned messages every few seconds, on every sweep: kombu's defaults
        # (10 s x every 10th sweep) would leave a crashed worker's task waiting 100 s more.
        "unacked_restore_interval": max(1, min(60, visibility // 4)),
        "unacked_restore_throttle": 1,
        # Queue keys share closesync's prefix, so one Redis can serve several deployments.
        "global_keyprefix": Keys(settings.redis_prefix).celery_prefix(),
        # A broker that vanished without closing TCP must not hang a publish forever.
        "socket_timeout": 10,
        "socket_connect_timeout": 10,
    }
    return {
        "broker_url": url,
        "result_backend": url,
        "broker_transport_options": transport,
        "result_backend_transport_options": dict(transport),
        # At-least-once: ack after the task ran, and put it back if its worker process died.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message at a time per run slot (a thread, or a prefork process): a long run must
        # not sit on queued ticks.
        "worker_prefetch_multiplier": 1,
        # Warned (and the run stopped between steps), then killed, before the broker redelivers.
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        # JSON only: a pickle from a compromised broker would run code in the worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # Nothing reads task results: the engine keeps its own run reports in Redis.
        "task_ignore_result": True,
        "result_expires": RESULT_EXPIRES_SECONDS,
        # Two queues of runs: a backfill or drift check (many calls) never delays a scheduled
        # sync. The fan-outs have a third, so a tick never waits behind the runs of the last one:
        # a dedicated list, rather than priorities, which the Redis transport only emulates with
        # more lists, and which every worker consumes.
        "task_default_queue": SYNC_QUEUE,
        "task_routes": {
            SYNC_ALL: {"queue": FANOUT_QUEUE},
            DRIFT_CHECK: {"queue": FANOUT_QUEUE},
            DRAIN_SCHEDULE: {"queue": FANOUT_QUEUE},
            RECONCILE_WEBHOOKS: {"queue": FANOUT_QUEUE},
            WEBHOOK_FAN_OUT: {"queue": FANOUT_QUEUE},
            SYNC_CONNECTION: {"queue": SYNC_QUEUE},
            DRIFT_CONNECTION: {"queue": BACKFILL_QUEUE},
            BACKFILL: {"queue": BACKFILL_QUEUE},
        },
        # Time is UTC everywhere: cron, slots, reports.
        "timezone": "UTC",
        "enable_utc": True,
        # Keep retrying the broker at startup: in compose, Redis may come up after the worker.
        "broker_connection_retry_on_startup": True,
        # closesync.wiring.logs owns the root logger (JSON lines, redaction).
        "worker_hijack_root_logger": False,
        # A prefork worker replaces its pool processes now and then, returning leaked memory.
        "worker_max_tasks_per_child": 1000,
        # Task events for Flower or `celery events` (CELERY_TASK_EVENTS): a few more messages
        # per task, so off unless someone watches.
        "worker_send_task_events": settings.celery_task_events,
        "task_send_sent_event": settings.celery_task_events,
    }


def create_app(settings: Settings, broker_url: str | None = None) -> Celery:
    """A Celery app for `settings`; `broker_url` defaults to REDIS_URL (or the embedded one)."""
    if broker_url is None:
        from closesync.wiring.services import redis_url_of

        broker_url = redis_url_of(settings)
    app = Celery("closesync", include=["closesync.worker.tasks"])
    app.conf.update(celery_config(settings, broker_url))
    return app
