"""A connection: one Close user's OAuth grant paired with one Calendly user. Pure data, no I/O.

Public fields (ids, names, state, per-connection settings) are kept apart from the grants
(tokens), so that listing or printing a connection can never show a token, and so that the store
can encrypt the grants without its callers knowing.
"""

from __future__ import annotations

import secrets
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, SecretStr

from closesync.core.calendly_payloads import User
from closesync.core.close_payloads import Me

# The two sides of a connection (and the two OAuth providers), with their names as users read them.
Side = Literal["close", "calendly"]
SIDE_LABEL: dict[Side, str] = {"close": "Close", "calendly": "Calendly"}


def side_of_api(api: str) -> Side | None:
    """The side an API label (`ApiError.api`: "Close", "Calendly") stands for; None if neither."""
    return next((side for side, label in SIDE_LABEL.items() if label == api), None)


def own_grant_refused(side: Side | None, detail: str) -> str:
    """Why a connection needs re-authorization when its own grant of `side` was refused."""
    if side is None:
        return f"a grant of this connection was refused: {detail}; the user must connect again"
    return (
        f"{SIDE_LABEL[side]} refused this connection's own {SIDE_LABEL[side]} grant: {detail}; "
        "the user must connect again"
    )


def shared_grant_refused(ref: str, detail: str) -> str:
    """Why every connection of an organization waits when its shared Calendly grant was refused."""
    return (
        f"Calendly refused the organization credential {ref} (the shared Calendly grant): "
        f"{detail}; an owner or admin must run `closesync connect --organization` again"
    )


class ConnectionState(StrEnum):
    ACTIVE = "active"  # scheduled and synced
    PAUSED = "paused"  # kept, not scheduled, until `closesync connections resume`
    NEEDS_REAUTH = "needs_reauth"  # a grant was refused; the user must authorize again


def new_connection_id() -> str:
    """A short, stable, printable id (decisions.md): `conn_` + 12 hex."""
    return "conn_" + secrets.token_hex(6)


class Grant(BaseModel):
    """OAuth or personal-access credentials of one side. Tokens are SecretStr: never printed."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["oauth", "pat"] = "oauth"
    access_token: SecretStr
    refresh_token: SecretStr | None = None
    # Unix time (seconds) after which the access token is expired; None = does not expire.
    expires_at: float | None = None

    def revealed(self) -> dict[str, Any]:
        """The grant with its secrets in the clear: only ever handed to a SecretBox to seal."""
        return {
            "kind": self.kind,
            "access_token": self.access_token.get_secret_value(),
            "refresh_token": self.refresh_token.get_secret_value() if self.refresh_token else None,
            "expires_at": self.expires_at,
        }

    def expires_within(self, now: float, margin: float) -> bool:
        """Whether the access token expires before `now + margin`."""
        return self.expires_at is not None and self.expires_at <= now + margin

    def _token_values(self) -> set[str]:
        tokens = (self.access_token, self.refresh_token)
        return {t.get_secret_value() for t in tokens if t is not None}

    def replaced_by(self, new: Grant | None) -> bool:
        """Whether this grant is gone once `new` is stored in its place (they share no token),
        and may be revoked; storing the same tokens again (a rename) replaces nothing."""
        return new is None or not self._token_values() & new._token_values()


class Grants(BaseModel):
    """Both sides' credentials of one connection; stored encrypted, never listed."""

    model_config = ConfigDict(frozen=True)

    close: Grant
    calendly: Grant


class ConnectionOptions(BaseModel):
    """Per-connection overrides of the global mapping settings (None = use the global one)."""

    model_config = ConfigDict(frozen=True)

    include_secret: bool | None = None
    include_one_off: bool | None = None


class Connection(BaseModel):
    """Everything about a connection except its tokens."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str | None = None
    state: ConnectionState = ConnectionState.ACTIVE
    close_user_id: str
    close_organization_id: str | None = None
    close_email: str | None = None
    calendly_user_uri: str
    calendly_organization_uri: str | None = None
    calendly_email: str | None = None
    options: ConnectionOptions = ConnectionOptions()
    created_at: float
    updated_at: float
    # Why the connection left the active state (e.g. which grant was refused), if it did.
    state_reason: str | None = None
    # Calendly organization mode: the id of the shared organization credential this connection
    # reads its Calendly grant from (`closesync.connect.organizations`); None = its own grant.
    calendly_grant_ref: str | None = None

    @property
    def calendly_user_uuid(self) -> str:
        return self.calendly_user_uri.rstrip("/").rsplit("/", 1)[-1]


def connection_from(
    *,
    existing: Connection | None,
    close_user_id: str,
    close_email: str | None,
    close_organization_id: str | None,
    calendly_user_uri: str,
    calendly_email: str | None,
    calendly_organization_uri: str | None,
    name: str | None,
    now: float,
    calendly_grant_ref: str | None = None,
) -> Connection:
    """The connection to store for a Close user who (re)connected a Calendly user.

    `existing` is that Close user's connection, if any: it keeps its id, options and creation
    time, so connecting again updates rather than duplicates. The state becomes active again.
    """
    return Connection(
        id=existing.id if existing else new_connection_id(),
        name=name or (existing.name if existing else None) or close_email,
        state=ConnectionState.ACTIVE,
        close_user_id=close_user_id,
        close_organization_id=close_organization_id,
        close_email=close_email,
        calendly_user_uri=calendly_user_uri,
        calendly_organization_uri=calendly_organization_uri,
        calendly_email=calendly_email,
        options=existing.options if existing else ConnectionOptions(),
        created_at=existing.created_at if existing else now,
        updated_at=now,
        calendly_grant_ref=calendly_grant_ref,
    )


def connection_between(
    existing: Connection | None, me: Me, user: User, *, name: str | None, now: float
) -> Connection:
    """`connection_from` for a Close user (`GET /me/`) and a Calendly user (`GET /users/me`)."""
    return connection_from(
        existing=existing,
        close_user_id=me.id,
        close_email=me.email,
        close_organization_id=me.organization_id,
        calendly_user_uri=user.uri,
        calendly_email=user.email,
        calendly_organization_uri=user.current_organization,
        name=name,
        now=now,
    )
