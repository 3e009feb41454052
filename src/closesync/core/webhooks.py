"""Calendly webhook subscriptions as closesync owns them: the public record of each one.

closesync makes one subscription per connection that has its own Calendly credential (scope
`user`) and one per connected Calendly organization (organization mode, scope `organization`),
each to the three event-type events. Calendly refuses two subscriptions of one user on one URL and
never lets a URL change, so every subscription gets a callback URL of its own:
`{PUBLIC_BASE_URL}/webhooks/calendly/{key}`, where `key` is random and names the record.

A `Subscription` holds no secret: the signing key of a subscription made with a personal access
token is sealed apart (`closesync.store.webhooks`); one made by the OAuth application is signed
with the application's key (CALENDLY_WEBHOOK_SIGNING_KEY) and has none of its own.
"""

from __future__ import annotations

import secrets
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel

# The events every subscription asks for, in Calendly's spelling.
EVENT_TYPE_EVENTS: tuple[str, ...] = (
    "event_type.created",
    "event_type.updated",
    "event_type.deleted",
)
# The path under PUBLIC_BASE_URL that deliveries are posted to; the key follows it.
CALLBACK_PATH = "/webhooks/calendly/"


class WebhookState(StrEnum):
    """Where a subscription stands, as closesync last saw it."""

    # Recorded, not (yet) created at Calendly: a create failed for a transient reason.
    PENDING = "pending"
    # Created at Calendly and, when last listed, `active` there.
    ACTIVE = "active"
    # Calendly disabled it (24 h of failed deliveries): the reconciliation re-creates it.
    DISABLED = "disabled"
    # Calendly refused it for good (missing `webhooks:write` scope, plan, role): `reason` says
    # why; the connection keeps syncing by polling.
    REFUSED = "refused"


class Subscription(BaseModel):
    """One subscription closesync owns (or means to own), keyed by its callback key."""

    key: str
    scope: Literal["user", "organization"]
    organization_uri: str
    # Scope user: the Calendly user and the one connection it serves.
    user_uri: str | None = None
    connection_id: str | None = None
    # Scope organization: the shared organization credential's ref (`calendly-org:{ref}`); it
    # serves every connection whose calendly_grant_ref is that ref.
    grant_ref: str | None = None
    # Calendly's uri of the subscription; None until created there.
    uri: str | None = None
    state: WebhookState = WebhookState.PENDING
    reason: str | None = None
    # Whether closesync generated a signing key for it (personal access token) or Calendly
    # signs with the OAuth application's key.
    own_signing_key: bool = False
    created_at: float
    updated_at: float


def new_key() -> str:
    """A fresh callback key: URL-safe, unguessable (a key is half of what a delivery proves)."""
    return secrets.token_urlsafe(24)


def callback_url(public_base_url: str, key: str) -> str:
    """The URL Calendly posts the deliveries of subscription `key` to."""
    return public_base_url.rstrip("/") + CALLBACK_PATH + key
