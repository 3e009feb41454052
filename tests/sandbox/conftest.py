"""Fixtures: a fresh seeded sandbox per test (starting one takes milliseconds)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from closesync.sandbox import Sandbox, SandboxConfig, SeededUser
from tests.sandbox.webhook_receiver import Receiver


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A default sandbox with a frozen clock, stopped after the test."""
    with Sandbox.start(SandboxConfig(seed=1, freeze_clock=True)) as sb:
        yield sb


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A recording webhook receiver on a loopback port."""
    with Receiver() as r:
        yield r


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """A requests session closed after the test."""
    with requests.Session() as session:
        yield session


def cal_get(sb: Sandbox, path: str, user: SeededUser, /, **params: Any) -> requests.Response:
    """GET a Calendly path as `user` (personal access token)."""
    return requests.get(
        sb.calendly_api_url + path,
        params=params,
        headers={"Authorization": f"Bearer {user.calendly_token}"},
        timeout=5,
    )


def close_call(sb: Sandbox, method: str, path: str, token: str, **kwargs: Any) -> requests.Response:
    """Call a Close path with an OAuth bearer token."""
    return requests.request(
        method,
        sb.close_api_url + path,
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
        **kwargs,
    )


def link_body(source_id: str = "evt_1", **changes: Any) -> dict[str, Any]:
    """A valid integration-link body."""
    body: dict[str, Any] = {
        "source_id": source_id,
        "name": "Intro Call",
        "url": "https://calendly.com/ada/intro",
        "description": "Say hello",
        "source_type": "calendly_event_type",
        "duration_in_minutes": 30,
    }
    body.update(changes)
    return body


def admin(sb: Sandbox, method: str, path: str, **kwargs: Any) -> requests.Response:
    """Call an admin endpoint on the Close port."""
    return requests.request(method, f"{sb.world.close_base}/_sandbox{path}", timeout=5, **kwargs)


def cal_call(sb: Sandbox, method: str, path: str, token: str, **kwargs: Any) -> requests.Response:
    """Call a Calendly path with a bearer token (a PAT or an OAuth access token)."""
    return requests.request(
        method,
        sb.calendly_api_url + path,
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
        **kwargs,
    )


def calendly_oauth_token(sb: Sandbox, user: SeededUser, scope: str | None = None) -> str:
    """An OAuth access token of `user` through the real authorize and token endpoints."""
    from urllib.parse import parse_qs, urlsplit

    from closesync.sandbox import CALENDLY_CLIENT_ID, CALENDLY_CLIENT_SECRET

    sb.world.set_oauth_next("calendly", user.email)
    redirect = "http://localhost:9999/callback"
    params = {"client_id": CALENDLY_CLIENT_ID, "response_type": "code", "redirect_uri": redirect}
    if scope is not None:
        params["scope"] = scope
    answer = requests.get(
        sb.calendly_auth_url + "/oauth/authorize", params=params, allow_redirects=False, timeout=5
    )
    code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
    token = requests.post(
        sb.calendly_auth_url + "/oauth/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect},
        auth=(CALENDLY_CLIENT_ID, CALENDLY_CLIENT_SECRET),
        timeout=5,
    )
    token.raise_for_status()
    return str(token.json()["access_token"])
