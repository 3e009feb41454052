"""CalendlyClient and CalendlyOAuth over real loopback HTTP against the sandbox."""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import parse_qs, urlencode, urlparse

import pytest
import requests

from closesync.apis.calendly.client import CalendlyClient, CalendlyOAuth
from closesync.apis.oauth_tokens import token_http
from closesync.core.errors import (
    AuthFailed,
    BadResponse,
    GrantRevoked,
    NotFound,
    PaginationError,
    TransientError,
)
from closesync.sandbox import CALENDLY_CLIENT_ID, CALENDLY_CLIENT_SECRET, Sandbox
from tests._sandbox import FakeClock, api_http, scripted_server

REDIRECT_URI = "https://closesync.example/oauth/calendly/callback"


def _client(
    sb: Sandbox, fake: FakeClock, token: str | None = None, max_attempts: int = 5
) -> CalendlyClient:
    value = token or sb.users[0].calendly_token
    http = api_http("Calendly", sb.calendly_api_url, fake, max_attempts=max_attempts)
    return CalendlyClient(http, lambda: value)


def _oauth(sb: Sandbox) -> CalendlyOAuth:
    return CalendlyOAuth(
        token_http("Calendly", sb.calendly_auth_url), CALENDLY_CLIENT_ID, CALENDLY_CLIENT_SECRET
    )


def _authorize(sb: Sandbox, verifier: str | None = None) -> str:
    """Walk the sandbox's authorize endpoint and return the code from the redirect."""
    query = {"client_id": CALENDLY_CLIENT_ID, "response_type": "code", "redirect_uri": REDIRECT_URI}
    if verifier is not None:
        digest = hashlib.sha256(verifier.encode()).digest()
        query["code_challenge"] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        query["code_challenge_method"] = "S256"
    url = f"{sb.calendly_auth_url}/oauth/authorize?{urlencode(query)}"
    response = requests.get(url, allow_redirects=False, timeout=5)
    assert response.status_code in (302, 303), response.text
    location = urlparse(response.headers["Location"])
    return parse_qs(location.query)["code"][0]


def _listing_requests(sb: Sandbox) -> int:
    counts = sb.world.request_counts()
    return sum(n for key, n in counts.items() if key.startswith("calendly GET /event_types"))


# --- CalendlyClient ---------------------------------------------------------------------------


def test_get_current_user_pat_returns_the_user(sb: Sandbox, fake: FakeClock) -> None:
    """GET /users/me answers the token's user, with its organization."""
    user = _client(sb, fake).get_current_user()
    assert user.uri == sb.users[0].calendly_user_uri
    assert user.email == sb.users[0].email
    assert user.current_organization


def test_get_current_user_sends_the_current_token_each_call(sb: Sandbox, fake: FakeClock) -> None:
    """The token callable is read per request, so a swapped token takes effect at once."""
    tokens = [sb.users[0].calendly_token]
    client = CalendlyClient(api_http("Calendly", sb.calendly_api_url, fake), lambda: tokens[-1])
    assert client.get_current_user().uri == sb.users[0].calendly_user_uri
    tokens.append(sb.users[1].calendly_token)
    assert client.get_current_user().uri == sb.users[1].calendly_user_uri


def test_list_event_types_seeded_user_returns_every_type(sb: Sandbox, fake: FakeClock) -> None:
    """One page holds the seeded user's types, team types included, none invalid."""
    user = sb.users[0]
    listing = _client(sb, fake).list_event_types(user.calendly_user_uri)
    expected = sb.world.list_event_types(user.calendly_user_uuid, None)
    assert sorted(et.uri for et in listing.event_types) == sorted(e["uri"] for e in expected)
    assert listing.invalid == []
    assert listing.pages == 1


def test_list_event_types_250_types_follows_three_pages(sb: Sandbox, fake: FakeClock) -> None:
    """A user with 250+ types is read in pages of 100, every type once, one request per page."""
    user = sb.users[0]
    for n in range(250):
        sb.world.create_event_type(user.calendly_user_uuid, name=f"Bulk {n:03d}")
    expected = sb.world.list_event_types(user.calendly_user_uuid, None)
    sb.world.reset_request_counts()
    listing = _client(sb, fake).list_event_types(user.calendly_user_uri)
    uris = [et.uri for et in listing.event_types]
    assert len(uris) == len(set(uris)) == len(expected)
    assert listing.pages == (len(expected) + 99) // 100 == 3
    assert _listing_requests(sb) == 3


def test_list_event_types_failing_page_two_raises_nothing_partial(
    sb: Sandbox, fake: FakeClock
) -> None:
    """A page that keeps failing raises; no partial listing is handed back."""
    user = sb.users[0]
    for n in range(150):
        sb.world.create_event_type(user.calendly_user_uuid, name=f"Bulk {n:03d}")
    sb.world.add_fault(api="calendly", kind="500", page=2, count=10)
    client = _client(sb, fake, max_attempts=2)
    with pytest.raises(TransientError, match=r"^Calendly GET /event_types answered 500"):
        client.list_event_types(user.calendly_user_uri)


def test_list_event_types_transient_page_two_retried_completes(
    sb: Sandbox, fake: FakeClock
) -> None:
    """One 502 on page 2 is retried inline and the listing still completes."""
    user = sb.users[0]
    for n in range(150):
        sb.world.create_event_type(user.calendly_user_uuid, name=f"Bulk {n:03d}")
    sb.world.add_fault(api="calendly", kind="502", page=2)
    listing = _client(sb, fake).list_event_types(user.calendly_user_uri)
    assert listing.pages == 2
    assert len(listing.event_types) == len(sb.world.list_event_types(user.calendly_user_uuid, None))
    assert fake.sleeps == [0.5]


def test_list_event_types_not_json_page_raises_bad_response(sb: Sandbox, fake: FakeClock) -> None:
    """A 200 that is not JSON is a BadResponse naming the endpoint."""
    sb.world.add_fault(api="calendly", kind="not_json", count=10)
    with pytest.raises(
        BadResponse, match=r"^Calendly GET /event_types answered 200 with a non-JSON"
    ):
        _client(sb, fake, max_attempts=1).list_event_types(sb.users[0].calendly_user_uri)


def test_list_event_types_expired_token_raises_auth_failed(sb: Sandbox, fake: FakeClock) -> None:
    """An expired OAuth access token is refused with AuthFailed, the token not in the message."""
    token = _oauth(sb).exchange_code(_authorize(sb), REDIRECT_URI).access_token
    response = requests.post(
        f"{sb.calendly_api_url}/_sandbox/tokens/expire", json={"token": token}, timeout=5
    )
    assert response.ok, response.text
    with pytest.raises(AuthFailed) as caught:
        _client(sb, fake, token=token).list_event_types(sb.users[0].calendly_user_uri)
    assert caught.value.message.startswith("Calendly GET /event_types answered 401")
    assert token not in str(caught.value)
    assert token not in repr(caught.value)


def test_get_event_type_known_uuid_returns_it(sb: Sandbox, fake: FakeClock) -> None:
    """GET /event_types/{uuid} answers the type."""
    user = sb.users[0]
    created = sb.world.create_event_type(user.calendly_user_uuid, name="Deep Dive", duration=45)
    uuid = created["uri"].rsplit("/", 1)[-1]
    event_type = _client(sb, fake).get_event_type(uuid)
    assert (event_type.uri, event_type.name, event_type.duration) == (
        created["uri"],
        "Deep Dive",
        45,
    )


def test_get_event_type_soft_deleted_returns_deleted_at(sb: Sandbox, fake: FakeClock) -> None:
    """A deleted type can still be fetched, with deleted_at set."""
    created = sb.world.create_event_type(sb.users[0].calendly_user_uuid, name="Gone Soon")
    uuid = created["uri"].rsplit("/", 1)[-1]
    sb.world.delete_event_type(uuid)
    assert _client(sb, fake).get_event_type(uuid).deleted_at is not None


def test_get_event_type_unknown_uuid_raises_not_found(sb: Sandbox, fake: FakeClock) -> None:
    """A purged or unknown type is NotFound, named by the endpoint template."""
    with pytest.raises(NotFound) as caught:
        _client(sb, fake).get_event_type("00000000-0000-4000-a000-000000000000")
    assert caught.value.endpoint == "/event_types/{uuid}"
    assert caught.value.message.startswith("Calendly GET /event_types/{uuid} answered 404")


def test_iter_organization_memberships_all_and_by_email(sb: Sandbox, fake: FakeClock) -> None:
    """Memberships list every seeded user; the email filter narrows to one."""
    client = _client(sb, fake)
    org = client.get_current_user().current_organization
    assert org is not None
    emails = {m.user.email for m in client.iter_organization_memberships(org)}
    assert emails == {u.email for u in sb.users}
    only = list(client.iter_organization_memberships(org, email=sb.users[1].email))
    assert [m.user.uri for m in only] == [sb.users[1].calendly_user_uri]


# --- shapes the sandbox does not produce: a scripted loopback server --------------------------

_ET = "https://api.calendly.com/event_types/"


def _page(items: list[object], token: str | None) -> dict[str, object]:
    return {"collection": items, "pagination": {"count": len(items), "next_page_token": token}}


def test_list_event_types_repeated_page_token_raises_pagination_error() -> None:
    """A page token seen twice stops the listing with PaginationError instead of looping."""
    with scripted_server() as server:
        server.queue(
            _page([{"uri": _ET + "a", "active": True}], "t1"),
            _page([{"uri": _ET + "b", "active": True}], "t2"),
            _page([{"uri": _ET + "c", "active": True}], "t1"),
        )
        client = CalendlyClient(api_http("Calendly", server.url, FakeClock()), lambda: "tok")
        with pytest.raises(PaginationError) as caught:
            client.list_event_types("https://api.calendly.com/users/u")
    assert caught.value.message == (
        "Calendly GET /event_types repeated a page token; the listing is incomplete"
    )
    assert len(server.requests) == 3
    assert "page_token=t2" in server.requests[2]
    assert "count=100" in server.requests[0]


def test_list_event_types_invalid_item_kept_apart_listing_completes() -> None:
    """An item that fails validation is reported with its uri; the others are returned."""
    with scripted_server() as server:
        server.queue(
            _page([{"uri": _ET + "a", "active": True}, {"uri": _ET + "b"}], "t1"),
            _page([{"name": "no uri", "active": "maybe"}], None),
        )
        client = CalendlyClient(api_http("Calendly", server.url, FakeClock()), lambda: "tok")
        listing = client.list_event_types("https://api.calendly.com/users/u")
    assert [et.uri for et in listing.event_types] == [_ET + "a"]
    assert [item.uri for item in listing.invalid] == [_ET + "b", None]
    assert listing.invalid[0].error == "active: Field required"
    assert "uri: Field required" in listing.invalid[1].error
    assert listing.pages == 2


def test_list_event_types_wrong_envelope_raises_bad_response() -> None:
    """A page that is not {collection, pagination} is a BadResponse with a short summary."""
    with scripted_server() as server:
        server.queue({"data": [{"uri": _ET + "a", "active": True}], "secret": "tok-in-body"})
        client = CalendlyClient(api_http("Calendly", server.url, FakeClock()), lambda: "tok")
        with pytest.raises(BadResponse) as caught:
            client.list_event_types("https://api.calendly.com/users/u")
    assert caught.value.message == (
        "Calendly GET /event_types answered 200 with an unexpected body: "
        "collection: Field required; pagination: Field required"
    )
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


# --- CalendlyOAuth ----------------------------------------------------------------------------


def test_calendly_oauth_exchange_code_with_pkce_returns_tokens(
    sb: Sandbox, fake: FakeClock
) -> None:
    """A code from the authorize redirect and its PKCE verifier buy a working access token."""
    verifier = "v" * 64
    code = _authorize(sb, verifier)
    tokens = _oauth(sb).exchange_code(code, REDIRECT_URI, code_verifier=verifier)
    assert tokens.refresh_token
    assert tokens.owner == sb.users[0].calendly_user_uri
    user = _client(sb, fake, token=tokens.access_token).get_current_user()
    assert user.uri == sb.users[0].calendly_user_uri


def test_calendly_oauth_exchange_code_twice_raises_grant_revoked(sb: Sandbox) -> None:
    """An authorization code is single-use: the second exchange is invalid_grant."""
    code = _authorize(sb)
    oauth = _oauth(sb)
    oauth.exchange_code(code, REDIRECT_URI)
    with pytest.raises(GrantRevoked) as caught:
        oauth.exchange_code(code, REDIRECT_URI)
    assert code not in str(caught.value)


def test_calendly_oauth_refresh_rotates_old_token_refused(sb: Sandbox) -> None:
    """A refresh works once; presenting the spent refresh token again is GrantRevoked."""
    oauth = _oauth(sb)
    first = oauth.exchange_code(_authorize(sb), REDIRECT_URI)
    assert first.refresh_token is not None
    second = oauth.refresh(first.refresh_token)
    assert second.refresh_token not in (None, first.refresh_token)
    with pytest.raises(GrantRevoked) as caught:
        oauth.refresh(first.refresh_token)
    assert isinstance(caught.value, AuthFailed)
    assert caught.value.message == (
        "Calendly POST /oauth/token refused the refresh token (invalid_grant): "
        "the user must authorize again"
    )
    assert first.refresh_token not in repr(caught.value)


def test_calendly_oauth_revoke_access_token_is_refused_after(sb: Sandbox, fake: FakeClock) -> None:
    """A revoked access token no longer works."""
    oauth = _oauth(sb)
    tokens = oauth.exchange_code(_authorize(sb), REDIRECT_URI)
    oauth.revoke(tokens.access_token)
    with pytest.raises(AuthFailed) as caught:
        _client(sb, fake, token=tokens.access_token).get_current_user()
    assert tokens.access_token not in str(caught.value)


def test_calendly_oauth_retrying_http_is_refused() -> None:
    """An ApiHttp that would retry a token call is refused at construction."""
    http = api_http("Calendly", "http://127.0.0.1:9", FakeClock())
    with pytest.raises(ValueError, match="max_attempts=1"):
        CalendlyOAuth(http, "id", "secret")


def test_calendly_oauth_timeout_is_not_retried(sb: Sandbox) -> None:
    """A refresh that fails in transit is tried once only: a retry could burn the new token."""
    sb.world.add_fault(api="calendly", kind="502", count=3)
    with pytest.raises(TransientError):
        _oauth(sb).refresh("cal_rt_whatever")
    counts = sb.world.request_counts()
    assert sum(n for key, n in counts.items() if "/oauth/token" in key) <= 1
    assert len(sb.world.list_faults()) == 1
    assert sb.world.list_faults()[0]["count"] == 2


def test_calendly_oauth_repr_hides_the_secret(sb: Sandbox) -> None:
    """The client secret is not in the OAuth client's repr, nor the token field in the client's."""
    assert CALENDLY_CLIENT_SECRET not in repr(_oauth(sb))
    client = CalendlyClient(api_http("Calendly", sb.calendly_api_url, FakeClock()), lambda: "x")
    assert "token=" not in repr(client)
