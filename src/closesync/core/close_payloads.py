"""Close's payloads as closesync reads and writes them: unknown fields ignored. Pure: no I/O."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Organization(_Payload):
    id: str
    name: str | None = None


class Me(_Payload):
    """The Close user a token belongs to (`GET /me/`), and the organization the token is for.

    A user of several organizations picks one on Close's consent screen and the token is scoped
    to it, while `/me/` lists every organization of the user, in no documented order: only the
    token response's `organization_id` says which (`for_token` records it).
    """

    id: str
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    organizations: list[Organization] = []
    # Not a /me/ field: what the token response said (kept when a flow stores this model).
    token_organization_id: str | None = None

    def for_token(self, organization_id: str | None) -> Me:
        """This user, with the organization their token response named."""
        return self.model_copy(update={"token_organization_id": organization_id})

    @property
    def organization_id(self) -> str | None:
        """The token's organization: as the token response said, else the only one /me/ lists;
        None when /me/ lists several and nothing says which."""
        if self.token_organization_id is not None:
            return self.token_organization_id
        return self.organizations[0].id if len(self.organizations) == 1 else None


class SchedulingLink(_Payload):
    """A scheduling link as Close stores it; links of every source share this shape."""

    id: str
    source: str | None = None
    source_id: str | None = None
    source_type: str | None = None
    user_id: str | None = None
    organization_id: str | None = None
    oauth_client_id: str | None = None
    name: str | None = None
    url: str | None = None
    description: str | None = None
    duration_in_minutes: int | None = None


class LinkPayload(_Payload):
    """The body of `POST /scheduling_link/integration/`: what closesync wants one link to be."""

    source_id: str
    name: str
    url: str
    description: str | None
    source_type: str
    duration_in_minutes: int | None


class TokenResponse(_Payload):
    """Answer of Close's token endpoint."""

    access_token: str
    refresh_token: str | None = None
    expires_in: int | None = None
    token_type: str | None = None
    scope: str | None = None
    organization_id: str | None = None
    user_id: str | None = None
