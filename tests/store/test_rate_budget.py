"""The shared rate budgets against a real Redis: two clients (as two processes would) share one.

Windows are a minute or an hour long, so that nothing a test takes expires while it runs, however
slow the machine; the one test about a reset lasting a fraction of a second awaits it.
"""

from __future__ import annotations

import logging
import time

import pytest
import redis
from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerMinute
from redis.backoff import NoBackoff
from redis.retry import Retry

from closesync.core.errors import StoreUnavailable
from closesync.settings import Settings
from closesync.store.client import connect
from closesync.store.keys import Keys
from closesync.store.rate_budget import RateBudgets, SharedBudget
from tests.redis_server import free_port

GROUP = "POST /scheduling_link/integration/"
OTHER_GROUP = "GET /scheduling_link/"


def budgets(
    url: str,
    keys: Keys,
    *,
    close_org: RateLimitItem | None = None,
    close_user: RateLimitItem | None = None,
    calendly_user: RateLimitItem | None = None,
) -> RateBudgets:
    """Budgets on a client of their own (one per process in production)."""
    return RateBudgets(
        connect(url),
        keys,
        close_org=close_org or RateLimitItemPerHour(100),
        close_user=close_user or RateLimitItemPerHour(100),
        calendly_user=calendly_user or RateLimitItemPerHour(100),
    )


def takes(budget: SharedBudget, group: str, n: int) -> list[bool]:
    """Whether each of `n` takes got a request at once."""
    return [budget.take(group) == 0.0 for _ in range(n)]


def test_rate_budget_two_clients_share_one_organization_budget(redis_url: str, keys: Keys) -> None:
    """Two clients of one Close organization draw from one budget; the spent one says how long."""
    first = budgets(redis_url, keys, close_org=RateLimitItemPerMinute(3))
    second = budgets(redis_url, keys, close_org=RateLimitItemPerMinute(3))
    alice = first.close("orga_1", "user_alice")
    bob = second.close("orga_1", "user_bob")
    assert takes(alice, GROUP, 2) == [True, True]
    assert takes(bob, GROUP, 2) == [True, False]
    wait = alice.take(GROUP)
    assert 0 < wait <= 60
    assert takes(bob, OTHER_GROUP, 1) == [True]  # Close counts each endpoint group apart


def test_rate_budget_close_user_limit_applies_per_user(redis_url: str, keys: Keys) -> None:
    """A Close user's own (per-key) limit stops that user only; colleagues keep the org's room."""
    shared = budgets(redis_url, keys, close_user=RateLimitItemPerMinute(1))
    assert takes(shared.close("orga_1", "user_alice"), GROUP, 2) == [True, False]
    assert takes(shared.close("orga_1", "user_bob"), GROUP, 1) == [True]


def test_rate_budget_header_block_stops_other_client_until_reset(
    redis_url: str, keys: Keys
) -> None:
    """remaining=0 seen by one client makes the other wait until the announced reset, then go."""
    alice = budgets(redis_url, keys).close("orga_1", "user_alice")
    bob = budgets(redis_url, keys).close("orga_1", "user_bob")
    alice.block(GROUP, 0.3)
    wait = bob.take(GROUP)
    assert 0 < wait <= 0.3
    assert bob.take(OTHER_GROUP) == 0.0
    deadline = time.monotonic() + 10
    while bob.take(GROUP) > 0:  # the reset, awaited rather than slept through
        assert time.monotonic() < deadline, "the block outlived its reset"
        time.sleep(0.02)


def test_rate_budget_shorter_block_never_shortens_a_longer_one(redis_url: str, keys: Keys) -> None:
    """A 429 asking for 30 s is not undone by a later response announcing a reset of 0.1 s."""
    budget = budgets(redis_url, keys).close("orga_1", "user_alice")
    budget.block(GROUP, 30)
    budget.block(GROUP, 0.1)
    assert budget.take(GROUP) > 20


def test_rate_budget_organization_a_exhausted_never_slows_b(redis_url: str, keys: Keys) -> None:
    """Organization A spent and blocked: organization B's callers take at once."""
    shared = budgets(redis_url, keys, close_org=RateLimitItemPerMinute(2))
    org_a = shared.close("orga_A", "user_a")
    org_b = shared.close("orga_B", "user_b")
    assert takes(org_a, GROUP, 3) == [True, True, False]
    org_a.block(GROUP, 30)
    assert takes(org_b, GROUP, 2) == [True, True]


def test_rate_budget_unknown_organization_keyed_by_close_user(redis_url: str, keys: Keys) -> None:
    """Without an organization id each Close user has a budget of their own."""
    shared = budgets(redis_url, keys, close_org=RateLimitItemPerMinute(1))
    assert takes(shared.close(None, "user_alice"), GROUP, 2) == [True, False]
    assert takes(shared.close(None, "user_bob"), GROUP, 1) == [True]


def test_rate_budget_calendly_shared_grant_is_one_budget(redis_url: str, keys: Keys) -> None:
    """Connections reading one organization credential share its budget; own grants do not."""
    shared = budgets(redis_url, keys, calendly_user=RateLimitItemPerMinute(2))
    first = shared.calendly("uuid-1", shared_grant_ref="org-ref")
    second = shared.calendly("uuid-2", shared_grant_ref="org-ref")
    assert takes(first, "GET /event_types", 1) + takes(second, "GET /users/me", 2) == [
        True,
        True,
        False,
    ]
    assert takes(shared.calendly("uuid-3"), "GET /event_types", 2) == [True, True]


def test_rate_budget_calendly_block_covers_every_endpoint(redis_url: str, keys: Keys) -> None:
    """Calendly counts per user: a reset seen on one endpoint holds for all of that user's."""
    budget = budgets(redis_url, keys).calendly("uuid-1")
    budget.block("GET /event_types", 30)
    assert budget.take("GET /users/me") > 20
    assert budgets(redis_url, keys).calendly("uuid-2").take("GET /users/me") == 0.0


def test_rate_budget_from_settings_uses_configured_rates(redis_url: str, keys: Keys) -> None:
    """The settings' rates become the budgets' limits (Close per second, Calendly per minute)."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, close_org_requests_per_second=7, calendly_user_requests_per_minute=9
    )
    shared = RateBudgets.from_settings(connect(redis_url), keys, settings)
    assert (shared.close_org.amount, shared.close_org.get_expiry()) == (7, 1)
    assert (shared.calendly_user.amount, shared.calendly_user.get_expiry()) == (9, 60)


def test_rate_budget_redis_down_take_fails_block_logs(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """Without Redis, take raises StoreUnavailable (nothing is sent); block only logs."""
    client = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    budget = RateBudgets(
        client,
        keys,
        close_org=RateLimitItemPerMinute(1),
        close_user=RateLimitItemPerMinute(1),
        calendly_user=RateLimitItemPerMinute(1),
    ).close("orga_1", "user_alice")
    with pytest.raises(StoreUnavailable, match="rate budget of close-org:orga_1"):
        budget.take(GROUP)
    with caplog.at_level(logging.WARNING):
        budget.block(GROUP, 1.0)
    assert "not shared with the other processes" in caplog.text
