"""Calendly over HTTP: the calls closesync makes, their paging, and their payload checks.

Only HTTP lives here. Errors are mapped by `closesync.apis.http`; this module adds the pagination
state machine (a page token seen twice is an error, never a loop) and the shape checks that turn a
body into the models of `closesync.core.calendly_payloads`. A listing of event types is either
complete or an exception: the engine deletes Close links whose event type is missing, so a silently
truncated listing would delete links that should stay. One malformed event type does not fail the
listing; it is returned apart in `EventTypeListing.invalid` so the engine can leave its link alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from closesync.apis.bodies import parse_body, summarize
from closesync.apis.http import ApiHttp
from closesync.apis.oauth_tokens import post_token_call, require_single_attempt
from closesync.core.calendly_payloads import (
    EventType,
    OrganizationMembership,
    TokenResponse,
    User,
    WebhookSubscription,
)
from closesync.core.errors import NotFound, PaginationError

API = "Calendly"
M = TypeVar("M", bound=BaseModel)

# Calendly's maximum page size: fewer calls against a 500-per-minute budget.
PAGE_SIZE = 100
# A listing longer than this many pages (100 000 items) is taken as a server paging bug.
MAX_PAGES = 1000


class _Pagination(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    # Required though nullable: a page that omits the key cannot be told apart from the last one.
    next_page_token: str | None


class _Page(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    collection: list[Any]
    pagination: _Pagination


class _Resource(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    resource: dict[str, Any]


@dataclass(frozen=True)
class InvalidItem:
    """A listed item that failed validation: its `uri` when it had a string one, and why."""

    uri: str | None
    error: str


@dataclass(frozen=True)
class EventTypeListing:
    """Every event type of a user, read to the last page; malformed items kept apart."""

    event_types: list[EventType]
    invalid: list[InvalidItem]
    pages: int


@dataclass
class CalendlyClient:
    """Calendly's REST API as one user's token sees it.

    `token` is called before every request, so a refresh elsewhere takes effect on the next call.
    """

    http: ApiHttp
    token: Callable[[], str] = field(repr=False)

    def get_current_user(self) -> User:
        """The user the token belongs to (`GET /users/me`)."""
        return self._get_resource(User, "/users/me", "/users/me")

    def get_event_type(self, uuid: str) -> EventType:
        """One event type by uuid; NotFound when Calendly does not know it."""
        path = f"/event_types/{quote(uuid, safe='')}"
        return self._get_resource(EventType, path, "/event_types/{uuid}")

    def list_event_types(self, user_uri: str) -> EventTypeListing:
        """All event types of `user_uri`, every page read; any failed page raises."""
        endpoint = "/event_types"
        event_types: list[EventType] = []
        invalid: list[InvalidItem] = []
        pages = 0
        for page in self._pages(endpoint, {"user": user_uri}):
            pages += 1
            for item in page:
                try:
                    event_types.append(EventType.model_validate(item))
                except ValidationError as error:
                    invalid.append(InvalidItem(uri=_uri_of(item), error=summarize(error)))
        return EventTypeListing(event_types=event_types, invalid=invalid, pages=pages)

    def iter_organization_memberships(
        self, organization_uri: str, email: str | None = None
    ) -> Iterator[OrganizationMembership]:
        """Members of an organization (optionally the one with `email`), page by page."""
        endpoint = "/organization_memberships"
        params = {"organization": organization_uri}
        if email is not None:
            params["email"] = email
        for page in self._pages(endpoint, params):
            for item in page:
                yield parse_body(
                    OrganizationMembership, item, api=API, method="GET", endpoint=endpoint
                )

    # -- webhook subscriptions ------------------------------------------------------------------
    # A 409 (a subscription to that URL exists) raises Conflict; a 403 (no `webhooks:write`
    # scope, a plan or role that may not) raises Forbidden: both mapped by `apis.http`.

    def create_webhook_subscription(
        self,
        *,
        url: str,
        events: list[str],
        organization: str,
        scope: Literal["user", "organization"],
        user: str | None = None,
        signing_key: SecretStr | None = None,
    ) -> WebhookSubscription:
        """Subscribe `url` to `events` (`POST /webhook_subscriptions`, 201 with the resource).

        `signing_key`: the key Calendly signs deliveries with (a personal access token's
        subscription); None: the OAuth application's key signs them. Write-only at Calendly.
        """
        endpoint = "/webhook_subscriptions"
        body: dict[str, Any] = {
            "url": url,
            "events": events,
            "organization": organization,
            "scope": scope,
        }
        if user is not None:
            body["user"] = user
        if signing_key is not None:
            body["signing_key"] = signing_key.get_secret_value()
        value = self.http.request(
            "POST", endpoint, endpoint=endpoint, json_body=body, headers=self._headers()
        )
        envelope = parse_body(_Resource, value, api=API, method="POST", endpoint=endpoint)
        return parse_body(
            WebhookSubscription, envelope.resource, api=API, method="POST", endpoint=endpoint
        )

    def list_webhook_subscriptions(
        self,
        *,
        organization: str,
        scope: Literal["user", "organization"],
        user: str | None = None,
    ) -> list[WebhookSubscription]:
        """Every subscription of that organization and scope (and user), every page read."""
        endpoint = "/webhook_subscriptions"
        params = {"organization": organization, "scope": scope}
        if user is not None:
            params["user"] = user
        return [
            parse_body(WebhookSubscription, item, api=API, method="GET", endpoint=endpoint)
            for page in self._pages(endpoint, params)
            for item in page
        ]

    def get_webhook_subscription(self, uuid: str) -> WebhookSubscription:
        """One subscription by uuid; NotFound when Calendly has no such subscription."""
        path = f"/webhook_subscriptions/{quote(uuid, safe='')}"
        return self._get_resource(WebhookSubscription, path, "/webhook_subscriptions/{uuid}")

    def delete_webhook_subscription(self, uuid: str) -> bool:
        """Delete a subscription: True if deleted, False if Calendly said it was already gone.

        Only Calendly's own 404 counts as gone; a 404 page from something in front of it raises.
        """
        endpoint = "/webhook_subscriptions/{uuid}"
        path = f"/webhook_subscriptions/{quote(uuid, safe='')}"
        try:
            self.http.request("DELETE", path, endpoint=endpoint, headers=self._headers())
        except NotFound as error:
            if error.from_api:
                return False
            raise
        return True

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def _get_resource(self, model: type[M], path: str, endpoint: str) -> M:
        value = self.http.request("GET", path, endpoint=endpoint, headers=self._headers())
        envelope = parse_body(_Resource, value, api=API, method="GET", endpoint=endpoint)
        return parse_body(model, envelope.resource, api=API, method="GET", endpoint=endpoint)

    def _pages(self, endpoint: str, params: dict[str, str]) -> Iterator[list[Any]]:
        """The `collection` of each page of a listing, following `next_page_token` to null."""
        seen: set[str] = set()
        token: str | None = None
        for _ in range(MAX_PAGES):
            query: dict[str, Any] = {**params, "count": PAGE_SIZE}
            if token is not None:
                query["page_token"] = token
            value = self.http.request(
                "GET", endpoint, endpoint=endpoint, params=query, headers=self._headers()
            )
            page = parse_body(_Page, value, api=API, method="GET", endpoint=endpoint)
            yield page.collection
            token = page.pagination.next_page_token
            if token is None:
                return
            if token in seen:
                raise _pagination_error(endpoint, "repeated a page token")
            seen.add(token)
        raise _pagination_error(endpoint, f"did not end within {MAX_PAGES} pages")


def _uri_of(item: Any) -> str | None:
    uri = item.get("uri") if isinstance(item, dict) else None
    return uri if isinstance(uri, str) else None


def _pagination_error(endpoint: str, what: str) -> PaginationError:
    return PaginationError(
        f"{API} GET {endpoint} {what}; the listing is incomplete",
        api=API,
        method="GET",
        endpoint=endpoint,
    )


@dataclass
class CalendlyOAuth:
    """Calendly's OAuth token endpoints, with HTTP Basic client authentication.

    `http` must make every call once (`max_attempts=1`, see `closesync.apis.oauth_tokens`).
    """

    http: ApiHttp
    client_id: str
    client_secret: str = field(repr=False)

    TOKEN_PATH = "/oauth/token"
    REVOKE_PATH = "/oauth/revoke"

    def __post_init__(self) -> None:
        require_single_attempt(self.http)

    def exchange_code(
        self, code: str, redirect_uri: str, code_verifier: str | None = None
    ) -> TokenResponse:
        """Trade an authorization code (and its PKCE verifier) for tokens."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        if code_verifier is not None:
            form["code_verifier"] = code_verifier
        return self._token(form, "authorization code")

    def refresh(self, refresh_token: str) -> TokenResponse:
        """New tokens for a refresh token, which is spent by the call (Calendly rotates them)."""
        return self._token(
            {"grant_type": "refresh_token", "refresh_token": refresh_token}, "refresh token"
        )

    def revoke(self, token: str) -> None:
        """Revoke an access or refresh token."""
        self.http.request(
            "POST",
            self.REVOKE_PATH,
            endpoint=self.REVOKE_PATH,
            form={"token": token},
            auth=(self.client_id, self.client_secret),
        )

    def _token(self, form: dict[str, str], grant: str) -> TokenResponse:
        value = post_token_call(
            self.http,
            self.TOKEN_PATH,
            form=form,
            auth=(self.client_id, self.client_secret),
            grant=grant,
        )
        return parse_body(TokenResponse, value, api=API, method="POST", endpoint=self.TOKEN_PATH)
