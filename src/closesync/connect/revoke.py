"""Revoking a grant at its provider: what a failed flow, a replaced credential and leaving share.

Best effort by design: a revocation that fails is logged and reported, never raised, since the
caller is already undoing something (a failed step, a removed connection) and must finish that.
"""

from __future__ import annotations

import logging

from closesync.connect.deps import ConnectServices
from closesync.core.connection import SIDE_LABEL, Grant, Side
from closesync.core.errors import ApiError

log = logging.getLogger(__name__)


def revoke_grant(services: ConnectServices, provider: Side, grant: Grant) -> bool:
    """Revoke a grant's tokens at the provider, best effort; whether every call succeeded."""
    oauth = services.close_oauth() if provider == "close" else services.calendly_oauth()
    if oauth is None or grant.kind != "oauth":
        return False
    ok = True
    tokens = [grant.refresh_token, grant.access_token]
    for token in (t for t in tokens if t is not None):
        try:
            oauth.revoke(token.get_secret_value())
        except ApiError as error:
            ok = False
            log.warning("revoking a %s token failed: %s", SIDE_LABEL[provider], error)
    return ok
