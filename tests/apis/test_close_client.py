"""CloseClient and CloseOAuth over real loopback HTTP against the sandbox."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlparse

import pytest
import requests

from closesync.apis.close.client import CloseClient, CloseOAuth
from closesync.apis.oauth_tokens import token_http
from closesync.core.close_payloads import LinkPayload
from closesync.core.errors import (
    ApiError,
    AuthFailed,
    BadResponse,
    Forbidden,
    GrantRevoked,
    PaginationError,
    Rejected,
    TransientError,
)
from closesync.sandbox import CLOSE_CLIENT_ID, CLOSE_CLIENT_SECRET, Sandbox
from tests._sandbox import FakeClock, api_http, scripted_server

REDIRECT_URI = "https://closesync.example/oauth/close/callback"


def _client(
    sb: Sandbox, fake: FakeClock, token: str | None = None, max_attempts: int = 5
) -> CloseClient:
    value = token or sb.users[0].close_access_token
    http = api_http("Close", sb.close_api_url, fake, max_attempts=max_attempts)
    return CloseClient(http, lambda: value)


def _oauth(sb: Sandbox) -> CloseOAuth:
    return CloseOAuth(token_http("Close", sb.close_oauth_url), CLOSE_CLIENT_ID, CLOSE_CLIENT_SECRET)


def _payload(source_id: str = "u1:et1", **changes: object) -> LinkPayload:
    values: dict[str, object] = {
        "source_id": source_id,
        "name": "Intro Call",
        "url": "https://calendly.com/ada/intro",
        "description": "Say hello",
        "source_type": "calendly_event_type",
        "duration_in_minutes": 30,
    }
    values.update(changes)
    return LinkPayload.model_validate(values)


def _close_requests(sb: Sandbox, prefix: str) -> int:
    counts = sb.world.request_counts()
    return sum(n for key, n in counts.items() if key.startswith(prefix))


def _authorize(sb: Sandbox) -> str:
    """Walk the sandbox's authorize endpoint and return the code from the redirect."""
    query = {"client_id": CLOSE_CLIENT_ID, "response_type": "code", "redirect_uri": REDIRECT_URI}
    url = f"{sb.close_oauth_url}/authorize/?{urlencode(query)}"
    response = requests.get(url, allow_redirects=False, timeout=5)
    assert response.status_code in (302, 303), response.text
    return parse_qs(urlparse(response.headers["Location"]).query)["code"][0]


# --- CloseClient ------------------------------------------------------------------------------


def test_get_me_oauth_token_returns_user_and_organization(sb: Sandbox, fake: FakeClock) -> None:
    """GET /me/ answers the token's user and its organization."""
    me = _client(sb, fake).get_me()
    assert me.id == sb.users[0].close_user_id
    assert me.organization_id == sb.users[0].close_organization_id


def test_get_me_expired_token_raises_auth_failed_without_token(
    sb: Sandbox, fake: FakeClock
) -> None:
    """An expired access token is AuthFailed, and the token never shows in the error."""
    token = sb.users[0].close_access_token
    response = requests.post(
        f"{sb.world.close_base}/_sandbox/tokens/expire", json={"token": token}, timeout=5
    )
    assert response.ok, response.text
    with pytest.raises(AuthFailed) as caught:
        _client(sb, fake).get_me()
    assert caught.value.message.startswith("Close GET /me/ answered 401")
    assert token not in str(caught.value)
    assert token not in repr(caught.value)


def test_upsert_link_create_then_update_keeps_the_id(sb: Sandbox, fake: FakeClock) -> None:
    """Upserting one source_id twice creates then updates the same link."""
    client = _client(sb, fake)
    created = client.upsert_link(_payload())
    assert created.id.startswith("schlnk_")
    assert (created.source, created.source_id, created.name) == (
        "THIRD_PARTY",
        "u1:et1",
        "Intro Call",
    )
    assert created.oauth_client_id == CLOSE_CLIENT_ID
    updated = client.upsert_link(_payload(name="Intro Call (30 min)", duration_in_minutes=45))
    assert updated.id == created.id
    assert (updated.name, updated.duration_in_minutes) == ("Intro Call (30 min)", 45)
    assert len(sb.world.close_links(sb.users[0].close_user_id)) == 1


def test_upsert_link_invalid_body_raises_rejected_with_field_errors(
    sb: Sandbox, fake: FakeClock
) -> None:
    """Close's 400 with field-errors becomes Rejected carrying them."""
    with pytest.raises(Rejected) as caught:
        _client(sb, fake).upsert_link(_payload(name=""))
    assert caught.value.status == 400
    assert "name" in caught.value.field_errors
    assert caught.value.endpoint == "/scheduling_link/integration/"


def test_upsert_link_api_key_is_refused(sb: Sandbox, fake: FakeClock) -> None:
    """The integration endpoint accepts OAuth only: an API key over HTTP Basic is refused."""
    http = api_http("Close", sb.close_api_url, fake)
    key = sb.users[0].close_api_key
    with pytest.raises(Forbidden) as caught:
        http.request(
            "POST",
            "/scheduling_link/integration/",
            json_body=_payload().model_dump(),
            auth=(key, ""),
        )
    assert caught.value.status == 403
    assert key not in str(caught.value)
    assert sb.world.close_links(sb.users[0].close_user_id) == []


def test_delete_link_then_again_returns_true_then_false(sb: Sandbox, fake: FakeClock) -> None:
    """Deleting a link answers True; deleting it again answers False (already gone)."""
    client = _client(sb, fake)
    client.upsert_link(_payload())
    assert client.delete_link("u1:et1") is True
    assert client.delete_link("u1:et1") is False
    assert sb.world.close_links(sb.users[0].close_user_id) == []


def test_delete_link_awkward_source_id_is_quoted(sb: Sandbox, fake: FakeClock) -> None:
    """A source_id with spaces, '?', '#' and '%' survives the trip through the URL path."""
    client = _client(sb, fake)
    source_id = "user 1?x#y%20:é"
    client.upsert_link(_payload(source_id))
    assert client.delete_link(source_id) is True
    assert sb.world.close_links(sb.users[0].close_user_id) == []


def test_delete_link_slash_in_source_id_raises_before_any_call(
    sb: Sandbox, fake: FakeClock
) -> None:
    """A source_id containing '/' is refused locally: no request reaches Close."""
    client = _client(sb, fake)
    sb.world.reset_request_counts()
    with pytest.raises(ValueError, match="must not contain '/'"):
        client.delete_link("user/1")
    assert client.http.calls == 0
    assert sb.world.request_counts() == {}


def test_list_scheduling_links_250_links_three_pages(sb: Sandbox, fake: FakeClock) -> None:
    """A listing of 250 links is read with _skip/_limit in three requests, each link once."""
    user = sb.users[0]
    for n in range(250):
        sb.world.create_link(user.close_user_id, name=f"Manual {n}", url=f"https://x.test/{n}")
    sb.world.reset_request_counts()
    links = _client(sb, fake).list_scheduling_links()
    expected = sb.world.close_links(user.close_user_id)
    assert [link.id for link in links] == [link["id"] for link in expected]
    assert len(links) == 250
    assert _close_requests(sb, "close GET /api/v1/scheduling_link/") == 3


def test_list_scheduling_links_failing_page_raises(sb: Sandbox, fake: FakeClock) -> None:
    """A page that keeps failing raises; no partial listing is returned."""
    user = sb.users[0]
    for n in range(150):
        sb.world.create_link(user.close_user_id, name=f"Manual {n}", url=f"https://x.test/{n}")
    sb.world.add_fault(api="close", kind="503", page=2, count=10)
    with pytest.raises(TransientError, match=r"^Close GET /scheduling_link/ answered 503"):
        _client(sb, fake, max_attempts=2).list_scheduling_links()


def test_list_scheduling_links_sees_every_source(sb: Sandbox, fake: FakeClock) -> None:
    """Manual and Close's own Calendly links are listed beside ours."""
    user = sb.users[0]
    sb.world.create_link(user.close_user_id, name="Mine", url="https://x.test/m")
    sb.world.create_link(user.close_user_id, "CALENDLY", name="Native", url="https://x.test/c")
    client = _client(sb, fake)
    client.upsert_link(_payload())
    sources = sorted(link.source or "" for link in client.list_scheduling_links())
    assert sources == ["CALENDLY", "MANUAL", "THIRD_PARTY"]


def test_list_scheduling_links_repeated_page_raises_pagination_error() -> None:
    """A server that ignores _skip repeats its first page: PaginationError, not a loop."""
    page = {"data": [{"id": "schlnk_1"}, {"id": "schlnk_2"}], "has_more": True}
    with scripted_server() as server:
        server.queue(page, page)
        client = CloseClient(api_http("Close", server.url, FakeClock()), lambda: "tok")
        with pytest.raises(PaginationError) as caught:
            client.list_scheduling_links()
    assert caught.value.message == (
        "Close GET /scheduling_link/ repeated the previous page; the listing is incomplete"
    )
    assert "_skip=0" in server.requests[0]
    assert "_limit=100" in server.requests[0]
    assert "_skip=2" in server.requests[1]


def test_list_scheduling_links_overlapping_pages_keep_each_link_once() -> None:
    """A link shifted onto the next page by a concurrent insert is listed once."""
    with scripted_server() as server:
        server.queue(
            {"data": [{"id": "schlnk_1"}, {"id": "schlnk_2"}], "has_more": True},
            {"data": [{"id": "schlnk_2"}, {"id": "schlnk_3"}], "has_more": False},
        )
        client = CloseClient(api_http("Close", server.url, FakeClock()), lambda: "tok")
        links = client.list_scheduling_links()
    assert [link.id for link in links] == ["schlnk_1", "schlnk_2", "schlnk_3"]


def test_list_scheduling_links_empty_page_claiming_more_raises() -> None:
    """An empty page with has_more would never end: PaginationError."""
    with scripted_server() as server:
        server.queue({"data": [], "has_more": True})
        client = CloseClient(api_http("Close", server.url, FakeClock()), lambda: "tok")
        with pytest.raises(PaginationError, match="empty page"):
            client.list_scheduling_links()


def test_list_scheduling_links_item_without_id_raises_bad_response() -> None:
    """A link without an id is a BadResponse naming the item, not the body."""
    with scripted_server() as server:
        server.queue({"data": [{"id": "schlnk_1"}, {"name": "x"}], "has_more": False})
        client = CloseClient(
            api_http("Close", server.url, FakeClock(), max_attempts=1), lambda: "t"
        )
        with pytest.raises(BadResponse) as caught:
            client.list_scheduling_links()
    assert caught.value.message == (
        "Close GET /scheduling_link/ answered 200 with an unexpected body: "
        "data.1.id: Field required"
    )


# --- CloseOAuth -------------------------------------------------------------------------------


def test_close_oauth_refresh_rotates_old_token_refused(sb: Sandbox, fake: FakeClock) -> None:
    """A refresh works once and its new access token works; the spent one is GrantRevoked."""
    oauth = _oauth(sb)
    old = sb.users[0].close_refresh_token
    tokens = oauth.refresh(old)
    assert tokens.refresh_token not in (None, old)
    assert _client(sb, fake, token=tokens.access_token).get_me().id == sb.users[0].close_user_id
    with pytest.raises(GrantRevoked) as caught:
        oauth.refresh(old)
    assert caught.value.message == (
        "Close POST /token/ refused the refresh token (invalid_grant): "
        "the user must authorize again"
    )
    assert old not in repr(caught.value)


def test_close_oauth_exchange_code_returns_user_tokens(sb: Sandbox, fake: FakeClock) -> None:
    """A code from the authorize redirect buys tokens for the approving user."""
    tokens = _oauth(sb).exchange_code(_authorize(sb), REDIRECT_URI)
    assert tokens.user_id == sb.users[0].close_user_id
    assert tokens.organization_id == sb.users[0].close_organization_id
    assert _client(sb, fake, token=tokens.access_token).get_me().id == sb.users[0].close_user_id


def test_close_oauth_exchange_unknown_code_raises_grant_revoked(sb: Sandbox) -> None:
    """A code the server never issued is invalid_grant, and the code is not echoed."""
    with pytest.raises(GrantRevoked) as caught:
        _oauth(sb).exchange_code("close_code_bogus", REDIRECT_URI)
    assert "close_code_bogus" not in str(caught.value)


def test_close_oauth_revoke_refresh_token_then_refresh_refused(sb: Sandbox) -> None:
    """A revoked refresh token can no longer be used."""
    oauth = _oauth(sb)
    token = sb.users[0].close_refresh_token
    oauth.revoke(token)
    with pytest.raises(GrantRevoked):
        oauth.refresh(token)


def test_close_oauth_wrong_secret_is_auth_failed_not_grant_revoked(sb: Sandbox) -> None:
    """Bad client credentials are a configuration problem, not a revoked grant."""
    oauth = CloseOAuth(token_http("Close", sb.close_oauth_url), CLOSE_CLIENT_ID, "wrong")
    with pytest.raises(ApiError) as caught:
        oauth.refresh(sb.users[0].close_refresh_token)
    assert not isinstance(caught.value, GrantRevoked)
    assert "wrong" not in str(caught.value)


def test_close_oauth_server_error_is_tried_once(sb: Sandbox) -> None:
    """A failed refresh is not retried: the server may have rotated the token already."""
    sb.world.add_fault(api="close", kind="502", count=3)
    with pytest.raises(TransientError):
        _oauth(sb).refresh(sb.users[0].close_refresh_token)
    assert sb.world.list_faults()[0]["count"] == 2


def test_close_oauth_retrying_http_is_refused() -> None:
    """An ApiHttp that would retry a token call is refused at construction."""
    with pytest.raises(ValueError, match="max_attempts=1"):
        CloseOAuth(api_http("Close", "http://127.0.0.1:9", FakeClock()), "id", "secret")
