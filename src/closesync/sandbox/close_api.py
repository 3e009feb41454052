"""The Close API emulator: /me/ and scheduling links, with Close's auth and rate limits.

Base path /api/v1; every path ends in `/` (a path without it is a 404). Auth is an OAuth
Bearer access token or an API key as the HTTP Basic username. Rate limits: one bucket per
endpoint group (method + path template) per token, and an organization-wide bucket of 3x
that per group; every authenticated answer carries `RateLimit: limit=…, remaining=…,
reset=…` for the tighter bucket, and a 429 adds `Retry-After` (whole seconds, rounded up).

Documented choices (unknown in the docs):
- an API key on the integration endpoints gets 403 {"error": …} (authenticated, not allowed),
  so a client must not mistake it for an expired token;
- GET /scheduling_link/ lists only the token user's links, of every source, in creation
  order, honouring `_skip`/`_limit` (default 100; larger limits are capped at 100); with
  `close_lists_organization_links` it lists every link of the token user's organization;
- validation: name required, 1..255 chars, no control characters; url required, http(s);
  description null or at most 4000 chars; duration_in_minutes null or a positive integer;
  source_id required, 1..255 chars, no "/"; failures answer 400 {"errors", "field-errors"};
- DELETE of a missing integration link answers 404 {"error": …};
- PUT/DELETE /scheduling_link/{id}/ only edit MANUAL links (others: 400 {"error": …});
- integration links are stored as sent, unless `SandboxConfig.close_normalises` (`normalised`).
"""

from __future__ import annotations

import base64
import unicodedata
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

from closesync.sandbox.oauth_api import add_close_oauth
from closesync.sandbox.ratelimit import close_header, retry_after
from closesync.sandbox.routing import Request, Response, Router, json_response
from closesync.sandbox.tokens import Token
from closesync.sandbox.world import World

Guarded = Callable[[Request, Token], Response]
BASE = "/api/v1"
MAX_LIMIT = 100
_FIELDS = ("name", "url", "description", "duration_in_minutes", "source_id", "source_type")


def _error(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


def _field_errors(errors: dict[str, str]) -> Response:
    return json_response(400, {"errors": [], "field-errors": errors})


def _check_field(name: str, value: Any) -> str | None:
    """The error for one link field, or None when it is acceptable."""
    if name == "name":
        if not isinstance(value, str) or not value.strip():
            return "This field is required."
        if len(value) > 255:
            return "Ensure this value has at most 255 characters."
        if any(unicodedata.category(c) == "Cc" for c in value):
            return "Control characters are not allowed."
    elif name == "url":
        parts = urlsplit(value) if isinstance(value, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            return "Enter a valid http(s) URL."
    elif name == "description":
        if value is not None and (not isinstance(value, str) or len(value) > 4000):
            return "Ensure this value is null or a string of at most 4000 characters."
    elif name == "duration_in_minutes":
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            return "Ensure this value is null or a positive integer."
    elif name == "source_id":
        if not isinstance(value, str) or not value or "/" in value or len(value) > 255:
            return "A non-empty string of at most 255 characters without '/' is required."
    elif name == "source_type" and value is not None and not isinstance(value, str):
        return "Ensure this value is null or a string."
    return None


def validate_link(body: Any, required: tuple[str, ...]) -> dict[str, Any] | Response:
    """The accepted link fields of a JSON body, or the 400 answer listing what is wrong."""
    if not isinstance(body, dict):
        return json_response(
            400, {"errors": ["The body must be a JSON object."], "field-errors": {}}
        )
    values = {key: body[key] for key in _FIELDS if key in body}
    errors = {key: "This field is required." for key in required if key not in body}
    for key, value in values.items():
        problem = _check_field(key, value)
        if problem:
            errors[key] = problem
    return _field_errors(errors) if errors else values


def normalised(values: dict[str, Any]) -> dict[str, Any]:
    """Accepted link fields as a normalising Close stores them: name, description and source
    type trimmed; a null description as ""; line breaks as CRLF; the URL trimmed and its
    non-ASCII characters percent-encoded (UTF-8)."""
    out = dict(values)
    for key in ("name", "source_type"):
        if isinstance(out.get(key), str):
            out[key] = out[key].strip()
    if "description" in out:
        text = (out["description"] or "").strip().replace("\r\n", "\n")
        out["description"] = text.replace("\n", "\r\n")
    if isinstance(out.get("url"), str):
        out["url"] = quote(out["url"].strip(), safe="".join(map(chr, range(33, 127))))
    return out


class CloseApi:
    """Handlers of the Close endpoints."""

    def __init__(self, world: World) -> None:
        self.world = world

    def guard(self, handler: Guarded, oauth_only: bool = False) -> Callable[[Request], Response]:
        """Authenticate, refuse API keys where OAuth is required, and rate limit."""

        def guarded(request: Request) -> Response:
            world = self.world
            header = request.header("authorization") or ""
            scheme, _, credential = header.partition(" ")
            kinds: tuple[str, ...] = ("access",)
            if scheme.lower() == "basic":
                try:
                    credential = base64.b64decode(credential.strip()).decode().partition(":")[0]
                except ValueError:
                    credential = ""
                kinds = ("api_key",)
            elif scheme.lower() != "bearer":
                return _error(401, "Authentication required: an OAuth token or an API key.")
            with world.lock:
                token = world.tokens.check("close", credential.strip(), kinds, world.clock.now())
            if token == "expired":
                return _error(401, "The access token has expired.")
            if isinstance(token, str):
                return _error(401, "The API key or access token is invalid.")
            if oauth_only and token.kind != "access":
                return _error(
                    403, "This endpoint requires OAuth authentication; API keys are not allowed."
                )
            limit, group = world.config.close_rate_limit, f"{request.method} {request.template}"
            buckets = [
                (("token", token.value, group), limit),
                (("org", world.close_org_id, group), 3 * limit),
            ]
            verdict = world.hit_rate(list(buckets), world.config.close_rate_window)
            if verdict.allowed:
                response = handler(request, token)
            else:
                response = _error(429, "Too many requests, retry after the RateLimit reset.")
                response.headers["Retry-After"] = str(retry_after(verdict.reset))
            response.headers["RateLimit"] = close_header(verdict)
            return response

        return guarded

    def me(self, request: Request, token: Token) -> Response:
        """GET /me/."""
        found = self.world.close_me(token.user)
        return json_response(200, found) if found else _error(404, "User not found.")

    def list_links(self, request: Request, token: Token) -> Response:
        """GET /scheduling_link/?_skip=&_limit=."""
        try:
            skip = int(request.arg("_skip") or 0)
            limit = min(int(request.arg("_limit") or MAX_LIMIT), MAX_LIMIT)
        except ValueError:
            return json_response(
                400, {"errors": ["_skip and _limit must be integers."], "field-errors": {}}
            )
        if skip < 0 or limit < 1:
            return json_response(
                400, {"errors": ["_skip must be >= 0, _limit >= 1."], "field-errors": {}}
            )
        if self.world.config.close_lists_organization_links:
            links = self.world.close_links(organization_of=token.user)
        else:
            links = self.world.close_links(token.user)
        return json_response(
            200, {"data": links[skip : skip + limit], "has_more": skip + limit < len(links)}
        )

    def upsert(self, request: Request, token: Token) -> Response:
        """POST /scheduling_link/integration/: create or update by (app, user, source_id)."""
        try:
            body = request.json()
        except ValueError:
            return json_response(
                400, {"errors": ["The body is not valid JSON."], "field-errors": {}}
            )
        values = validate_link(body, ("source_id", "name", "url"))
        if isinstance(values, Response):
            return values
        if self.world.config.close_normalises:
            values = normalised(values)
        client = token.client_id or ""
        return json_response(200, self.world.upsert_integration_link(client, token.user, values))

    def delete_integration(self, request: Request, token: Token) -> Response:
        """DELETE /scheduling_link/integration/{source_id}/."""
        source_id = request.params["source_id"]
        if self.world.delete_integration_link(token.client_id or "", token.user, source_id):
            return Response(204)
        return _error(404, f"No scheduling link with source_id {source_id} for this application.")

    def create_manual(self, request: Request, token: Token) -> Response:
        """POST /scheduling_link/: a MANUAL link."""
        try:
            body = request.json()
        except ValueError:
            return json_response(
                400, {"errors": ["The body is not valid JSON."], "field-errors": {}}
            )
        values = validate_link(body, ("name", "url"))
        if isinstance(values, Response):
            return values
        return json_response(200, self.world.create_link(token.user, "MANUAL", **values))

    def _own(self, request: Request, token: Token) -> dict[str, Any] | Response:
        link = self.world.get_link(request.params["id"])
        if link is None or link["user_id"] != token.user:
            return _error(404, "Scheduling link not found.")
        return link

    def get_link(self, request: Request, token: Token) -> Response:
        """GET /scheduling_link/{id}/."""
        link = self._own(request, token)
        return link if isinstance(link, Response) else json_response(200, link)

    def put_link(self, request: Request, token: Token) -> Response:
        """PUT /scheduling_link/{id}/ (MANUAL links only)."""
        link = self._own(request, token)
        if isinstance(link, Response):
            return link
        if link["source"] != "MANUAL":
            return _error(400, "Only MANUAL scheduling links can be edited here.")
        try:
            body = request.json()
        except ValueError:
            return json_response(
                400, {"errors": ["The body is not valid JSON."], "field-errors": {}}
            )
        values = validate_link(body, ())
        if isinstance(values, Response):
            return values
        values.pop("source_id", None)
        return json_response(200, self.world.update_link(link["id"], **values))

    def delete_link(self, request: Request, token: Token) -> Response:
        """DELETE /scheduling_link/{id}/ (MANUAL links only)."""
        link = self._own(request, token)
        if isinstance(link, Response):
            return link
        if link["source"] != "MANUAL":
            return _error(400, "Only MANUAL scheduling links can be deleted here.")
        self.world.delete_link(link["id"])
        return Response(204)


def build_close_router(world: World) -> Router:
    """Every Close route, OAuth included."""
    api = CloseApi(world)
    router = Router()
    links = f"{BASE}/scheduling_link/"
    router.add("GET", f"{BASE}/me/", api.guard(api.me))
    router.add("POST", f"{links}integration/", api.guard(api.upsert, oauth_only=True))
    router.add(
        "DELETE",
        f"{links}integration/{{source_id}}/",
        api.guard(api.delete_integration, oauth_only=True),
    )
    router.add("GET", links, api.guard(api.list_links))
    router.add("POST", links, api.guard(api.create_manual))
    router.add("GET", f"{links}{{id}}/", api.guard(api.get_link))
    router.add("PUT", f"{links}{{id}}/", api.guard(api.put_link))
    router.add("DELETE", f"{links}{{id}}/", api.guard(api.delete_link))
    add_close_oauth(router, world)
    return router
