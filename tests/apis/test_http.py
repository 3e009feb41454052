"""The HTTP layer: error mapping, rate-limit parsing, retry arithmetic, and ApiHttp on the wire."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ValidationError

from closesync.apis.bodies import parse_body, summarize
from closesync.apis.http import ApiHttp, HttpSessions, field_errors_of, raise_for_response
from closesync.apis.oauth_tokens import is_invalid_grant
from closesync.core.errors import (
    ApiError,
    AuthFailed,
    BadResponse,
    Forbidden,
    NotFound,
    RateLimited,
    Rejected,
    TransientError,
)
from closesync.core.ratelimits import (
    FALLBACK_RATE_LIMIT_WAIT,
    RateLimitInfo,
    parse_calendly_ratelimit,
    parse_close_ratelimit,
    parse_retry_after,
    wait_from_429,
)
from closesync.core.retry import WaitBudget, rate_limit_delay, transient_delay
from closesync.sandbox import Sandbox
from tests._sandbox import FakeClock, Scripted, api_http, scripted_server

JSON = {"Content-Type": "application/json"}

# --- raise_for_response ---------------------------------------------------------------------


def _raise(status: int, body: bytes, headers: dict[str, str] | None = None) -> object:
    return raise_for_response("Close", "GET", "/me/", status, headers or JSON, body)


def test_raise_for_response_json_200_returns_value() -> None:
    """A 2xx JSON body is returned decoded."""
    assert _raise(200, b'{"id": "user_1"}') == {"id": "user_1"}


def test_raise_for_response_204_returns_none() -> None:
    """A 204 returns None without looking at the body."""
    assert _raise(204, b"") is None


def test_raise_for_response_200_html_raises_bad_response() -> None:
    """A 200 carrying an HTML page is a BadResponse naming where it came from."""
    with pytest.raises(BadResponse, match=r"^Close GET /me/ answered 200 with an HTML page"):
        _raise(200, b"<html>oops</html>", {"Content-Type": "text/html"})


def test_raise_for_response_200_truncated_json_raises_bad_response() -> None:
    """A cut-off JSON body is a BadResponse saying so."""
    with pytest.raises(BadResponse, match="truncated or invalid JSON"):
        _raise(200, b'{"data": [')


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, AuthFailed),
        (403, Forbidden),
        (404, NotFound),
        (400, Rejected),
        (422, Rejected),
        (500, TransientError),
        (503, TransientError),
        (408, TransientError),
        (418, ApiError),
    ],
)
def test_raise_for_response_error_status_raises_its_class(
    status: int, error: type[ApiError]
) -> None:
    """Each error status maps to the class that says what the caller must do."""
    with pytest.raises(error) as caught:
        _raise(status, b'{"error": "nope"}')
    assert type(caught.value) is error
    assert caught.value.status == status
    assert caught.value.message == f"Close GET /me/ answered {status}: nope"


def test_raise_for_response_429_empty_body_uses_headers() -> None:
    """A 429 with an empty body still yields the wait its headers ask for."""
    with pytest.raises(RateLimited) as caught:
        _raise(429, b"", {"RateLimit": "limit=100, remaining=0, reset=0.25"})
    assert caught.value.wait_seconds == 0.25
    assert "answered 429 with an empty body" in caught.value.message


def test_raise_for_response_502_html_names_the_html_page() -> None:
    """A gateway's HTML error page is named as such, not dumped."""
    with pytest.raises(TransientError) as caught:
        _raise(502, b"<html><body>Bad Gateway</body></html>", {"Content-Type": "text/html"})
    assert caught.value.message == "Close GET /me/ answered 502 with an HTML page instead of JSON"


def test_raise_for_response_404_says_whether_the_api_itself_answered() -> None:
    """A 404 in the vendor's JSON error shape is the API's word; a proxy's HTML page is not."""
    calendly = b'{"title": "Resource Not Found", "message": "The server could not find it."}'
    with pytest.raises(NotFound) as from_api:
        _raise(404, calendly)
    assert from_api.value.from_api
    page = b"<html><body><h1>404 Not Found</h1><hr>nginx</body></html>"
    with pytest.raises(NotFound) as proxy:
        _raise(404, page, {"Content-Type": "text/html"})
    assert not proxy.value.from_api
    assert "HTML page" in proxy.value.message


def test_raise_for_response_400_close_field_errors_are_kept() -> None:
    """Close's field-errors ride on the Rejected error."""
    body = {"errors": [], "field-errors": {"name": "This field is required."}}
    with pytest.raises(Rejected) as caught:
        _raise(400, json.dumps(body).encode())
    assert caught.value.field_errors == {"name": "This field is required."}


# --- rate-limit headers ---------------------------------------------------------------------


def test_parse_close_ratelimit_fractional_reset_is_kept() -> None:
    """Close's reset may be a fraction of a second."""
    assert parse_close_ratelimit("limit=100, remaining=0, reset=0.25") == RateLimitInfo(
        100, 0, 0.25
    )


def test_parse_close_ratelimit_garbage_returns_none() -> None:
    """A header with no key=number part is ignored."""
    assert parse_close_ratelimit("soon, maybe") is None
    assert parse_close_ratelimit("") is None
    assert parse_close_ratelimit(None) is None


def test_parse_close_ratelimit_partial_garbage_keeps_good_parts() -> None:
    """One bad part does not throw away the readable ones."""
    assert parse_close_ratelimit("limit=abc, remaining=3, reset=1.5") == RateLimitInfo(None, 3, 1.5)


def test_parse_calendly_ratelimit_reads_three_headers() -> None:
    """Calendly's X-RateLimit-* headers become one RateLimitInfo."""
    headers = {"X-RateLimit-Limit": "500", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "7"}
    assert parse_calendly_ratelimit(headers) == RateLimitInfo(500, 0, 7.0)


def test_parse_calendly_ratelimit_garbage_returns_none() -> None:
    """Unreadable or negative values count as absent."""
    headers = {"X-RateLimit-Reset": "later", "X-RateLimit-Remaining": "-1"}
    assert parse_calendly_ratelimit(headers) is None
    assert parse_calendly_ratelimit({}) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        (" 1.5 ", 1.5),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("-2", None),
        (None, None),
    ],
)
def test_parse_retry_after_seconds_only(value: str | None, expected: float | None) -> None:
    """Retry-After is read in seconds; dates, negatives and absence give None."""
    assert parse_retry_after(value) == expected


def test_wait_from_429_both_headers_takes_longer() -> None:
    """With both RateLimit reset and Retry-After, the longer wait wins."""
    headers = {"RateLimit": "limit=100, remaining=0, reset=0.25", "Retry-After": "1"}
    assert wait_from_429("Close", headers) == 1.0
    headers = {"RateLimit": "limit=100, remaining=0, reset=4.5", "Retry-After": "1"}
    assert wait_from_429("Close", headers) == 4.5


def test_wait_from_429_no_headers_uses_fallback() -> None:
    """A bare 429 waits the fallback rather than hammering."""
    assert wait_from_429("Calendly", {}) == FALLBACK_RATE_LIMIT_WAIT


def test_field_errors_of_close_shape_maps_fields() -> None:
    """Close's `field-errors` object becomes {field: message}."""
    assert field_errors_of({"field-errors": {"url": "Enter a valid URL."}}) == {
        "url": "Enter a valid URL."
    }


def test_field_errors_of_calendly_shape_maps_parameters() -> None:
    """Calendly's `details` list becomes {parameter: message}; a missing parameter is 'request'."""
    body = {
        "title": "Invalid Argument",
        "details": [{"parameter": "count", "message": "too big"}, {"message": "bad"}],
    }
    assert field_errors_of(body) == {"count": "too big", "request": "bad"}


def test_field_errors_of_not_a_dict_returns_empty() -> None:
    """A body that is not an object has no field errors."""
    assert field_errors_of(["x"]) == {}
    assert field_errors_of(None) == {}


# --- retry arithmetic -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (0, 0.0, 0.5),
        (0, 0.5, 0.75),
        (0, 0.999, 0.9995),
        (1, 0.0, 1.0),
        (3, 0.5, 6.0),
        (10, 0.0, 30.0),
        (10, 0.999, 59.97),
    ],
)
def test_transient_delay_literal_values(attempt: int, rand: float, expected: float) -> None:
    """Equal-jitter backoff: half the capped step always, half drawn."""
    assert transient_delay(attempt, lambda: rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("wait", "rand", "expected"),
    [
        (0.25, 0.0, 0.25),
        (0.25, 0.5, 0.2625),
        (5.0, 0.999, 5.4995),
        (60.0, 0.5, 61.0),
        (60.0, 0.999, 61.998),
        (-1.0, 0.5, 0.0),
    ],
)
def test_rate_limit_delay_literal_values(wait: float, rand: float, expected: float) -> None:
    """Never less than asked; jitter at most 10 % of the wait and at most 2 s."""
    assert rate_limit_delay(wait, lambda: rand) == pytest.approx(expected)


def test_wait_budget_spend_until_exhausted() -> None:
    """The budget allows waits up to its total and refuses beyond."""
    budget = WaitBudget(10.0)
    assert budget.allows(10.0)
    budget.spend(7.5)
    assert budget.allows(2.5)
    assert not budget.allows(2.6)


# --- shape checks and OAuth error codes ----------------------------------------------------


class _Shape(BaseModel):
    id: str
    count: int


def test_parse_body_wrong_shape_names_fields_never_values() -> None:
    """A body of the wrong shape is summarized by field path; its values are never quoted."""
    with pytest.raises(BadResponse) as caught:
        parse_body(_Shape, {"count": "sekrit-token"}, api="Close", method="GET", endpoint="/me/")
    assert caught.value.message == (
        "Close GET /me/ answered 200 with an unexpected body: "
        "id: Field required; count: Input should be a valid integer, unable to parse string as an "
        "integer"
    )
    assert "sekrit" not in repr(caught.value)
    assert caught.value.__cause__ is None


def test_parse_body_none_is_an_empty_body() -> None:
    """A 2xx without a body where one is expected is a BadResponse saying so."""
    with pytest.raises(BadResponse, match=r"^Calendly GET /users/me answered with an empty body$"):
        parse_body(_Shape, None, api="Calendly", method="GET", endpoint="/users/me")


def test_summarize_many_errors_counts_the_rest() -> None:
    """Past three field errors, the rest are counted rather than listed."""

    class Wide(BaseModel):
        a: int
        b: int
        c: int
        d: int
        e: int

    with pytest.raises(ValidationError) as caught:
        Wide.model_validate({})
    assert summarize(caught.value) == (
        "a: Field required; b: Field required; c: Field required; (+2 more)"
    )


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Close POST /token/ answered 400: invalid_grant; Refresh token is spent.", True),
        ("Close POST /token/ answered 400: invalid_grant", True),
        ("Close POST /token/ answered 400: invalid_request; invalid_grant_type", False),
        ("Close POST /token/ answered 400 with a non-JSON body", False),
    ],
)
def test_is_invalid_grant_matches_whole_error_code(message: str, expected: bool) -> None:
    """Only the exact `invalid_grant` code among the error's parts counts."""
    error = Rejected(
        message, field_errors={}, api="Close", method="POST", endpoint="/token/", status=400
    )
    assert is_invalid_grant(error) is expected


# --- ApiHttp against the sandbox ------------------------------------------------------------


def _close_me(http: ApiHttp, sb: Sandbox) -> object:
    token = sb.users[0].close_access_token
    return http.request("GET", "/me/", headers={"Authorization": f"Bearer {token}"})


def _calendly_me(http: ApiHttp, sb: Sandbox) -> object:
    token = sb.users[0].calendly_token
    return http.request("GET", "/users/me", headers={"Authorization": f"Bearer {token}"})


def test_api_http_close_429_fractional_reset_waits_then_retries(
    sb: Sandbox, fake: FakeClock
) -> None:
    """A Close 429 with `reset=0.25` is waited out (never sooner) and the call then succeeds."""
    sb.world.add_fault(api="close", kind="429", reset=0.25, json_body=True)
    http = api_http("Close", sb.close_api_url, fake)
    assert isinstance(_close_me(http, sb), dict)
    assert len(fake.sleeps) == 1
    assert fake.sleeps[0] >= 0.25
    assert http.calls == 2


def test_api_http_calendly_429_empty_body_waits_reset(sb: Sandbox, fake: FakeClock) -> None:
    """A Calendly 429 with an empty body is waited for X-RateLimit-Reset seconds, then retried."""
    sb.world.add_fault(api="calendly", kind="429", reset=3)
    http = api_http("Calendly", sb.calendly_api_url, fake)
    assert isinstance(_calendly_me(http, sb), dict)
    assert fake.sleeps == [3.0]


def test_api_http_5xx_twice_retried_with_backoff(sb: Sandbox, fake: FakeClock) -> None:
    """Two 502s are retried after 0.5 s and 1 s (rand 0), and the third try succeeds."""
    sb.world.add_fault(api="close", kind="502", count=2)
    http = api_http("Close", sb.close_api_url, fake)
    assert isinstance(_close_me(http, sb), dict)
    assert fake.sleeps == [0.5, 1.0]


def test_api_http_transient_budget_exhausted_raises_naming_the_call(
    sb: Sandbox, fake: FakeClock
) -> None:
    """When the budget cannot cover the next backoff, the last TransientError is raised."""
    sb.world.add_fault(api="close", kind="503", count=5)
    http = api_http("Close", sb.close_api_url, fake, budget=0.5)
    with pytest.raises(TransientError) as caught:
        _close_me(http, sb)
    assert caught.value.message.startswith("Close GET /me/ answered 503")
    assert (caught.value.api, caught.value.method, caught.value.endpoint) == (
        "Close",
        "GET",
        "/me/",
    )
    assert caught.value.status == 503
    assert fake.sleeps == [0.5]


def test_api_http_rate_limit_beyond_budget_raises_rate_limited(
    sb: Sandbox, fake: FakeClock
) -> None:
    """A 429 asking for longer than the budget raises RateLimited at once, carrying the wait."""
    sb.world.add_fault(api="calendly", kind="429", reset=30)
    http = api_http("Calendly", sb.calendly_api_url, fake, budget=10)
    with pytest.raises(RateLimited) as caught:
        _calendly_me(http, sb)
    assert caught.value.message == (
        "Calendly GET /users/me answered 429 with an empty body (wait 30 s)"
    )
    assert caught.value.wait_seconds == 30
    assert fake.sleeps == []


def test_api_http_hang_with_short_read_timeout_raises_timed_out(
    sb: Sandbox, fake: FakeClock
) -> None:
    """A server that never answers becomes TransientError 'timed out' after the read timeout."""
    sb.world.add_fault(api="close", kind="hang")
    http = api_http("Close", sb.close_api_url, fake, max_attempts=1, timeout=(2.0, 0.2))
    with pytest.raises(TransientError, match=r"^Close GET /me/ timed out"):
        _close_me(http, sb)


def test_api_http_reset_connection_raises_transient(sb: Sandbox, fake: FakeClock) -> None:
    """A connection reset mid-request becomes a TransientError naming the call."""
    sb.world.add_fault(api="close", kind="reset")
    http = api_http("Close", sb.close_api_url, fake, max_attempts=1)
    with pytest.raises(TransientError, match=r"^Close GET /me/ failed: connection error"):
        _close_me(http, sb)


def test_api_http_html_502_raises_transient_naming_html(sb: Sandbox, fake: FakeClock) -> None:
    """A gateway's HTML 502 page is reported as such, not dumped into the message."""
    sb.world.add_fault(api="calendly", kind="html")
    http = api_http("Calendly", sb.calendly_api_url, fake, max_attempts=1)
    with pytest.raises(TransientError) as caught:
        _calendly_me(http, sb)
    assert caught.value.message == (
        "Calendly GET /users/me answered 502 with an HTML page instead of JSON"
    )


def test_api_http_truncated_json_raises_bad_response(sb: Sandbox, fake: FakeClock) -> None:
    """A 200 whose JSON is cut off is a BadResponse, retried like any transient error."""
    sb.world.add_fault(api="calendly", kind="truncated", count=5)
    http = api_http("Calendly", sb.calendly_api_url, fake, budget=1)
    with pytest.raises(BadResponse) as caught:
        _calendly_me(http, sb)
    assert caught.value.message == (
        "Calendly GET /users/me answered 200 with a truncated or invalid JSON body"
    )


def test_api_http_remaining_zero_waits_before_next_call_to_group(
    sb: Sandbox, fake: FakeClock
) -> None:
    """After `remaining=0`, the next call to that group waits for `reset` instead of getting 429."""
    sb.world.update_config(close_rate_limit=2)
    http = api_http("Close", sb.close_api_url, fake)
    _close_me(http, sb)
    assert fake.sleeps == []
    _close_me(http, sb)  # answers remaining=0
    assert fake.sleeps == []
    _close_me(http, sb)
    assert len(fake.sleeps) == 1
    assert 0 < fake.sleeps[0] <= 1.0
    assert http.calls == 3  # waited, not refused and retried
    counts = sb.world.request_counts()
    assert sum(n for key, n in counts.items() if key.startswith("close GET")) == 3


def test_api_http_token_with_non_latin1_character_fails_without_echoing_it(
    sb: Sandbox, fake: FakeClock
) -> None:
    """A token HTTP headers cannot carry becomes AuthFailed naming the call, not the token."""
    http = api_http("Close", sb.close_api_url, fake)
    token = "close_at_s3cret’"
    with pytest.raises(AuthFailed) as caught:
        http.request("GET", "/me/", endpoint="/me/", headers={"Authorization": f"Bearer {token}"})
    assert "Close GET /me/ could not be sent" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in repr(caught.value)
    assert caught.value.__cause__ is None


def test_http_sessions_one_session_per_api_keeps_no_cookie_between_runs() -> None:
    """The process's session of an API serves every run but keeps no cookie: one user's answer
    setting one (a load balancer's, say) sends nothing along with the next user's call."""
    sessions = HttpSessions(pool_size=4)
    with scripted_server() as server:
        server.answers.append(Scripted({"run": 1}, headers={"Set-Cookie": "lb=user-a; Path=/"}))
        server.queue({"run": 2})
        for _ in range(2):
            http = ApiHttp(api="Close", base_url=server.url, session=sessions.get("Close"))
            http.request("GET", "/me/")
        assert server.cookies == [None, None]
    assert sessions.get("Close") is sessions.get("Close")
    assert sessions.get("Close") is not sessions.get("Calendly")
    sessions.close()
