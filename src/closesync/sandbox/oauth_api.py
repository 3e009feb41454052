"""Both vendors' OAuth 2 endpoints: authorize (auto-approved), token, revoke, introspect.

Calendly: GET /oauth/authorize, POST /oauth/token (HTTP Basic client auth or form
credentials), /oauth/revoke, /oauth/introspect; at most `calendly_token_requests_per_minute`
token requests per user per minute (429). Close: GET /oauth2/authorize/, POST /oauth2/token/,
/oauth2/revoke/.

Authorize never shows a page: it redirects at once, approving as the user chosen through
`POST /_sandbox/oauth/next` (for the next authorization only; the first seeded user
otherwise) or answering `error=access_denied` when a denial was requested. A Close user picks
an organization on Close's consent screen: `oauth/next` may name it (`organization_id`, one of
the user's), else it is the user's first; the grant is for that organization, and the token
response's `organization_id` (on refreshes too) says so. Documented
choices: any redirect URI is accepted (Close's HTTPS rule is waived for loopback demos), but
the token request must repeat the one given at authorize time; PKCE accepts S256 only; the
Close token endpoint has no rate limit; token errors are RFC 6749 bodies
`{"error", "error_description"}` with 400 (401 for a bad client).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from closesync.sandbox.config import (
    CALENDLY_CLIENT_ID,
    CALENDLY_CLIENT_SECRET,
    CLOSE_CLIENT_ID,
    CLOSE_CLIENT_SECRET,
)
from closesync.sandbox.routing import Request, Response, Router, json_response, redirect
from closesync.sandbox.tokens import Grant, GrantError
from closesync.sandbox.world import CALENDLY_SCOPE, CLOSE_SCOPE, World

_CLIENTS = {"calendly": (CALENDLY_CLIENT_ID, CALENDLY_CLIENT_SECRET)}
_CLIENTS["close"] = (CLOSE_CLIENT_ID, CLOSE_CLIENT_SECRET)


def _oauth_error(status: int, error: str, description: str) -> Response:
    return json_response(status, {"error": error, "error_description": description})


def _with_params(uri: str, params: dict[str, str]) -> str:
    return uri + ("&" if "?" in uri else "?") + urlencode(params)


def _client(api: str, request: Request, form: dict[str, str]) -> str | None:
    """The authenticated client id (Basic header or form fields), None when wrong."""
    client_id, secret = form.get("client_id"), form.get("client_secret")
    header = request.header("authorization") or ""
    if header.lower().startswith("basic "):
        try:
            decoded = base64.b64decode(header[6:].strip()).decode()
        except ValueError:
            return None
        client_id, _, secret = decoded.partition(":")
    return client_id if (client_id, secret) == _CLIENTS[api] else None


class OAuthEndpoints:
    """The OAuth endpoints of one API."""

    def __init__(self, api: str, world: World, render: Callable[[Grant], dict[str, Any]]):
        self.api = api
        self.world = world
        self.render = render

    def authorize(self, request: Request) -> Response:
        """Auto-approve (or deny) and redirect back with a code."""
        client_id, redirect_uri = request.arg("client_id"), request.arg("redirect_uri")
        if client_id != _CLIENTS[self.api][0]:
            return _oauth_error(400, "invalid_client", "Unknown client_id.")
        if not redirect_uri:
            return _oauth_error(400, "invalid_request", "redirect_uri is required.")
        state = {"state": request.arg("state") or ""} if request.arg("state") is not None else {}
        if request.arg("response_type") != "code":
            return redirect(
                _with_params(redirect_uri, {"error": "unsupported_response_type", **state})
            )
        challenge = request.arg("code_challenge")
        if challenge and (request.arg("code_challenge_method") or "plain") != "S256":
            return redirect(_with_params(redirect_uri, {"error": "invalid_request", **state}))
        user, deny, organization = self.world.take_oauth_next(self.api)
        if deny or user is None:
            return redirect(_with_params(redirect_uri, {"error": "access_denied", **state}))
        default_scope = CALENDLY_SCOPE if self.api == "calendly" else CLOSE_SCOPE
        with self.world.lock:
            code = self.world.tokens.issue_code(
                self.api,
                user,
                client_id,
                redirect_uri,
                challenge,
                request.arg("scope") or default_scope,
                self.world.clock.now() + self.world.config.auth_code_ttl,
                organization=organization,
            )
        return redirect(_with_params(redirect_uri, {"code": code.value, **state}))

    def token(self, request: Request) -> Response:
        """Exchange a code or a refresh token."""
        form = request.form()
        client_id = _client(self.api, request, form)
        if client_id is None:
            return _oauth_error(401, "invalid_client", "Client authentication failed.")
        world, grant_type = self.world, form.get("grant_type")
        config = world.config
        ttl = (
            config.access_token_ttl_calendly
            if self.api == "calendly"
            else config.access_token_ttl_close
        )
        with world.lock:
            if grant_type == "authorization_code":
                owner = world.tokens.code_owner(self.api, form.get("code", ""))
            elif grant_type == "refresh_token":
                owner = world.tokens.refresh_owner(self.api, form.get("refresh_token", ""))
            else:
                return _oauth_error(400, "unsupported_grant_type", f"grant_type {grant_type!r}")
            if owner is not None and self.api == "calendly":
                limit = config.calendly_token_requests_per_minute
                verdict = world.hit_rate([(("calendly-token", owner), limit)], 60.0)
                if not verdict.allowed:
                    body = {"title": "Too Many Requests", "message": "Too many token requests."}
                    return json_response(429, body)
            now = world.clock.now()
            try:
                if grant_type == "authorization_code":
                    grant = world.tokens.redeem_code(
                        self.api,
                        form.get("code", ""),
                        client_id,
                        form.get("redirect_uri"),
                        form.get("code_verifier"),
                        ttl,
                        now,
                    )
                else:
                    grant = world.tokens.rotate(
                        self.api, form.get("refresh_token", ""), client_id, ttl, now
                    )
            except GrantError as exc:
                return _oauth_error(400, exc.error, exc.description)
            return json_response(200, self.render(grant))

    def revoke(self, request: Request) -> Response:
        """Revoke any token of this API (unknown tokens also answer 200, per RFC 7009)."""
        form = request.form()
        if self.api == "calendly" and _client(self.api, request, form) is None:
            return _oauth_error(401, "invalid_client", "Client authentication failed.")
        with self.world.lock:
            token = self.world.tokens.tokens.get(form.get("token", ""))
            if token is not None and token.api == self.api:
                token.revoked = True
        return json_response(200, {})

    def introspect(self, request: Request) -> Response:
        """Calendly's token introspection."""
        form = request.form()
        if _client(self.api, request, form) is None:
            return _oauth_error(401, "invalid_client", "Client authentication failed.")
        world = self.world
        with world.lock:
            checked = world.tokens.check(
                self.api, form.get("token", ""), ("access", "refresh", "pat"), world.clock.now()
            )
            if isinstance(checked, str):
                return json_response(200, {"active": False})
            return json_response(
                200,
                {
                    "active": True,
                    "scope": checked.scope,
                    "client_id": checked.client_id,
                    "token_type": "Bearer",
                    "iat": int(checked.issued_at),
                    "exp": None if checked.expires_at is None else int(checked.expires_at),
                    "owner": f"{world.calendly_base}/users/{checked.user}",
                    "organization": world.calendly_org_uri,
                },
            )


def add_calendly_oauth(router: Router, world: World) -> None:
    """Mount Calendly's OAuth endpoints (CALENDLY_AUTH_URL is the API server itself)."""

    def render(grant: Grant) -> dict[str, Any]:
        return {
            "token_type": "Bearer",
            "access_token": grant.access.value,
            "refresh_token": grant.refresh.value,
            "expires_in": world.config.access_token_ttl_calendly,
            "created_at": int(grant.access.issued_at),
            "scope": grant.access.scope,
            "owner": f"{world.calendly_base}/users/{grant.access.user}",
            "organization": world.calendly_org_uri,
        }

    endpoints = OAuthEndpoints("calendly", world, render)
    router.add("GET", "/oauth/authorize", endpoints.authorize)
    router.add("POST", "/oauth/token", endpoints.token)
    router.add("POST", "/oauth/revoke", endpoints.revoke)
    router.add("POST", "/oauth/introspect", endpoints.introspect)


def add_close_oauth(router: Router, world: World) -> None:
    """Mount Close's OAuth endpoints under /oauth2/."""

    def render(grant: Grant) -> dict[str, Any]:
        return {
            "token_type": "Bearer",
            "access_token": grant.access.value,
            "expires_in": world.config.access_token_ttl_close,
            "refresh_token": grant.refresh.value,
            "scope": grant.access.scope,
            # The organization picked at consent, as Close's token response says it.
            "organization_id": grant.access.organization or world.close_org_id,
            "user_id": grant.access.user,
        }

    endpoints = OAuthEndpoints("close", world, render)
    router.add("GET", "/oauth2/authorize/", endpoints.authorize)
    router.add("POST", "/oauth2/token/", endpoints.token)
    router.add("POST", "/oauth2/revoke/", endpoints.revoke)
