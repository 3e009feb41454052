"""The Close emulator over loopback HTTP: /me/, scheduling links, auth and rate limits."""

from __future__ import annotations

import requests

from closesync.sandbox import Sandbox, SandboxConfig
from tests.sandbox.conftest import admin, close_call, link_body


def test_me_with_api_key_basic_auth_returns_user(sandbox: Sandbox) -> None:
    """An API key as the Basic username authenticates GET /me/."""
    user = sandbox.users[0]
    response = requests.get(
        sandbox.close_api_url + "/me/", auth=(user.close_api_key, ""), timeout=5
    )
    assert response.status_code == 200
    assert response.json()["id"] == user.close_user_id
    assert response.json()["organizations"][0]["id"] == user.close_organization_id


def test_upsert_create_then_update_returns_same_id(sandbox: Sandbox) -> None:
    """Posting the same source_id twice updates the one link and answers 200 both times."""
    token = sandbox.users[0].close_access_token
    created = close_call(sandbox, "POST", "/scheduling_link/integration/", token, json=link_body())
    updated = close_call(
        sandbox, "POST", "/scheduling_link/integration/", token, json=link_body(name="Renamed")
    )
    assert (created.status_code, updated.status_code) == (200, 200)
    assert created.json()["id"] == updated.json()["id"]
    assert updated.json()["name"] == "Renamed"
    assert updated.json()["source"] == "THIRD_PARTY"
    assert updated.json()["oauth_client_id"] == "oa2client_sandbox"


def test_upsert_with_close_normalises_stores_trimmed_crlf_and_encoded() -> None:
    """close_normalises trims text, stores a null description as "", CRLF, %-encoded URLs."""
    with Sandbox.start(SandboxConfig(seed=1, users=1, close_normalises=True)) as sandbox:
        token = sandbox.users[0].close_access_token
        body = link_body(
            name=" Intro ", url="https://calendly.com/ada/caf\u00e9", description="a\nb"
        )
        stored = close_call(sandbox, "POST", "/scheduling_link/integration/", token, json=body)
        assert stored.status_code == 200
        link = stored.json()
        assert (link["name"], link["url"], link["description"]) == (
            "Intro",
            "https://calendly.com/ada/caf%C3%A9",
            "a\r\nb",
        )
        body = link_body(description=None)
        stored = close_call(sandbox, "POST", "/scheduling_link/integration/", token, json=body)
        assert stored.json()["description"] == ""


def test_upsert_same_source_id_for_two_users_keeps_two_links(sandbox: Sandbox) -> None:
    """source_id is scoped per app AND user: two users' links never merge."""
    first, second = sandbox.users[0], sandbox.users[1]
    a = close_call(
        sandbox, "POST", "/scheduling_link/integration/", first.close_access_token, json=link_body()
    )
    b = close_call(
        sandbox,
        "POST",
        "/scheduling_link/integration/",
        second.close_access_token,
        json=link_body(),
    )
    assert a.json()["id"] != b.json()["id"]


def test_upsert_with_api_key_answers_403(sandbox: Sandbox) -> None:
    """The integration endpoint refuses API keys (OAuth only)."""
    response = requests.post(
        sandbox.close_api_url + "/scheduling_link/integration/",
        json=link_body(),
        auth=(sandbox.users[0].close_api_key, ""),
        timeout=5,
    )
    assert response.status_code == 403
    assert "OAuth" in response.json()["error"]


def test_upsert_invalid_fields_answers_400_field_errors(sandbox: Sandbox) -> None:
    """Empty name, non-http url, long description, bad duration and '/' in source_id fail."""
    body = link_body(
        source_id="a/b", name="", url="ftp://x", description="d" * 4001, duration_in_minutes=0
    )
    response = close_call(
        sandbox,
        "POST",
        "/scheduling_link/integration/",
        sandbox.users[0].close_access_token,
        json=body,
    )
    assert response.status_code == 400
    assert set(response.json()["field-errors"]) == {
        "source_id",
        "name",
        "url",
        "description",
        "duration_in_minutes",
    }


def test_upsert_name_with_control_character_answers_400(sandbox: Sandbox) -> None:
    """A control character in the name is a field error."""
    response = close_call(
        sandbox,
        "POST",
        "/scheduling_link/integration/",
        sandbox.users[0].close_access_token,
        json=link_body(name="Intro\x07"),
    )
    assert response.status_code == 400
    assert "name" in response.json()["field-errors"]


def test_delete_integration_then_again_answers_404(sandbox: Sandbox) -> None:
    """Deleting answers 204; deleting the same source_id again answers 404 with an error."""
    token = sandbox.users[0].close_access_token
    close_call(sandbox, "POST", "/scheduling_link/integration/", token, json=link_body("x1"))
    gone = close_call(sandbox, "DELETE", "/scheduling_link/integration/x1/", token)
    again = close_call(sandbox, "DELETE", "/scheduling_link/integration/x1/", token)
    assert gone.status_code == 204
    assert again.status_code == 404
    assert "error" in again.json()


def test_list_links_pages_with_skip_and_limit(sandbox: Sandbox) -> None:
    """_skip/_limit page the token user's links of all sources; has_more marks the end."""
    user = sandbox.users[0]
    sandbox.world.create_link(user.close_user_id, "CALENDLY", name="Theirs", url="https://c.test")
    for n in range(2):
        close_call(
            sandbox,
            "POST",
            "/scheduling_link/integration/",
            user.close_access_token,
            json=link_body(f"s{n}"),
        )
    page1 = close_call(
        sandbox, "GET", "/scheduling_link/", user.close_access_token, params={"_limit": 2}
    )
    page2 = close_call(
        sandbox,
        "GET",
        "/scheduling_link/",
        user.close_access_token,
        params={"_limit": 2, "_skip": 2},
    )
    assert page1.json()["has_more"] is True
    assert page2.json()["has_more"] is False
    sources = [link["source"] for link in page1.json()["data"] + page2.json()["data"]]
    assert sources == ["CALENDLY", "THIRD_PARTY", "THIRD_PARTY"]


def test_list_links_excludes_other_users_links(sandbox: Sandbox) -> None:
    """Each token sees only its own user's links."""
    sandbox.world.create_link(sandbox.users[1].close_user_id, name="Other", url="https://o.test")
    response = close_call(sandbox, "GET", "/scheduling_link/", sandbox.users[0].close_access_token)
    assert response.json() == {"data": [], "has_more": False}


def test_list_links_organization_option_includes_colleagues_links(sandbox: Sandbox) -> None:
    """With close_lists_organization_links, a token sees every link of its organization."""
    sandbox.world.update_config(close_lists_organization_links=True)
    other = sandbox.world.create_link(
        sandbox.users[1].close_user_id, name="Other", url="https://o.test"
    )
    response = close_call(sandbox, "GET", "/scheduling_link/", sandbox.users[0].close_access_token)
    assert [link["id"] for link in response.json()["data"]] == [other["id"]]


def test_manual_link_crud_round_trip(sandbox: Sandbox) -> None:
    """POST/GET/PUT/DELETE /scheduling_link/ manage MANUAL links."""
    token = sandbox.users[0].close_access_token
    link = close_call(
        sandbox, "POST", "/scheduling_link/", token, json={"name": "Mine", "url": "https://m.test"}
    ).json()
    path = f"/scheduling_link/{link['id']}/"
    assert close_call(sandbox, "GET", path, token).json()["source"] == "MANUAL"
    assert close_call(sandbox, "PUT", path, token, json={"name": "New"}).json()["name"] == "New"
    assert close_call(sandbox, "DELETE", path, token).status_code == 204
    assert close_call(sandbox, "GET", path, token).status_code == 404


def test_expired_access_token_answers_401(sandbox: Sandbox) -> None:
    """An access token past its hour is refused with an error body."""
    sandbox.world.advance_clock(3600)
    response = close_call(sandbox, "GET", "/me/", sandbox.users[0].close_access_token)
    assert response.status_code == 401
    assert "expired" in response.json()["error"]


def test_missing_trailing_slash_answers_404(sandbox: Sandbox) -> None:
    """Every Close path ends in '/'."""
    response = close_call(sandbox, "GET", "/me", sandbox.users[0].close_access_token)
    assert response.status_code == 404


def test_rate_limit_header_on_every_answer_and_429_with_retry_after() -> None:
    """A group allows `limit` calls per window; the next is a 429 with RateLimit and Retry-After."""
    config = SandboxConfig(seed=1, close_rate_limit=2, close_rate_window=10, freeze_clock=True)
    with Sandbox.start(config) as sb:
        token = sb.users[0].close_access_token
        first = close_call(sb, "GET", "/me/", token)
        close_call(sb, "GET", "/me/", token)
        refused = close_call(sb, "GET", "/me/", token)
        other_group = close_call(sb, "GET", "/scheduling_link/", token)
        assert first.headers["RateLimit"].startswith("limit=2, remaining=1, reset=")
        assert refused.status_code == 429
        assert refused.headers["RateLimit"].startswith("limit=2, remaining=0, reset=")
        assert 1 <= int(refused.headers["Retry-After"]) <= 10
        assert other_group.status_code == 200
        sb.world.advance_clock(10)
        assert close_call(sb, "GET", "/me/", token).status_code == 200


def test_rate_limit_organization_bucket_is_three_times_the_token_limit() -> None:
    """Tokens of one organization share a per-group bucket of 3x the per-token limit."""
    config = SandboxConfig(
        seed=1, users=4, close_rate_limit=1, close_rate_window=10, freeze_clock=True
    )
    with Sandbox.start(config) as sb:
        codes = [close_call(sb, "GET", "/me/", u.close_access_token).status_code for u in sb.users]
        assert codes == [200, 200, 200, 429]


def test_rate_limit_counts_natural_429s_apart_from_injected_ones() -> None:
    """GET /_sandbox/requests/rate_limited counts the emulated limits' 429s, never a fault's."""
    config = SandboxConfig(seed=1, close_rate_limit=1, close_rate_window=10, freeze_clock=True)
    with Sandbox.start(config) as sb:
        token = sb.users[0].close_access_token
        sb.world.add_fault(api="close", kind="429", method="GET", path_prefix="/api/v1/me/")
        codes = [close_call(sb, "GET", "/me/", token).status_code for _ in range(3)]
        counted = admin(sb, "GET", "/requests/rate_limited")
        assert codes == [429, 200, 429]
        assert counted.json() == {"close GET /api/v1/me/": 1}
