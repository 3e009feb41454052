"""Close over HTTP: the user, the scheduling-link listing, and the integration link endpoints.

Only HTTP lives here; errors are mapped by `closesync.apis.http`. The integration endpoints
(`/scheduling_link/integration/`) accept OAuth bearer tokens only and act on the links of the
OAuth application and the user the token belongs to. Upsert is keyed by `source_id`, so repeating
one is safe; delete answers False for a link that is already gone, so repeating it is safe too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict

from closesync.apis.bodies import parse_body
from closesync.apis.http import ApiHttp
from closesync.apis.oauth_tokens import post_token_call, require_single_attempt
from closesync.core.close_payloads import LinkPayload, Me, SchedulingLink, TokenResponse
from closesync.core.errors import NotFound, PaginationError

API = "Close"
# Close's usual maximum `_limit`.
PAGE_SIZE = 100
# A listing longer than this many pages (100 000 links) is taken as a server paging bug.
MAX_PAGES = 1000

LINKS_ENDPOINT = "/scheduling_link/"
INTEGRATION_ENDPOINT = "/scheduling_link/integration/"
INTEGRATION_ITEM_ENDPOINT = "/scheduling_link/integration/{source_id}/"


class _LinkPage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    data: list[SchedulingLink]
    has_more: bool


@dataclass
class CloseClient:
    """Close's REST API as one user's OAuth token sees it.

    `token` is called before every request, so a refresh elsewhere takes effect on the next call.
    """

    http: ApiHttp
    token: Callable[[], str] = field(repr=False)

    def get_me(self) -> Me:
        """The Close user the token belongs to (`GET /me/`)."""
        value = self._request("GET", "/me/", "/me/")
        return parse_body(Me, value, api=API, method="GET", endpoint="/me/")

    def list_scheduling_links(self) -> list[SchedulingLink]:
        """Every scheduling link the token can list (all sources), paged with `_skip`/`_limit`.

        A page that repeats the previous page's ids, or an empty page that claims more, would
        never end or would double-count: both raise PaginationError.
        """
        links: dict[str, SchedulingLink] = {}
        skip = 0
        previous_ids: list[str] | None = None
        for _ in range(MAX_PAGES):
            params = {"_skip": skip, "_limit": PAGE_SIZE}
            value = self._request("GET", LINKS_ENDPOINT, LINKS_ENDPOINT, params=params)
            page = parse_body(_LinkPage, value, api=API, method="GET", endpoint=LINKS_ENDPOINT)
            ids = [link.id for link in page.data]
            if page.has_more and not ids:
                raise _pagination_error("answered an empty page that claims more")
            if ids == previous_ids:
                raise _pagination_error("repeated the previous page")
            # Offsets shift when a link is created meanwhile: an item seen twice is kept once.
            for link in page.data:
                links.setdefault(link.id, link)
            skip += len(ids)
            if not page.has_more:
                return list(links.values())
            previous_ids = ids
        raise _pagination_error(f"did not end within {MAX_PAGES} pages")

    def upsert_link(self, payload: LinkPayload) -> SchedulingLink:
        """Create or update our application's link with `payload.source_id`; Close answers it."""
        value = self._request(
            "POST", INTEGRATION_ENDPOINT, INTEGRATION_ENDPOINT, json_body=payload.model_dump()
        )
        return parse_body(
            SchedulingLink, value, api=API, method="POST", endpoint=INTEGRATION_ENDPOINT
        )

    def delete_link(self, source_id: str) -> bool:
        """Delete our link with `source_id`: True when deleted, False when it was already gone."""
        if "/" in source_id:
            # Quoted or not, a "/" in a path segment is a routing ambiguity between proxies.
            raise ValueError(f"a source_id must not contain '/': {source_id!r}")
        path = f"{INTEGRATION_ENDPOINT}{quote(source_id, safe='')}/"
        try:
            self._request("DELETE", path, INTEGRATION_ITEM_ENDPOINT)
        except NotFound:
            return False
        return True

    def _request(self, method: str, path: str, endpoint: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token()}"}
        return self.http.request(method, path, endpoint=endpoint, headers=headers, **kwargs)


def _pagination_error(what: str) -> PaginationError:
    return PaginationError(
        f"{API} GET {LINKS_ENDPOINT} {what}; the listing is incomplete",
        api=API,
        method="GET",
        endpoint=LINKS_ENDPOINT,
    )


@dataclass
class CloseOAuth:
    """Close's OAuth token endpoints; the client credentials go in the form body.

    `http` must make every call once (`max_attempts=1`, see `closesync.apis.oauth_tokens`).
    """

    http: ApiHttp
    client_id: str
    client_secret: str = field(repr=False)

    TOKEN_PATH = "/token/"
    REVOKE_PATH = "/revoke/"

    def __post_init__(self) -> None:
        require_single_attempt(self.http)

    def exchange_code(self, code: str, redirect_uri: str) -> TokenResponse:
        """Trade an authorization code for tokens."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        return self._token(form, "authorization code")

    def refresh(self, refresh_token: str) -> TokenResponse:
        """New tokens for a refresh token, which is spent by the call (Close rotates them)."""
        return self._token(
            {"grant_type": "refresh_token", "refresh_token": refresh_token}, "refresh token"
        )

    def revoke(self, token: str) -> None:
        """Revoke an access or refresh token."""
        self.http.request(
            "POST", self.REVOKE_PATH, endpoint=self.REVOKE_PATH, form=self._client({"token": token})
        )

    def _client(self, form: dict[str, str]) -> dict[str, str]:
        return {**form, "client_id": self.client_id, "client_secret": self.client_secret}

    def _token(self, form: dict[str, str], grant: str) -> TokenResponse:
        value = post_token_call(
            self.http, self.TOKEN_PATH, form=self._client(form), auth=None, grant=grant
        )
        return parse_body(TokenResponse, value, api=API, method="POST", endpoint=self.TOKEN_PATH)
