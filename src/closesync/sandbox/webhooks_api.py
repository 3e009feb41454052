"""The Calendly `/webhook_subscriptions` endpoints: create, list, get and delete.

Served on the Calendly port through the same guard as every Calendly endpoint, so they are
authenticated, rate limited, counted and faultable alike. Creating or deleting needs the
`webhooks:write` scope, reading `webhooks:read`; a subscription to `event_type.*` events
also needs `event_types:read` (api-facts.md). Bodies are checked with pydantic and a bad one
is a 400 in Calendly's error shape naming the parameter; what the rules of who may subscribe
to what are, and what the sandbox chose where Calendly is silent, is in
webhook_subscriptions.py. Listing requires `organization` and `scope` (and `user` for user
scope) and pages exactly like GET /event_types.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError

from closesync.sandbox.calendly_http import (
    calendly_error,
    forbidden,
    insufficient_scope,
    invalid,
    not_found,
    paged,
    paging_of,
)
from closesync.sandbox.routing import Request, Response, Router, json_response
from closesync.sandbox.tokens import Token
from closesync.sandbox.webhook_subscriptions import KNOWN_EVENTS, SubscriptionConflict
from closesync.sandbox.world import World

Guard = Callable[[str, Callable[[Request, Token], Response]], Callable[[Request], Response]]
_ADMINS = ("owner", "admin")
_SCOPES = ("user", "organization", "group")
# The 403 messages are the 2023 document's: this one for an organization or user not the
# caller's; plain "You do not have permission" for a member asking for more than itself.
_NOT_YOURS = "You do not have permission to access this resource."


class CreateSubscription(BaseModel):
    """The POST /webhook_subscriptions body; unknown fields are ignored, as Calendly does."""

    model_config = ConfigDict(extra="ignore")

    url: str | None = None
    events: list[str] | None = None
    organization: str | None = None
    user: str | None = None
    group: str | None = None
    scope: str | None = None
    signing_key: str | None = None


def _pydantic_problem(exc: ValidationError) -> Response:
    error = exc.errors()[0]
    parameter = ".".join(str(part) for part in error["loc"]) or "body"
    return invalid(parameter, str(error["msg"]))


class WebhooksApi:
    """Handlers of /webhook_subscriptions; `guard` is CalendlyApi.guard."""

    def __init__(self, world: World) -> None:
        self.world = world

    def _user_uuid(self, uri: str) -> str | None:
        """The uuid of a user URI of this sandbox, None when it is not one."""
        prefix = f"{self.world.calendly_base}/users/"
        return uri[len(prefix) :] if uri.startswith(prefix) and len(uri) > len(prefix) else None

    def create(self, request: Request, token: Token) -> Response:
        """POST /webhook_subscriptions."""
        world = self.world
        try:
            raw = request.json()
        except ValueError:
            return invalid("body", "must be a JSON object")
        if not isinstance(raw, dict):
            return invalid("body", "must be a JSON object")
        try:
            body = CreateSubscription.model_validate(raw)
        except ValidationError as exc:
            return _pydantic_problem(exc)
        if not body.url:
            return invalid("url", "is required")
        parts = urlsplit(body.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return invalid("url", "must be an http or https URL")
        if not body.events:
            return invalid("events", "is required and must list at least one event")
        unknown = [e for e in body.events if e not in KNOWN_EVENTS]
        if unknown:
            return invalid("events", f"{unknown[0]!r} is not one of: {', '.join(KNOWN_EVENTS)}")
        if body.scope not in _SCOPES:
            return invalid("scope", "must be one of: user, organization, group")
        if body.scope == "group":
            return invalid("scope", "group scope is not emulated by the sandbox")
        if not body.organization:
            return invalid("organization", "is required")
        if body.organization != world.calendly_org_uri:
            return forbidden(_NOT_YOURS)
        if body.signing_key is not None and not body.signing_key:
            return invalid("signing_key", "must not be empty")
        if any(e.startswith("event_type.") for e in body.events) and not world.has_scope(
            token, "event_types:read"
        ):
            return insufficient_scope("event_types:read")
        role = world.calendly_role(token.user)
        user_uuid: str | None = None
        if body.scope == "user":
            if not body.user:
                return invalid("user", "is required for user scope")
            user_uuid = self._user_uuid(body.user)
            if user_uuid is None or world.calendly_role(user_uuid) is None:
                return forbidden(_NOT_YOURS)
            if user_uuid != token.user and role not in _ADMINS:
                return forbidden()
        elif role not in _ADMINS:
            return forbidden()
        try:
            resource = world.create_subscription(
                token.user,
                body.url,
                body.events,
                body.scope,
                user_uuid,
                body.signing_key,
                by_oauth=token.kind == "access",
            )
        except SubscriptionConflict:
            return calendly_error(409, "Already Exists", "Hook with this url already exists")
        return json_response(201, {"resource": resource})

    def list_subscriptions(self, request: Request, token: Token) -> Response:
        """GET /webhook_subscriptions?organization=&scope=[&user=]&count=&page_token=."""
        world = self.world
        paging = paging_of(request)
        if isinstance(paging, Response):
            return paging
        organization, scope = request.arg("organization"), request.arg("scope")
        if not organization:
            return invalid("organization", "is required")
        if scope not in _SCOPES:
            return invalid("scope", "is required: one of user, organization, group")
        if organization != world.calendly_org_uri:
            return forbidden(_NOT_YOURS)
        role = world.calendly_role(token.user)
        user_uuid: str | None = None
        if scope == "user":
            user_uri = request.arg("user")
            if not user_uri:
                return invalid("user", "is required for user scope")
            user_uuid = self._user_uuid(user_uri)
            if user_uuid is None or world.calendly_role(user_uuid) is None:
                return forbidden(_NOT_YOURS)
            if user_uuid != token.user and role not in _ADMINS:
                return forbidden()
        elif role not in _ADMINS:
            return forbidden()
        items = world.list_subscriptions(scope, user_uuid) if scope != "group" else []
        return paged(world.calendly_base, request, items, *paging)

    def _may_see(self, uuid: str, token: Token) -> Response | None:
        """None when `token` may read or delete subscription `uuid`, else the answer."""
        owner = self.world.subscription_owner(uuid)
        if owner is None:
            return not_found()
        user_uuid, creator = owner
        if self.world.calendly_role(token.user) in _ADMINS or token.user in (user_uuid, creator):
            return None
        return forbidden()

    def get(self, request: Request, token: Token) -> Response:
        """GET /webhook_subscriptions/{uuid}."""
        refusal = self._may_see(request.params["uuid"], token)
        if refusal is not None:
            return refusal
        found = self.world.get_subscription(request.params["uuid"])
        return json_response(200, {"resource": found}) if found else not_found()

    def delete(self, request: Request, token: Token) -> Response:
        """DELETE /webhook_subscriptions/{uuid}: 204, or 404 for an unknown one."""
        refusal = self._may_see(request.params["uuid"], token)
        if refusal is not None:
            return refusal
        if not self.world.delete_subscription(request.params["uuid"]):
            return not_found()
        return Response(204)


def add_webhook_subscriptions(router: Router, world: World, guard: Guard) -> None:
    """Mount /webhook_subscriptions behind `guard` (CalendlyApi.guard)."""
    api = WebhooksApi(world)
    router.add("POST", "/webhook_subscriptions", guard("webhooks:write", api.create))
    router.add("GET", "/webhook_subscriptions", guard("webhooks:read", api.list_subscriptions))
    router.add("GET", "/webhook_subscriptions/{uuid}", guard("webhooks:read", api.get))
    router.add("DELETE", "/webhook_subscriptions/{uuid}", guard("webhooks:write", api.delete))
