"""What a Calendly webhook delivery says, and whom it asks to sync. Pure, no I/O.

A delivery is a hint (decisions.md): it names an event type that changed, and closesync asks for
a sync of the connections that event type belongs to; the run then reads Calendly's current
state, so duplicates and deliveries out of order converge to it. This module reads only what that
needs, and is lenient to everything else (Calendly adds fields over time): the envelope's `event`
and `payload.uri`, and `payload.profile` (`type`, `owner`) to find the owner; `created_at` and
`deleted_at` are kept for the logs. An event other than the three `event_type.*` is acknowledged
and ignored (a subscription closesync did not make, or an event Calendly adds).

`targets` decides who is asked, from facts the caller read in Redis:

- the owner's connection (`profile.owner`, a Calendly user uri) for any event type;
- for a team type (`profile.type` Team) also every connection that holds a link of it (its
  connected hosts: Calendly's payload does not list them); when none of those the subscription
  serves does yet (a new team type, or a host who just joined it), every connection the
  subscription serves, since any of them may host it (for an organization, not here: a task
  reads and spreads them, `closesync.worker.webhook_asks`);
- and only ever connections the subscription serves: a delivery to one user's URL must not sync
  another user, nor an organization's another organization.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from closesync.core.calendly_payloads import uuid_of
from closesync.core.webhooks import EVENT_TYPE_EVENTS


class MalformedDelivery(ValueError):
    """A signed body that is not a readable delivery: it names what is wrong (400)."""


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class DeliveryProfile(_Lenient):
    type: str | None = None
    owner: str | None = None


class EventTypeChange(_Lenient):
    """The payload of an `event_type.*` delivery: the event type, of which we read little."""

    uri: str = Field(min_length=1)
    profile: DeliveryProfile | None = None
    deleted_at: str | None = None

    @property
    def uuid(self) -> str:
        return uuid_of(self.uri)

    @property
    def is_team(self) -> bool:
        return self.profile is not None and (self.profile.type or "").casefold() == "team"

    @property
    def owner_uuid(self) -> str | None:
        owner = self.profile.owner if self.profile is not None else None
        return uuid_of(owner) if owner else None


class _Envelope(_Lenient):
    event: str = Field(min_length=1)
    created_at: str | None = None
    payload: object = None


class Delivery(_Lenient):
    """A readable `event_type.*` delivery."""

    event: str
    created_at: str | None = None
    change: EventTypeChange


def parse_delivery(body: bytes) -> Delivery | None:
    """The delivery in `body`; None for an event closesync ignores; MalformedDelivery otherwise."""
    try:
        envelope = _Envelope.model_validate_json(body)
    except ValidationError as error:
        raise MalformedDelivery(f"the body is not a webhook delivery: {_first(error)}") from None
    if envelope.event not in EVENT_TYPE_EVENTS:
        return None
    try:
        change = EventTypeChange.model_validate(envelope.payload)
    except ValidationError as error:
        raise MalformedDelivery(
            f"the payload of {envelope.event} is not an event type: {_first(error)}"
        ) from None
    return Delivery(event=envelope.event, created_at=envelope.created_at, change=change)


def _first(error: ValidationError) -> str:
    """The first problem, by field path; never the input (it is whatever was posted)."""
    item = error.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in item["loc"]) or "body"
    return f"{where}: {item['msg']}"


def targets(
    change: EventTypeChange,
    *,
    owner: str | None,
    hosts: Iterable[str],
    served: Collection[str],
    all_served: Iterable[str] | None = None,
) -> list[str]:
    """The connection ids to ask for a sync, sorted (see the module docstring).

    `owner`: the connection of `change`'s owner, if one; `hosts`: connections holding a link of the
    event type; `served`: which of those candidates the subscription serves (the caller may pass
    only the candidates it checked); `all_served`: every connection the subscription serves, read
    only for a team type no connection holds yet (None: not read, nobody extra is asked).
    """
    held_by = {c for c in hosts if c in served} if change.is_team else set()
    chosen = held_by | ({owner} & set(served) if owner is not None else set())
    if change.is_team and not held_by and all_served is not None:
        chosen |= set(all_served)
    return sorted(chosen)


def needs_fan_out(change: EventTypeChange, served_hosts: Collection[str]) -> bool:
    """Whether every connection the subscription serves may host it: a team type that none of
    them holds yet (`served_hosts`: the holders the subscription serves). For an organization
    the caller hands that to a task (`closesync.worker.webhook_asks`), never reads it inline."""
    return change.is_team and not served_hosts
