"""The sandbox's stored records and how each one renders as its vendor's JSON.

Records hold only what the emulators need; rendering adds the vendor's URI layout and the
constant fields (colours, booking method, custom questions) so that responses carry every
field api-facts.md lists. Records never render themselves with a lock held elsewhere: the
World copies what it needs under its lock and calls these pure functions.

Every event type renders a profile object, as Calendly's current API document requires (the
2023 copy let it be null): team types a profile of type Team named after the team, whose
`owner` is the user who created the type; every other type a User profile of its owner.
Documented choice (what a one-off meeting's profile holds is not documented): one-off meetings
(`AdhocEventType`) get their host's User profile like any other type.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

JSON = dict[str, Any]

_KIND_DESCRIPTIONS = {"round_robin": "Round Robin", "collective": "Collective"}


def iso(ts: float) -> str:
    """Calendly's timestamp format, e.g. 2020-01-02T03:04:05.678123Z."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class CalendlyUser:
    """A Calendly user; all of them belong to the sandbox's one organization."""

    uuid: str
    name: str
    slug: str
    email: str
    role: str  # owner | admin | user
    membership_uuid: str
    created_at: float
    updated_at: float
    timezone: str = "America/New_York"


@dataclass
class EventType:
    """A Calendly event type; `members` are the users whose listings include it."""

    uuid: str
    owner_uuid: str
    name: str | None
    slug: str
    duration: int
    created_at: float
    updated_at: float
    active: bool = True
    secret: bool = False
    kind: str = "solo"  # solo | group
    pooling_type: str | None = None  # round_robin | collective | multi_pool | None
    type: str = "StandardEventType"  # StandardEventType | AdhocEventType
    description: str | None = None
    internal_note: str | None = None
    color: str = "#8247f5"
    deleted_at: float | None = None
    team_name: str | None = None
    position: int = 0
    members: list[str] = field(default_factory=list)

    @property
    def shared(self) -> bool:
        """Team (round robin, collective) types are listed under every member."""
        return self.pooling_type is not None


@dataclass
class CloseUser:
    """A Close user of the sandbox's one Close organization."""

    id: str
    email: str
    first_name: str
    last_name: str
    organization_id: str
    membership_id: str
    # Other organizations the user also belongs to, id -> name (`World.join_close_organization`).
    other_organizations: dict[str, str] = field(default_factory=dict)


@dataclass
class Link:
    """A Close scheduling link of any source (MANUAL, THIRD_PARTY, CALENDLY)."""

    id: str
    user_id: str
    organization_id: str
    source: str
    name: str
    url: str
    oauth_client_id: str | None = None
    source_id: str | None = None
    source_type: str | None = None
    duration_in_minutes: int | None = None
    description: str | None = None
    type: str = "USER"


@dataclass(frozen=True)
class SeededUser:
    """One user present on both sides with every credential a test or a demo needs."""

    email: str
    name: str
    calendly_user_uuid: str
    calendly_user_uri: str
    calendly_token: str
    close_user_id: str
    close_organization_id: str
    close_access_token: str
    close_refresh_token: str
    # Additions beyond the brief: a Close API key (to prove it is refused where OAuth is
    # required) and the Calendly organization URI (for organization= listings).
    close_api_key: str = ""
    calendly_organization_uri: str = ""


def render_calendly_user(user: CalendlyUser, base: str, org_uuid: str) -> JSON:
    """A Calendly `User` resource."""
    return {
        "uri": f"{base}/users/{user.uuid}",
        "name": user.name,
        "slug": user.slug,
        "email": user.email,
        "scheduling_url": f"https://calendly.com/{user.slug}",
        "timezone": user.timezone,
        "avatar_url": None,
        "created_at": iso(user.created_at),
        "updated_at": iso(user.updated_at),
        "current_organization": f"{base}/organizations/{org_uuid}",
        "resource_type": "User",
        "locale": "en",
    }


def render_membership(user: CalendlyUser, base: str, org_uuid: str) -> JSON:
    """A Calendly `OrganizationMembership`, with the user nested."""
    nested = render_calendly_user(user, base, org_uuid)
    del nested["current_organization"]
    return {
        "uri": f"{base}/organization_memberships/{user.membership_uuid}",
        "role": user.role,
        "user": nested,
        "organization": f"{base}/organizations/{org_uuid}",
        "created_at": iso(user.created_at),
        "updated_at": iso(user.updated_at),
    }


def render_event_type(et: EventType, base: str, owner: CalendlyUser | None) -> JSON:
    """A Calendly `EventType` resource, including fields newer than the 2023 spec."""
    owner_slug = owner.slug if owner else "unknown"
    owner_uri = f"{base}/users/{et.owner_uuid}"
    profile: JSON
    if et.shared:
        profile = {"type": "Team", "name": et.team_name or "Team", "owner": owner_uri}
    else:
        profile = {"type": "User", "name": owner.name if owner else "", "owner": owner_uri}
    page_slug = _team_slug(et.team_name) if et.shared and et.team_name else owner_slug
    if et.kind == "group":
        kind_description = "Group"
    else:
        kind_description = _KIND_DESCRIPTIONS.get(et.pooling_type or "", "One-on-One")
    description_html = None if et.description is None else _to_html(et.description)
    return {
        "uri": f"{base}/event_types/{et.uuid}",
        "name": et.name,
        "active": et.active,
        "booking_method": "instant",
        "slug": et.slug,
        "scheduling_url": f"https://calendly.com/{page_slug}/{et.slug}",
        "duration": et.duration,
        "duration_options": None,
        "kind": et.kind,
        "pooling_type": et.pooling_type,
        "type": et.type,
        "kind_description": kind_description,
        "color": et.color,
        "created_at": iso(et.created_at),
        "updated_at": iso(et.updated_at),
        "internal_note": et.internal_note,
        "description_plain": et.description,
        "description_html": description_html,
        "profile": profile,
        "secret": et.secret,
        "deleted_at": None if et.deleted_at is None else iso(et.deleted_at),
        "admin_managed": False,
        "custom_questions": [],
        "locations": [{"kind": "google_conference"}],
        "position": et.position,
        "locale": "en",
        "is_paid": False,
    }


def render_close_user(user: CloseUser, org_name: str) -> JSON:
    """Close's `GET /me/` body: every organization of the user, whichever the token is for.

    Documented choice (Close documents no order): the organizations the user joined besides
    their first are listed before it, so that a client taking the first one as the token's
    organization is caught; the token response's `organization_id` says which it is for.
    """
    organizations = [*user.other_organizations.items(), (user.organization_id, org_name)]
    return {
        "id": user.id,
        "email": user.email,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "organizations": [{"id": org, "name": name} for org, name in organizations],
        "memberships": [
            {
                "id": user.membership_id if org == user.organization_id else f"{user.id}:{org}",
                "organization_id": org,
                "user_id": user.id,
                "role_id": "admin",
            }
            for org, _ in organizations
        ],
    }


def render_link(link: Link) -> JSON:
    """A Close scheduling link. `template_tag` is an arbitrary but stable sandbox format."""
    return {
        "id": link.id,
        "user_id": link.user_id,
        "organization_id": link.organization_id,
        "oauth_client_id": link.oauth_client_id,
        "source": link.source,
        "source_id": link.source_id,
        "source_type": link.source_type,
        "duration_in_minutes": link.duration_in_minutes,
        "name": link.name,
        "url": link.url,
        "description": link.description,
        "type": link.type,
        "template_tag": "{{scheduling_link." + link.id + "}}",
    }


def _to_html(text: str) -> str:
    paragraphs = [html.escape(p) for p in text.split("\n") if p.strip()]
    return "".join(f"<p>{p}</p>" for p in paragraphs)


def _team_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "team"
