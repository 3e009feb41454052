"""Calendly's payloads as closesync reads them: unknown fields ignored, nullable ones accepted.

Only the fields closesync relies on are required (`uri`, `active` on an event type); the rest are
optional so that a field Calendly drops or nulls does not fail a whole listing. Pure: no I/O.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def uuid_of(uri: str) -> str:
    """The last path segment of a Calendly resource URI (its uuid)."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def event_type_uri(api_url: str, uuid: str) -> str:
    """The URI Calendly gives the event type `uuid` under the API at `api_url`."""
    return f"{api_url.rstrip('/')}/event_types/{uuid}"


class Profile(_Payload):
    """Who an event type belongs to: a User or a Team."""

    type: str | None = None
    name: str | None = None
    owner: str | None = None


class EventType(_Payload):
    """One Calendly event type."""

    uri: str
    active: bool
    name: str | None = None
    slug: str | None = None
    scheduling_url: str | None = None
    duration: int | None = None
    kind: str | None = None
    pooling_type: str | None = None
    type: str | None = None
    secret: bool = False
    deleted_at: datetime | None = None
    description_plain: str | None = None
    profile: Profile | None = None
    updated_at: datetime | None = None

    @property
    def uuid(self) -> str:
        return uuid_of(self.uri)


class User(_Payload):
    """A Calendly user (`GET /users/me`)."""

    uri: str
    email: str | None = None
    name: str | None = None
    scheduling_url: str | None = None
    timezone: str | None = None
    current_organization: str | None = None

    @property
    def uuid(self) -> str:
        return uuid_of(self.uri)


class MemberUser(_Payload):
    """The user part of an organization membership."""

    uri: str
    email: str | None = None
    name: str | None = None


class OrganizationMembership(_Payload):
    """One member of a Calendly organization."""

    uri: str
    role: str | None = None
    user: MemberUser
    organization: str | None = None


class TokenResponse(_Payload):
    """Answer of Calendly's token endpoint."""

    access_token: str
    refresh_token: str | None = None
    expires_in: int | None = None
    token_type: str | None = None
    owner: str | None = None
    organization: str | None = None
    scope: str | None = None


class WebhookSubscription(_Payload):
    """A Calendly webhook subscription (`/webhook_subscriptions`).

    `state` is `active` or `disabled` (Calendly disables one after 24 h of failed deliveries and
    never re-enables it); kept a plain string so that a state Calendly adds later reads as "not
    active" rather than failing a whole listing.
    """

    uri: str
    callback_url: str
    state: str
    events: list[str] = []
    scope: str
    organization: str | None = None
    user: str | None = None
    creator: str | None = None
    created_at: datetime | None = None
    retry_started_at: datetime | None = None

    @property
    def uuid(self) -> str:
        return uuid_of(self.uri)
