"""Sentry: off without a DSN; events and breadcrumbs scrubbed of tokens; cron check-ins sent."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from closesync.settings import Settings
from closesync.wiring.observability import cron_checkin, init_sentry

TOKEN = "cal_rt_fedcba9876543210fedcba9876543210"


class MemoryTransport(Transport):
    """Keeps every envelope in memory instead of sending it."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def items(self, kind: str) -> list[dict[str, Any]]:
        return [
            item.payload.json or {}
            for envelope in self.envelopes
            for item in envelope.items
            if item.type == kind
        ]


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def transport() -> Iterator[MemoryTransport]:
    """Sentry initialised with a DSN and an in-memory transport; closed afterwards."""
    memory = MemoryTransport()
    assert init_sentry(settings(sentry_dsn="https://public@sentry.invalid/1"), transport=memory)
    try:
        yield memory
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)


def test_init_sentry_without_dsn_stays_off() -> None:
    """No SENTRY_DSN, no Sentry."""
    assert init_sentry(settings()) is False


def test_event_token_in_message_extra_headers_breadcrumb_scrubbed(
    transport: MemoryTransport,
) -> None:
    """Nothing of a token reaches Sentry from a message, extra, request headers or breadcrumbs."""
    log = logging.getLogger("closesync.apis.credentials")
    log.warning("refreshing with refresh token %s", TOKEN)  # becomes a breadcrumb
    with sentry_sdk.new_scope() as scope:
        scope.set_extra("grant", {"refresh_token": TOKEN, "kind": "oauth"})
        scope.set_extra("note", f"Bearer {TOKEN}")
        scope.set_context("request", {"headers": {"Authorization": f"Bearer {TOKEN}"}})
        try:
            raise RuntimeError(f"Calendly POST /oauth/token refused {TOKEN}")
        except RuntimeError as error:
            sentry_sdk.capture_exception(error)
        log.error("token refresh failed: access_token=%s", TOKEN)
    sentry_sdk.flush()
    events = transport.items("event")
    assert len(events) == 2
    dumped = json.dumps(events)
    assert TOKEN not in dumped
    assert "fedcba9876543210" not in dumped
    exception_event = next(e for e in events if e.get("exception"))
    assert exception_event["extra"]["grant"] == {"refresh_token": "[redacted]", "kind": "oauth"}
    assert "Calendly POST /oauth/token refused [redacted]" in dumped


def test_cron_checkin_sends_in_progress_then_ok(transport: MemoryTransport) -> None:
    """A scheduled fan-out reports an in-progress and an ok check-in with its crontab."""
    with cron_checkin("closesync-sync-all", "*/5 * * * *"):
        pass
    sentry_sdk.flush()
    checkins = transport.items("check_in")
    assert [c["status"] for c in checkins] == ["in_progress", "ok"]
    assert checkins[0]["monitor_slug"] == "closesync-sync-all"
    assert checkins[0]["monitor_config"]["schedule"] == {"type": "crontab", "value": "*/5 * * * *"}


def test_cron_checkin_failure_reports_error(transport: MemoryTransport) -> None:
    """A fan-out that raises reports an error check-in."""
    with pytest.raises(RuntimeError), cron_checkin("closesync-drift-check", "17 3 * * *"):
        raise RuntimeError("Redis went away")
    sentry_sdk.flush()
    assert [c["status"] for c in transport.items("check_in")] == ["in_progress", "error"]
