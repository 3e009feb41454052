"""ApiHttp with the shared rate budget: real Redis, the sandbox over loopback HTTP.

Two ApiHttp objects stand for two runs in two processes (each its own Redis client): what one
spends or learns from the headers, the other sees. The sandbox's clock is frozen at the start of
a rate window, so every reset it announces is the whole window.
"""

from __future__ import annotations

import time

import pytest
from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerMinute

from closesync.apis.http import ApiHttp
from closesync.core.errors import RateLimited
from closesync.core.retry import WaitBudget
from closesync.sandbox import Sandbox
from closesync.sandbox.records import SeededUser
from closesync.store.client import connect
from closesync.store.keys import Keys
from closesync.store.rate_budget import RateBudgets
from tests._sandbox import FakeClock, api_http

LOOSE = RateLimitItemPerHour(1000)


def budgets(redis_url: str, keys: Keys, close_org: RateLimitItem = LOOSE) -> RateBudgets:
    """The budgets of one process: a Redis client of its own."""
    return RateBudgets(
        connect(redis_url), keys, close_org=close_org, close_user=LOOSE, calendly_user=LOOSE
    )


def close_run(sb: Sandbox, fake: FakeClock, shared: RateBudgets, user: SeededUser) -> ApiHttp:
    """The Close HTTP layer of one user's run, on the shared budget of their organization."""
    http = api_http("Close", sb.close_api_url, fake, budget=5)
    http.rate_budget = shared.close(user.close_organization_id, user.close_user_id)
    return http


def close_me(http: ApiHttp, user: SeededUser) -> object:
    auth = {"Authorization": f"Bearer {user.close_access_token}"}
    return http.request("GET", "/me/", headers=auth)


def calendly_me(http: ApiHttp, user: SeededUser) -> object:
    return http.request(
        "GET", "/users/me", headers={"Authorization": f"Bearer {user.calendly_token}"}
    )


def sandbox_requests(sb: Sandbox, prefix: str) -> int:
    return sum(n for key, n in sb.world.request_counts().items() if key.startswith(prefix))


def at_window_start(sb: Sandbox, window: float) -> None:
    """Move the frozen sandbox clock to the start of its next rate window."""
    sb.world.advance_clock(window - sb.world.now() % window)


def test_api_http_shared_budget_spent_raises_rate_limited_before_sending(
    sb: Sandbox, fake: FakeClock, redis_url: str, keys: Keys
) -> None:
    """Two runs of one organization spend one budget; past it, nothing is sent, nothing slept."""
    alice, bob = sb.users[0], sb.users[1]
    org = RateLimitItemPerMinute(2)
    first = close_run(sb, fake, budgets(redis_url, keys, org), alice)
    second = close_run(sb, fake, budgets(redis_url, keys, org), bob)
    close_me(first, alice)
    close_me(second, bob)
    with pytest.raises(RateLimited, match="the shared rate budget is spent") as caught:
        close_me(first, alice)
    assert caught.value.wait_seconds > 5
    assert caught.value.status is None
    assert fake.sleeps == []
    assert sandbox_requests(sb, "close GET /api/v1/me/") == 2


def test_api_http_remaining_zero_blocks_the_organizations_other_runs(
    sb: Sandbox, fake: FakeClock, redis_url: str, keys: Keys
) -> None:
    """`remaining=0` seen by Alice's run stops Bob's (same organization) until the reset."""
    sb.world.update_config(close_rate_limit=2, close_rate_window=30)
    at_window_start(sb, 30)
    alice, bob = sb.users[0], sb.users[1]
    first = close_run(sb, fake, budgets(redis_url, keys), alice)
    close_me(first, alice)
    close_me(first, alice)  # answers remaining=0, reset=30
    with pytest.raises(RateLimited) as caught:
        close_me(close_run(sb, fake, budgets(redis_url, keys), bob), bob)
    assert 25 < caught.value.wait_seconds <= 30
    assert sandbox_requests(sb, "close") == 2
    assert sb.world.rate_limited_counts() == {}


def test_api_http_429_blocks_the_shared_budget_for_its_reset(
    sb: Sandbox, fake: FakeClock, redis_url: str, keys: Keys
) -> None:
    """A 429 one run meets holds back the organization's other runs for the wait it asked."""
    sb.world.add_fault(api="close", kind="429", reset=20)
    alice, bob = sb.users[0], sb.users[1]
    with pytest.raises(RateLimited, match="answered 429"):
        close_me(close_run(sb, fake, budgets(redis_url, keys), alice), alice)
    with pytest.raises(RateLimited, match="the shared rate budget is spent") as caught:
        close_me(close_run(sb, fake, budgets(redis_url, keys), bob), bob)
    assert 15 < caught.value.wait_seconds <= 20
    assert sandbox_requests(sb, "close") == 1


def test_api_http_calendly_remaining_zero_blocks_that_users_other_runs(
    sb: Sandbox, fake: FakeClock, redis_url: str, keys: Keys
) -> None:
    """Calendly's X-RateLimit-Remaining 0 stops the user's next run; another user's goes on."""
    sb.world.update_config(calendly_rate_limit=1)
    at_window_start(sb, 60)
    alice, bob = sb.users[0], sb.users[1]

    def calendly_run(user: SeededUser) -> ApiHttp:
        http = api_http("Calendly", sb.calendly_api_url, fake, budget=5)
        http.rate_budget = budgets(redis_url, keys).calendly(user.calendly_user_uuid)
        return http

    calendly_me(calendly_run(alice), alice)  # the minute's one request: remaining 0
    with pytest.raises(RateLimited, match="the shared rate budget is spent"):
        calendly_me(calendly_run(alice), alice)
    assert isinstance(calendly_me(calendly_run(bob), bob), dict)
    assert sandbox_requests(sb, "calendly") == 2


def test_api_http_shared_budget_short_wait_is_waited_then_sent(
    sb: Sandbox, redis_url: str, keys: Keys
) -> None:
    """A wait for the shared budget that fits the run's wait budget is waited out in place."""
    alice, bob = sb.users[0], sb.users[1]
    shared = budgets(redis_url, keys)
    shared.close(alice.close_organization_id, alice.close_user_id).block("GET /me/", 0.2)
    http = ApiHttp(
        api="Close",
        base_url=sb.close_api_url,
        budget=WaitBudget(5),
        rate_budget=shared.close(bob.close_organization_id, bob.close_user_id),
        sleep=time.sleep,
        clock=time.monotonic,
    )
    assert isinstance(close_me(http, bob), dict)
    assert 0.2 <= http.budget.spent_seconds <= 5
    assert http.calls == 1
