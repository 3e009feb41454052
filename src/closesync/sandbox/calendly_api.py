"""The Calendly API emulator: users, event types and organization memberships.

Serves GET /users/me, /users/{uuid}, /event_types, /event_types/{uuid} and
/organization_memberships with every field api-facts.md lists (shapes validated against the
2023 OpenAPI spec by the contract test), plus /webhook_subscriptions (webhooks_api.py) and the
OAuth endpoints from oauth_api.py.

Every authenticated answer carries X-RateLimit-Limit/-Remaining/-Reset (whole seconds until
the per-user one-minute window ends); an exhausted budget answers 429 with the Calendly
error body. Documented choices (unknown in the docs): 429s carry no Retry-After (clients
must read X-RateLimit-Reset); unauthenticated answers carry no rate-limit headers; listing
rules are those in event_types.py; a plain member may list only their own event types, an
owner or admin any member's or the organization's; `count` outside 1..100 is a 400.

As Calendly's current API document has it (where it differs from the 2023 copy): a token
without the endpoint's scope gets 403 "Insufficient scope" with `required_scopes` (a list);
`sort` takes comma-separated `field[:asc|desc]` terms over name, position, created_at and
updated_at (direction asc when left out); any other field or direction is a 400.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from closesync.sandbox.calendly_http import (
    calendly_error,
    forbidden,
    insufficient_scope,
    invalid,
    not_found,
    paged,
    paging_of,
)
from closesync.sandbox.event_types import SORT_FIELDS
from closesync.sandbox.oauth_api import add_calendly_oauth
from closesync.sandbox.ratelimit import calendly_headers
from closesync.sandbox.routing import Request, Response, Router, json_response
from closesync.sandbox.tokens import Token
from closesync.sandbox.webhooks_api import add_webhook_subscriptions
from closesync.sandbox.world import World

Guarded = Callable[[Request, Token], Response]
_ADMINS = ("owner", "admin")


def parse_sort(text: str) -> list[tuple[str, bool]] | None:
    """`sort` as (field, descending) terms; None when a field or direction is not Calendly's."""
    order = []
    for term in text.split(","):
        field, _, direction = term.strip().partition(":")
        if field not in SORT_FIELDS or direction not in ("", "asc", "desc"):
            return None
        order.append((field, direction == "desc"))
    return order


class CalendlyApi:
    """Handlers of the Calendly resource endpoints."""

    def __init__(self, world: World) -> None:
        self.world = world

    def guard(self, scope: str, handler: Guarded) -> Callable[[Request], Response]:
        """Authenticate, rate limit and check scope before `handler`."""

        def guarded(request: Request) -> Response:
            world = self.world
            scheme, _, value = (request.header("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                return calendly_error(401, "Unauthenticated", "The access token is invalid")
            with world.lock:
                token = world.tokens.check(
                    "calendly", value.strip(), ("pat", "access"), world.clock.now()
                )
            if token == "expired":
                return calendly_error(401, "Unauthenticated", "The access token is expired")
            if isinstance(token, str):
                return calendly_error(401, "Unauthenticated", "The access token is invalid")
            limit = world.config.calendly_rate_limit
            verdict = world.hit_rate([(("calendly", token.user), limit)], 60.0)
            if not verdict.allowed:
                response = calendly_error(
                    429, "Too Many Requests", "You have exceeded the rate limit. Try again later."
                )
            elif not world.has_scope(token, scope):
                response = insufficient_scope(scope)
            else:
                response = handler(request, token)
            response.headers.update(calendly_headers(verdict))
            return response

        return guarded

    def user(self, request: Request, token: Token) -> Response:
        """GET /users/me and /users/{uuid}."""
        uuid = request.params.get("uuid", "me")
        found = self.world.calendly_user(token.user if uuid == "me" else uuid)
        return json_response(200, {"resource": found}) if found else not_found()

    def _page(
        self, request: Request, items: list[dict[str, Any]], count: int, offset: int
    ) -> Response:
        return paged(self.world.calendly_base, request, items, count, offset)

    def list_event_types(self, request: Request, token: Token) -> Response:
        """GET /event_types?user=|organization=&active=&count=&page_token=&sort=."""
        world = self.world
        paging = paging_of(request)
        if isinstance(paging, Response):
            return paging
        active_arg = request.arg("active")
        if active_arg not in (None, "true", "false"):
            return invalid("active", "must be true or false")
        order = parse_sort(request.arg("sort") or "name:asc")
        if order is None:
            fields = ", ".join(SORT_FIELDS)
            return invalid("sort", f"supported fields are: {fields}; directions: asc, desc")
        role = world.calendly_role(token.user)
        user_uri, org_uri = request.arg("user"), request.arg("organization")
        user_uuid: str | None = None
        if user_uri:
            prefix = f"{world.calendly_base}/users/"
            user_uuid = user_uri[len(prefix) :] if user_uri.startswith(prefix) else ""
            if world.calendly_role(user_uuid) is None:
                return forbidden("This user is not in your organization")
            if user_uuid != token.user and role not in _ADMINS:
                return forbidden()
        elif org_uri:
            if org_uri != world.calendly_org_uri:
                return forbidden("You do not have permission to access this resource.")
            if role not in _ADMINS:
                return forbidden()
        else:
            return invalid("user", "user or organization is required")
        active = None if active_arg is None else active_arg == "true"
        items = world.list_event_types(user_uuid, active, order)
        return self._page(request, items, *paging)

    def get_event_type(self, request: Request, token: Token) -> Response:
        """GET /event_types/{uuid}; deleted types still answer, with deleted_at."""
        found = self.world.get_event_type(request.params["uuid"])
        return json_response(200, {"resource": found}) if found else not_found()

    def memberships(self, request: Request, token: Token) -> Response:
        """GET /organization_memberships?organization=|user=&email=&count=&page_token=."""
        world = self.world
        paging = paging_of(request)
        if isinstance(paging, Response):
            return paging
        org_uri, user_uri = request.arg("organization"), request.arg("user")
        if org_uri is None and user_uri is None:
            return invalid("organization", "organization or user is required")
        if org_uri is not None and org_uri != world.calendly_org_uri:
            return forbidden("This user is not in your organization")
        items = world.memberships(request.arg("email"))
        if user_uri is not None:
            items = [m for m in items if m["user"]["uri"] == user_uri]
        return self._page(request, items, *paging)


def build_calendly_router(world: World) -> Router:
    """Every Calendly route, OAuth included."""
    api = CalendlyApi(world)
    router = Router()
    router.add("GET", "/users/me", api.guard("users:read", api.user))
    router.add("GET", "/users/{uuid}", api.guard("users:read", api.user))
    router.add("GET", "/event_types", api.guard("event_types:read", api.list_event_types))
    router.add("GET", "/event_types/{uuid}", api.guard("event_types:read", api.get_event_type))
    router.add("GET", "/organization_memberships", api.guard("organizations:read", api.memberships))
    add_webhook_subscriptions(router, world, api.guard)
    add_calendly_oauth(router, world)
    return router
