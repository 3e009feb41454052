"""What the Calendly and Close OAuth clients share: one attempt per token call, invalid_grant.

Both APIs rotate refresh tokens: a refresh returns a new one and revokes the old. A refresh that
timed out may still have been applied by the server, so retrying it would present a token that is
already spent and lose the grant. Token calls are therefore made exactly once (`max_attempts=1`);
whoever called decides what to do with a TransientError, knowing the old token may be gone.

An OAuth error body `{"error": "invalid_grant"}` (RFC 6749 §5.2: the code or refresh token is
invalid, expired, revoked or already used) is the one 400 that means "the user must authorize
again"; it becomes `GrantRevoked` here rather than in `closesync.apis.http`, which knows no OAuth.
"""

from __future__ import annotations

from typing import Any

import requests

from closesync.apis.http import DEFAULT_TIMEOUT, ApiHttp, new_session
from closesync.core.errors import GrantRevoked, Rejected
from closesync.core.retry import WaitBudget

INVALID_GRANT = "invalid_grant"


def token_http(
    api: str,
    base_url: str,
    *,
    session: requests.Session | None = None,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
    budget: WaitBudget | None = None,
) -> ApiHttp:
    """An ApiHttp for a token endpoint: the same layer, but every call is tried exactly once."""
    return ApiHttp(
        api=api,
        base_url=base_url,
        session=session if session is not None else new_session(),
        timeout=timeout,
        budget=budget if budget is not None else WaitBudget(60.0),
        max_attempts=1,
    )


def require_single_attempt(http: ApiHttp) -> None:
    """Refuse an ApiHttp that would retry: a retried refresh can burn the rotated token."""
    if http.max_attempts != 1:
        raise ValueError(
            f"{http.api} token calls must not be retried (a refresh token is single-use): "
            f"build the ApiHttp with max_attempts=1, e.g. with closesync.oauth_tokens.token_http"
        )


def is_invalid_grant(error: Rejected) -> bool:
    """Whether a refused token call said `invalid_grant`.

    `raise_for_response` puts the body's `error` field, among the other human parts joined by
    "; ", after the first ": " of its message; the code is matched as a whole part.
    """
    said = error.message.partition(": ")[2]
    return INVALID_GRANT in (part.strip() for part in said.split("; "))


def post_token_call(
    http: ApiHttp,
    path: str,
    *,
    form: dict[str, str],
    auth: tuple[str, str] | None,
    grant: str,
) -> Any:
    """POST a form to a token endpoint once; `invalid_grant` becomes GrantRevoked.

    `grant` says what was refused ("refresh token", "authorization code") for the message; the
    message never contains the token or code itself.
    """
    try:
        return http.request("POST", path, endpoint=path, form=form, auth=auth)
    except Rejected as error:
        if not is_invalid_grant(error):
            raise
        raise GrantRevoked(
            f"{error.api} {error.method} {error.endpoint} refused the {grant} "
            f"(invalid_grant): the user must authorize again",
            api=error.api,
            method=error.method,
            endpoint=error.endpoint,
            status=error.status,
        ) from None
