"""Sentry: error reporting and cron check-ins, with every secret scrubbed before it leaves.

Nothing is sent unless SENTRY_DSN is set. `scrub_event` runs on every event and breadcrumb: it
masks values under secret-looking names (Authorization headers, tokens, the encryption keys) and
redacts token-shaped text anywhere else (messages, exception values, extra, request data, local
variables), using the same rules as the log redaction (`closesync.wiring.logs`). Local variables are
not attached at all (`include_local_variables=False`): a frame of the token keeper holds tokens.

Cron check-ins: the scheduled `sync_all` and `drift_check` report to Sentry Crons, so a scheduler
that stopped enqueueing shows as a missed check-in, not as silence.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sentry_sdk
from sentry_sdk.crons import monitor
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.transport import Transport

from closesync.settings import Settings
from closesync.wiring.logs import scrub

# Sentry Crons: minutes a check-in may be late before it counts as missed, and minutes a run may
# last before it counts as failed (a tick's fan-out takes seconds; its runs are separate tasks).
CHECKIN_MARGIN_MINUTES = 5
CHECKIN_MAX_RUNTIME_MINUTES = 10


def scrub_event(event: Any, hint: Any = None) -> Any:
    """`before_send`: the event without secrets."""
    return scrub(event)


def scrub_breadcrumb(crumb: Any, hint: Any = None) -> Any:
    """`before_breadcrumb`: the breadcrumb without secrets."""
    return scrub(crumb)


def init_sentry(settings: Settings, *, transport: Transport | None = None) -> bool:
    """Start sentry-sdk when SENTRY_DSN is set; whether it was started."""
    if settings.sentry_dsn is None or not settings.sentry_dsn.get_secret_value():
        return False
    from closesync import __version__

    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        environment=settings.sentry_environment,
        release=f"closesync@{__version__}",
        integrations=[
            # The scheduler enqueues the periodic tasks, not Celery beat: no beat monitoring.
            CeleryIntegration(monitor_beat_tasks=False),
            LoggingIntegration(),
        ],
        before_send=scrub_event,
        before_breadcrumb=scrub_breadcrumb,
        include_local_variables=False,
        transport=transport,
    )
    return True


def _monitor_config(cron: str) -> dict[str, Any] | None:
    # Sentry knows 5-field crontab only; a seconds-first test schedule gets no config.
    if len(cron.split()) != 5:
        return None
    return {
        "schedule": {"type": "crontab", "value": cron},
        "timezone": "UTC",
        "checkin_margin": CHECKIN_MARGIN_MINUTES,
        "max_runtime": CHECKIN_MAX_RUNTIME_MINUTES,
    }


@contextmanager
def cron_checkin(slug: str, cron: str) -> Iterator[None]:
    """Send an in-progress check-in, then ok or error; a no-op when Sentry is off."""
    if not sentry_sdk.get_client().is_active():
        yield
        return
    with monitor(monitor_slug=slug, monitor_config=_monitor_config(cron)):  # type: ignore[arg-type]
        yield
