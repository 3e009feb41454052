"""Ready-made closesync connections and settings for sandbox users (demo, tests, benchmarks).

A sandbox user pair already has every credential closesync needs; this turns one into the
Connection and Grants that `closesync connections add` would store, and gives the settings that
point closesync at a running sandbox. It belongs to the sandbox because only the sandbox can
vouch for these tokens.
"""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr

from closesync.core.connection import Connection, Grant, Grants, new_connection_id
from closesync.sandbox.config import (
    CALENDLY_CLIENT_ID,
    CALENDLY_CLIENT_SECRET,
    CLOSE_CLIENT_ID,
    CLOSE_CLIENT_SECRET,
)
from closesync.sandbox.records import SeededUser
from closesync.sandbox.server import Sandbox

# Seconds the stored Close access token is taken to live from `now` (the sandbox's is 3600).
CLOSE_TOKEN_LIFETIME = 3000.0


def sandbox_connection(
    user: SeededUser, now: float, *, connection_id: str | None = None, name: str | None = None
) -> tuple[Connection, Grants]:
    """The connection and grants of `user`: Close OAuth grant, Calendly personal token."""
    connection = Connection(
        id=connection_id or new_connection_id(),
        name=name or user.email,
        close_user_id=user.close_user_id,
        close_organization_id=user.close_organization_id,
        close_email=user.email,
        calendly_user_uri=user.calendly_user_uri,
        calendly_organization_uri=user.calendly_organization_uri,
        calendly_email=user.email,
        created_at=now,
        updated_at=now,
    )
    grants = Grants(
        close=Grant(
            kind="oauth",
            access_token=SecretStr(user.close_access_token),
            refresh_token=SecretStr(user.close_refresh_token),
            expires_at=now + CLOSE_TOKEN_LIFETIME,
        ),
        calendly=Grant(kind="pat", access_token=SecretStr(user.calendly_token)),
    )
    return connection, grants


def sandbox_settings(sandbox: Sandbox) -> dict[str, Any]:
    """Settings values (field names) pointing closesync's API URLs and OAuth apps at `sandbox`."""
    return {
        "close_api_url": sandbox.close_api_url,
        "close_oauth_url": sandbox.close_oauth_url,
        "calendly_api_url": sandbox.calendly_api_url,
        "calendly_auth_url": sandbox.calendly_auth_url,
        "close_client_id": CLOSE_CLIENT_ID,
        "close_client_secret": CLOSE_CLIENT_SECRET,
        "calendly_client_id": CALENDLY_CLIENT_ID,
        "calendly_client_secret": CALENDLY_CLIENT_SECRET,
    }
