"""Helpers the webhook delivery tests share: subscribe over the real API, change event types
through the admin API, await the delivery queue, read the attempt record."""

from __future__ import annotations

import json
from typing import Any

import requests

from closesync.core.webhooks import EVENT_TYPE_EVENTS
from closesync.sandbox import Sandbox, SeededUser
from tests.sandbox.conftest import admin, cal_call
from tests.sandbox.webhook_receiver import Received

KEY = "test-signing-key-0123456789abcdef"


def subscribe(
    sb: Sandbox,
    user: SeededUser,
    url: str,
    scope: str = "user",
    token: str | None = None,
    signing_key: str | None = KEY,
) -> dict[str, Any]:
    """A new subscription to every event_type.* event, made with `token` (default: the
    user's PAT); its resource."""
    body: dict[str, Any] = {
        "url": url,
        "events": list(EVENT_TYPE_EVENTS),
        "organization": user.calendly_organization_uri,
        "scope": scope,
    }
    if scope == "user":
        body["user"] = user.calendly_user_uri
    if signing_key is not None:
        body["signing_key"] = signing_key
    answer = cal_call(sb, "POST", "/webhook_subscriptions", token or user.calendly_token, json=body)
    assert answer.status_code == 201, answer.text
    return dict(answer.json()["resource"])


def create_type(sb: Sandbox, user: SeededUser, **fields: Any) -> dict[str, Any]:
    """A new event type of `user`, through the admin API."""
    answer = admin(
        sb, "POST", "/calendly/event_types", json={"user_uuid": user.calendly_user_uuid, **fields}
    )
    assert answer.ok, answer.text
    return dict(answer.json())


def uuid_of(uri: str) -> str:
    """The last path segment of a URI."""
    return uri.rsplit("/", 1)[1]


def await_idle(sb: Sandbox) -> dict[str, Any]:
    """The idle state once nothing is queued, held or in flight (fails after 10 s)."""
    url = f"{sb.world.close_base}/_sandbox/webhooks/idle"
    state = requests.get(url, params={"wait": 10}, timeout=15).json()
    assert state["idle"], state
    return dict(state)


def deliveries_of(sb: Sandbox) -> list[dict[str, Any]]:
    """Every recorded attempt, drop and skip."""
    return list(admin(sb, "GET", "/webhooks/deliveries").json())


def envelope_of(received: Received) -> dict[str, Any]:
    """The parsed body of a received delivery."""
    return dict(json.loads(received.body))
