"""Every fault kind, as a client sees it, plus page targeting and the random error rate."""

from __future__ import annotations

import time

import pytest
import requests

from closesync.sandbox import Sandbox, SandboxConfig
from tests.sandbox.conftest import cal_get, close_call


def _me(sb: Sandbox) -> requests.Response:
    return close_call(sb, "GET", "/me/", sb.users[0].close_access_token)


def test_fault_429_close_carries_fractional_reset_and_empty_body(sandbox: Sandbox) -> None:
    """A 429 burst answers RateLimit with reset=0.25, Retry-After 1 and no body."""
    sandbox.world.add_fault(api="close", kind="429", reset=0.25)
    response = _me(sandbox)
    assert response.status_code == 429
    assert response.headers["RateLimit"] == "limit=100, remaining=0, reset=0.25"
    assert response.headers["Retry-After"] == "1"
    assert response.content == b""
    assert _me(sandbox).status_code == 200


def test_fault_429_calendly_json_body_has_rate_headers(sandbox: Sandbox) -> None:
    """A Calendly 429 fault may carry the Calendly error body and X-RateLimit-Reset."""
    sandbox.world.add_fault(api="calendly", kind="429", retry_after=3, json_body=True)
    response = cal_get(sandbox, "/users/me", sandbox.users[0])
    assert response.status_code == 429
    assert response.headers["X-RateLimit-Reset"] == "3"
    assert response.json()["title"] == "Too Many Requests"


@pytest.mark.parametrize("kind", ["500", "502", "503"])
def test_fault_server_error_close_answers_status_with_error_body(
    sandbox: Sandbox, kind: str
) -> None:
    """5xx faults answer that status with Close's {"error": …} body."""
    sandbox.world.add_fault(api="close", kind=kind)
    response = _me(sandbox)
    assert response.status_code == int(kind)
    assert "error" in response.json()


def test_fault_server_error_non_json_body_is_plain_text(sandbox: Sandbox) -> None:
    """json_body=False makes a 5xx answer plain text."""
    sandbox.world.add_fault(api="close", kind="503", json_body=False)
    response = _me(sandbox)
    assert response.status_code == 503
    assert response.headers["Content-Type"].startswith("text/plain")


def test_fault_server_error_calendly_uses_calendly_error_shape(sandbox: Sandbox) -> None:
    """A Calendly 500 fault carries title and message."""
    sandbox.world.add_fault(api="calendly", kind="500")
    body = cal_get(sandbox, "/users/me", sandbox.users[0]).json()
    assert set(body) == {"title", "message"}


def test_fault_html_answers_502_html_page(sandbox: Sandbox) -> None:
    """An html fault is a 502 with a text/html gateway page."""
    sandbox.world.add_fault(api="close", kind="html")
    response = _me(sandbox)
    assert response.status_code == 502
    assert response.headers["Content-Type"].startswith("text/html")
    assert "<html>" in response.text


def test_fault_truncated_answers_200_with_broken_json(sandbox: Sandbox) -> None:
    """A truncated body claims JSON but does not parse."""
    sandbox.world.add_fault(api="calendly", kind="truncated")
    response = cal_get(sandbox, "/users/me", sandbox.users[0])
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    with pytest.raises(ValueError, match=r"."):
        response.json()


def test_fault_empty_answers_200_with_no_body(sandbox: Sandbox) -> None:
    """An empty fault is a 200 without a body."""
    sandbox.world.add_fault(api="close", kind="empty")
    response = _me(sandbox)
    assert (response.status_code, response.content) == (200, b"")


def test_fault_not_json_answers_200_text_plain(sandbox: Sandbox) -> None:
    """A not_json fault is a 200 in text/plain."""
    sandbox.world.add_fault(api="close", kind="not_json")
    response = _me(sandbox)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")


def test_fault_hang_times_out_client_without_blocking_others(sandbox: Sandbox) -> None:
    """A hung request times the client out while other requests are still answered."""
    sandbox.world.add_fault(api="close", kind="hang")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(
            sandbox.close_api_url + "/me/",
            headers={"Authorization": f"Bearer {sandbox.users[0].close_access_token}"},
            timeout=(2, 0.3),
        )
    assert _me(sandbox).status_code == 200


def test_fault_hang_released_by_stop() -> None:
    """stop() returns promptly even while a request hangs."""
    sb = Sandbox.start(SandboxConfig(seed=1))
    sb.world.add_fault(api="calendly", kind="hang")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(
            sb.calendly_api_url + "/users/me",
            headers={"Authorization": f"Bearer {sb.users[0].calendly_token}"},
            timeout=(2, 0.2),
        )
    started = time.monotonic()
    sb.stop()
    assert time.monotonic() - started < 5


def test_fault_reset_raises_connection_error(sandbox: Sandbox) -> None:
    """A reset aborts the TCP connection; requests raises ConnectionError."""
    sandbox.world.add_fault(api="close", kind="reset", method="GET", path_prefix="/api/v1/me/")
    with pytest.raises(requests.exceptions.ConnectionError):
        _me(sandbox)
    assert _me(sandbox).status_code == 200


def test_fault_page_targets_only_that_listing_page(sandbox: Sandbox) -> None:
    """page=2 hits the request carrying the second page's token and spares page 1."""
    user = sandbox.users[0]
    sandbox.world.add_fault(api="calendly", kind="502", path_prefix="/event_types", page=2)
    first = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri, count=2)
    token = first.json()["pagination"]["next_page_token"]
    second = cal_get(
        sandbox, "/event_types", user, user=user.calendly_user_uri, count=2, page_token=token
    )
    assert (first.status_code, second.status_code) == (200, 502)


def test_fault_omit_lists_without_the_event_type_it_still_serves(sandbox: Sandbox) -> None:
    """omit leaves one event type out of a listing; its own resource still answers, active."""
    user = sandbox.users[0]
    listed = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri).json()
    active = [item for item in listed["collection"] if item["active"]]
    target = active[-1]["uri"].rsplit("/", 1)[-1]
    sandbox.world.add_fault(api="calendly", kind="omit", path_prefix="/event_types", omit=target)
    glitched = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri)
    assert glitched.status_code == 200
    uris = [item["uri"] for item in glitched.json()["collection"]]
    assert uris == [i["uri"] for i in listed["collection"] if not i["uri"].endswith(target)]
    resource = cal_get(sandbox, f"/event_types/{target}", user).json()["resource"]
    assert resource["active"] is True
    assert resource["deleted_at"] is None
    again = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri).json()
    assert again["collection"] == listed["collection"]


def test_fault_omit_without_uuid_drops_the_first_listed(sandbox: Sandbox) -> None:
    """omit with no uuid drops a page's first item; an answer without a collection is untouched."""
    user = sandbox.users[0]
    listed = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri).json()
    sandbox.world.add_fault(api="calendly", kind="omit", count=2)
    me = cal_get(sandbox, "/users/me", user)
    assert me.json()["resource"]["uri"] == user.calendly_user_uri
    glitched = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri).json()
    assert glitched["collection"] == listed["collection"][1:]


@pytest.mark.parametrize("kind", ["400", "422"])
def test_fault_refusal_answers_in_each_vendor_shape(sandbox: Sandbox, kind: str) -> None:
    """400/422 faults answer Close's errors/field-errors body and Calendly's title/message."""
    sandbox.world.add_fault(api="close", kind=kind, method="GET")
    close = _me(sandbox)
    assert close.status_code == int(kind)
    assert set(close.json()) == {"errors", "field-errors"}
    sandbox.world.add_fault(api="calendly", kind=kind)
    calendly = cal_get(sandbox, "/users/me", sandbox.users[0])
    assert calendly.status_code == int(kind)
    assert calendly.json()["title"] == "Invalid Argument"


def test_fault_count_hits_that_many_requests_then_stops(sandbox: Sandbox) -> None:
    """count=2 hits two matching requests; the rule is then gone."""
    sandbox.world.add_fault(api="close", kind="500", count=2)
    codes = [_me(sandbox).status_code for _ in range(3)]
    assert codes == [500, 500, 200]
    assert sandbox.world.list_faults() == []


def test_fault_rule_with_unknown_kind_is_refused(sandbox: Sandbox) -> None:
    """A typo in a rule is an error, not a silently ignored fault."""
    with pytest.raises(ValueError, match="kind"):
        sandbox.world.add_fault(api="close", kind="418")


def test_error_rate_one_answers_every_api_request_with_5xx() -> None:
    """error_rate=1 turns every API answer into a 500/502/503, admin endpoints excepted."""
    with Sandbox.start(SandboxConfig(seed=1, error_rate=1.0)) as sb:
        codes = {_me(sb).status_code for _ in range(5)}
        assert codes <= {500, 502, 503}
        assert requests.get(sb.close_api_url.replace("/api/v1", "/_sandbox/users"), timeout=5).ok


def test_fault_skip_lets_first_matching_requests_through(sandbox: Sandbox) -> None:
    """skip=2 passes two matching requests, then the rule hits the third."""
    sandbox.world.add_fault(api="close", kind="503", skip=2)
    codes = [_me(sandbox).status_code for _ in range(4)]
    assert codes == [200, 200, 503, 200]


def _rate_headers(response: requests.Response) -> dict[str, str]:
    """An answer's rate-limit headers; resets (which depend on timing) only as present."""
    found = {}
    for name, value in response.headers.items():
        key = name.lower()
        if key == "ratelimit":
            found[key] = value.rsplit(", reset=", 1)[0]
        elif key in ("retry-after", "x-ratelimit-reset"):
            found[key] = "present"
        elif key.startswith("x-ratelimit-"):
            found[key] = value
    return found


@pytest.mark.parametrize("api", ["calendly", "close"])
def test_fault_429_carries_the_same_rate_headers_as_a_natural_429(api: str) -> None:
    """An injected 429 has the headers of an exhausted budget, with the configured limit."""
    config = SandboxConfig(seed=1, freeze_clock=True, calendly_rate_limit=3, close_rate_limit=4)
    with Sandbox.start(config) as sb:

        def call() -> requests.Response:
            return cal_get(sb, "/users/me", sb.users[0]) if api == "calendly" else _me(sb)

        answers = [call() for _ in range(5)]
        natural = answers[-1]
        assert natural.status_code == 429
        sb.world.add_fault(api=api, kind="429", reset=0.5)
        injected = call()
        assert injected.status_code == 429
        assert _rate_headers(injected) == _rate_headers(natural)
        expected = (
            {"x-ratelimit-limit": "3", "x-ratelimit-remaining": "0", "x-ratelimit-reset": "present"}
            if api == "calendly"
            else {"ratelimit": "limit=4, remaining=0", "retry-after": "present"}
        )
        assert _rate_headers(natural) == expected
