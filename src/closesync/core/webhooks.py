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
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel

from closesync.core.errors import CloseSyncError, Forbidden, Rejected

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


def is_ours(callback: str, public_base_url: str) -> bool:
    """Whether a subscription's callback URL points at this deployment's receiver."""
    return callback.startswith(public_base_url.rstrip("/") + CALLBACK_PATH)


def state_after_failure(error: CloseSyncError) -> tuple[WebhookState, str]:
    """What a failed create leaves: REFUSED for Calendly's lasting no (a 403: the token lacks
    `webhooks:write`, the plan or role may not; a 400/422 refusing the request), PENDING for
    anything a later try may get past (a 5xx, a timeout, a rate limit, a refused token that a
    reconnect replaces, Redis). The reason is the error's message, which names no secret."""
    if isinstance(error, Forbidden | Rejected):
        return WebhookState.REFUSED, str(error)
    return WebhookState.PENDING, str(error)


def state_at_calendly(state: str) -> WebhookState:
    """Calendly's `state` of a subscription as closesync records it."""
    return WebhookState.ACTIVE if state == "active" else WebhookState.DISABLED


# --- what each connection gets of the subscriptions (status, the scheduled poll) -------------

# The webhook state a connection shows when no subscription serves it.
NONE = "none"


@dataclass(frozen=True)
class Served:
    """The subscription serving one connection, as `status` shows it."""

    state: str  # a WebhookState value, or NONE
    reason: str | None = None
    key: str | None = None
    last_delivery: float | None = None


class ServedIndex:
    """Which subscription serves which connection, built once from the records their owner
    indexes name (`WebhookStore.current`; no I/O here). Given a leftover too, the last one of an
    owner would win, which is why callers pass only the current ones.

    A connection with its own Calendly credential is served by its `user`-scope subscription;
    one in organization mode by its organization's (`grant_ref`).
    """

    def __init__(
        self, subscriptions: Iterable[Subscription], last_deliveries: dict[str, float] | None = None
    ) -> None:
        self._by_connection: dict[str, Subscription] = {}
        self._by_ref: dict[str, Subscription] = {}
        self._last = last_deliveries or {}
        for sub in subscriptions:
            if sub.scope == "user" and sub.connection_id is not None:
                self._by_connection[sub.connection_id] = sub
            elif sub.scope == "organization" and sub.grant_ref is not None:
                self._by_ref[sub.grant_ref] = sub

    def organization_refs(self) -> list[str]:
        """The refs of the organizations a subscription serves."""
        return sorted(self._by_ref)

    def subscription(self, connection_id: str, grant_ref: str | None) -> Subscription | None:
        if grant_ref is not None:
            return self._by_ref.get(grant_ref)
        return self._by_connection.get(connection_id)

    def served(self, connection_id: str, grant_ref: str | None) -> Served:
        sub = self.subscription(connection_id, grant_ref)
        if sub is None:
            return Served(NONE)
        return Served(sub.state.value, sub.reason, sub.key, self._last.get(sub.key))

    def active(self, connection_id: str, grant_ref: str | None) -> bool:
        """Whether Calendly pushes this connection's changes (its subscription is ACTIVE)."""
        sub = self.subscription(connection_id, grant_ref)
        return sub is not None and sub.state is WebhookState.ACTIVE
