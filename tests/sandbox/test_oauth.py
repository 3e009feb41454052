"""Both OAuth flows: authorize redirects, code exchange with PKCE, refresh rotation, limits."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import requests

from closesync.sandbox import (
    CALENDLY_CLIENT_ID,
    CALENDLY_CLIENT_SECRET,
    CLOSE_CLIENT_ID,
    CLOSE_CLIENT_SECRET,
    Sandbox,
)
from closesync.sandbox.tokens import pkce_challenge
from tests.sandbox.conftest import admin

REDIRECT = "http://localhost:9999/callback"
CAL_AUTH = (CALENDLY_CLIENT_ID, CALENDLY_CLIENT_SECRET)


def _authorize(sb: Sandbox, api: str, **extra: str) -> dict[str, list[str]]:
    base = (
        sb.calendly_auth_url + "/oauth/authorize"
        if api == "calendly"
        else sb.close_oauth_url + "/authorize/"
    )
    client = CALENDLY_CLIENT_ID if api == "calendly" else CLOSE_CLIENT_ID
    params = {
        "client_id": client,
        "response_type": "code",
        "redirect_uri": REDIRECT,
        "state": "st8",
    }
    response = requests.get(base, params={**params, **extra}, allow_redirects=False, timeout=5)
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(REDIRECT)
    return parse_qs(urlsplit(location).query)


def _cal_token(sb: Sandbox, **form: str) -> requests.Response:
    return requests.post(sb.calendly_auth_url + "/oauth/token", data=form, auth=CAL_AUTH, timeout=5)


def _close_token(sb: Sandbox, **form: str) -> requests.Response:
    data = {"client_id": CLOSE_CLIENT_ID, "client_secret": CLOSE_CLIENT_SECRET, **form}
    return requests.post(sb.close_oauth_url + "/token/", data=data, timeout=5)


def test_calendly_code_exchange_with_pkce_returns_owner_and_tokens(sandbox: Sandbox) -> None:
    """A code issued with an S256 challenge is exchanged with the matching verifier."""
    verifier = "v" * 50
    query = _authorize(
        sandbox, "calendly", code_challenge=pkce_challenge(verifier), code_challenge_method="S256"
    )
    assert query["state"] == ["st8"]
    body = _cal_token(
        sandbox,
        grant_type="authorization_code",
        code=query["code"][0],
        redirect_uri=REDIRECT,
        code_verifier=verifier,
    ).json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 7200
    assert body["access_token"].startswith("cal_at_")
    assert body["refresh_token"].startswith("cal_rt_")
    assert body["owner"] == sandbox.users[0].calendly_user_uri
    assert body["organization"] == sandbox.users[0].calendly_organization_uri


def test_calendly_code_exchange_wrong_verifier_answers_invalid_grant(sandbox: Sandbox) -> None:
    """PKCE is verified when a challenge was given."""
    query = _authorize(
        sandbox,
        "calendly",
        code_challenge=pkce_challenge("right" * 10),
        code_challenge_method="S256",
    )
    response = _cal_token(
        sandbox,
        grant_type="authorization_code",
        code=query["code"][0],
        redirect_uri=REDIRECT,
        code_verifier="wrong" * 10,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_calendly_code_reused_or_expired_answers_invalid_grant(sandbox: Sandbox) -> None:
    """A code works once, and not at all after 60 s of sandbox clock."""
    code = _authorize(sandbox, "calendly")["code"][0]
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    assert _cal_token(sandbox, **form).status_code == 200
    assert _cal_token(sandbox, **form).json()["error"] == "invalid_grant"
    late = _authorize(sandbox, "calendly")["code"][0]
    sandbox.world.advance_clock(60)
    expired = _cal_token(sandbox, grant_type="authorization_code", code=late, redirect_uri=REDIRECT)
    assert expired.status_code == 400
    assert "expired" in expired.json()["error_description"]


def test_calendly_refresh_rotates_and_reuse_answers_invalid_grant(sandbox: Sandbox) -> None:
    """Each refresh hands out a new refresh token; the spent one fails with invalid_grant."""
    code = _authorize(sandbox, "calendly")["code"][0]
    first = _cal_token(
        sandbox, grant_type="authorization_code", code=code, redirect_uri=REDIRECT
    ).json()
    second = _cal_token(sandbox, grant_type="refresh_token", refresh_token=first["refresh_token"])
    reuse = _cal_token(sandbox, grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert second.status_code == 200
    assert second.json()["refresh_token"] != first["refresh_token"]
    assert reuse.status_code == 400
    assert reuse.json()["error"] == "invalid_grant"


def test_calendly_token_requests_over_eight_per_minute_answer_429(sandbox: Sandbox) -> None:
    """The ninth token request of a user within a minute is refused."""
    code = _authorize(sandbox, "calendly")["code"][0]
    refresh = _cal_token(
        sandbox, grant_type="authorization_code", code=code, redirect_uri=REDIRECT
    ).json()["refresh_token"]
    for _ in range(7):
        refresh = _cal_token(sandbox, grant_type="refresh_token", refresh_token=refresh).json()[
            "refresh_token"
        ]
    refused = _cal_token(sandbox, grant_type="refresh_token", refresh_token=refresh)
    assert refused.status_code == 429
    sandbox.world.advance_clock(60)
    assert _cal_token(sandbox, grant_type="refresh_token", refresh_token=refresh).status_code == 200


def test_calendly_token_with_wrong_client_secret_answers_401(sandbox: Sandbox) -> None:
    """Client authentication is checked (HTTP Basic)."""
    response = requests.post(
        sandbox.calendly_auth_url + "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": "x"},
        auth=(CALENDLY_CLIENT_ID, "wrong"),
        timeout=5,
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_calendly_introspect_and_revoke_deactivate_token(sandbox: Sandbox) -> None:
    """Introspection reports a live token active, and inactive once revoked."""
    token = sandbox.users[0].calendly_token
    url = sandbox.calendly_auth_url
    live = requests.post(f"{url}/oauth/introspect", data={"token": token}, auth=CAL_AUTH, timeout=5)
    requests.post(f"{url}/oauth/revoke", data={"token": token}, auth=CAL_AUTH, timeout=5)
    dead = requests.post(f"{url}/oauth/introspect", data={"token": token}, auth=CAL_AUTH, timeout=5)
    assert live.json()["active"] is True
    assert dead.json() == {"active": False}


def test_close_code_exchange_returns_user_and_organization(sandbox: Sandbox) -> None:
    """Close's token response carries scope, organization_id and user_id."""
    code = _authorize(sandbox, "close")["code"][0]
    body = _close_token(
        sandbox, grant_type="authorization_code", code=code, redirect_uri=REDIRECT
    ).json()
    assert body["scope"] == "all.full_access offline_access"
    assert body["expires_in"] == 3600
    assert body["user_id"] == sandbox.users[0].close_user_id
    assert body["organization_id"] == sandbox.users[0].close_organization_id


def test_close_refresh_reuse_answers_400_invalid_grant(sandbox: Sandbox) -> None:
    """Close refresh tokens rotate; the seeded one works once."""
    refresh = sandbox.users[0].close_refresh_token
    first = _close_token(sandbox, grant_type="refresh_token", refresh_token=refresh)
    again = _close_token(sandbox, grant_type="refresh_token", refresh_token=refresh)
    assert first.json()["refresh_token"].startswith("close_rt_")
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"


def test_oauth_next_user_and_deny_apply_to_one_authorization(sandbox: Sandbox) -> None:
    """The admin picks the next approving user, or a denial, for one authorization only."""
    admin(sandbox, "POST", "/oauth/next", json={"api": "close", "user_email": "user2@example.com"})
    code = _authorize(sandbox, "close")["code"][0]
    body = _close_token(
        sandbox, grant_type="authorization_code", code=code, redirect_uri=REDIRECT
    ).json()
    admin(sandbox, "POST", "/oauth/next", json={"api": "close", "deny": True})
    denied = _authorize(sandbox, "close")
    assert body["user_id"] == sandbox.users[2].close_user_id
    assert denied == {"error": ["access_denied"], "state": ["st8"]}
    assert "code" in _authorize(sandbox, "close")
