"""Rate budgets kept in Redis, shared by every process and host: per Close organization, per
Calendly user.

Close limits requests per endpoint group, per organization (3x the per-key limit, shared with the
customer's other integrations) and per API key (one OAuth grant, one Close user); Calendly per
user, and an organization credential spends its admin's budget. Every closesync process calling
for one account therefore takes its requests from one budget here (decisions.md: limits shared
by several processes live in Redis, with a maintained library's algorithm, and learn from the
APIs' headers).

The arithmetic is the `limits` package's moving window, run on closesync's own Redis connection
pool (so a `sentinel://` REDIS_URL, the timeouts and the no-silent-retry policy of
`closesync.store.client` hold for it too). A moving window of N per W seconds never lets more
than N requests start within any W seconds, wherever the API's own windows begin; a fixed window
of ours could put 2N into one window of theirs. Its entries are the taking host's `time.time()`:
hosts must keep their clocks in step (NTP), as a skew of s seconds can let a few requests through
s seconds early. A budget whose request was taken but not sent (a crash in between) only ever
undercounts what is left, never overcounts.

Learning: `block(group, seconds)` (a 429, or a response saying `remaining=0`) sets a key whose
TTL is the announced reset; `take` reads its PTTL first, on Redis's clock, so every caller of the
account waits until the reset. A block is never shortened by a later, shorter one. Close's
headers do not say which bucket ran out (the key's or the organization's), so a block covers the
organization's group: at worst the other users of the organization wait one reset too many.

Reading: `close_remaining` says how many requests of a group a Close organization has left in
the current window (0 while blocked), for the `closesync_rate_budget_remaining` gauge; a process
reports the organizations and groups it spent budget of (`closesync.meters.saw_close_budget`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import redis
from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from closesync import meters
from closesync.core.errors import StoreUnavailable
from closesync.settings import Settings
from closesync.store.client import guard
from closesync.store.keys import Keys, watched

log = logging.getLogger(__name__)

# Seconds: the least wait `take` answers, so that a caller whose window frees "now" (a race with
# another taker, clocks a hair apart) retries after a pause instead of spinning on Redis.
MIN_WAIT_SECONDS = 0.01
# Seconds: the longest block one response may impose on a whole account. A reset beyond an hour is
# no rate window Close or Calendly documents (seconds, a minute); capping it keeps a misread
# header from stopping an organization's every sync for longer. The caller that saw it still
# waits what it was told.
MAX_BLOCK_SECONDS = 3600.0


@dataclass(frozen=True)
class Limit:
    """`item` (N requests per window) of one scope; per endpoint group, or for all of them."""

    scope: str
    item: RateLimitItem
    per_group: bool


class RateBudgets:
    """The shared budgets of one deployment; one per process, over its Redis client."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        close_org: RateLimitItem,
        close_user: RateLimitItem,
        calendly_user: RateLimitItem,
    ) -> None:
        self.redis = client
        self.keys = keys
        # The scheme only names the client class; the connection pool is closesync's own.
        storage = RedisStorage(
            "redis://", connection_pool=client.connection_pool, key_prefix=keys.rate_budget()
        )
        self.limiter = MovingWindowRateLimiter(storage)
        self.close_org = close_org
        self.close_user = close_user
        self.calendly_user = calendly_user

    @classmethod
    def from_settings(cls, client: redis.Redis, keys: Keys, settings: Settings) -> RateBudgets:
        """The budgets at the configured rates (Close per second, Calendly per minute)."""
        return cls(
            client,
            keys,
            close_org=RateLimitItemPerSecond(settings.close_org_requests_per_second),
            close_user=RateLimitItemPerSecond(settings.close_user_requests_per_second),
            calendly_user=RateLimitItemPerMinute(settings.calendly_user_requests_per_minute),
        )

    def close(self, organization_id: str | None, close_user_id: str) -> SharedBudget:
        """The budget of a Close user's calls: their organization's and their own, per group.

        An unknown organization (a connection stored before closesync recorded it) is keyed by
        the user, so it still shares with every process, if not with the user's colleagues.
        """
        user = f"close-user:{close_user_id}"
        org = f"close-org:{organization_id}" if organization_id else user
        limits = (Limit(org, self.close_org, True), Limit(user, self.close_user, True))
        return SharedBudget(
            self, limits, block_scope=org, block_per_group=True, organization_id=organization_id
        )

    def close_remaining(self, organization_id: str, group: str) -> int:
        """Requests of `group` Close organization `organization_id` has left in the current window
        of its shared budget: 0 while an API-announced reset blocks it."""
        scope = f"close-org:{organization_id}"
        with guard(f"reading the rate budget of {scope}"):
            if int(self.redis.pttl(self.keys.rate_blocked(scope, group))) > 0:
                return 0
            stats = self.limiter.get_window_stats(self.close_org, scope, group)
        return max(0, int(stats.remaining))

    def calendly(self, user_uuid: str, shared_grant_ref: str | None = None) -> SharedBudget:
        """The budget of the Calendly account whose token makes the calls: the connection's own
        user, or the organization credential `shared_grant_ref` (its admin's budget, shared by
        every connection that reads it). Calendly counts per user, not per endpoint."""
        scope = (
            f"calendly-org:{shared_grant_ref}" if shared_grant_ref else f"calendly-user:{user_uuid}"
        )
        limits = (Limit(scope, self.calendly_user, False),)
        return SharedBudget(self, limits, block_scope=scope, block_per_group=False)


class SharedBudget:
    """One account's budget (`closesync.apis.http.RateBudget`), shared through Redis."""

    def __init__(
        self,
        budgets: RateBudgets,
        limits: tuple[Limit, ...],
        *,
        block_scope: str,
        block_per_group: bool,
        organization_id: str | None = None,
    ) -> None:
        self.budgets = budgets
        # A Close organization's budget: reported by the metrics (a Calendly one is not).
        self.organization_id = organization_id
        self.limits = limits
        self.block_scope = block_scope
        self.block_per_group = block_per_group

    def _blocked_key(self, group: str) -> str:
        return self.budgets.keys.rate_blocked(
            self.block_scope, group if self.block_per_group else None
        )

    def take(self, group: str) -> float:
        """0 once one request of `group` is taken from every limit, else the seconds to wait.

        Limits are taken in order, the organization's first: when it is spent nothing else is;
        when a later one (the user's) is, the earlier request stays spent, which leaves the
        budget only stricter for that window.
        """
        limiter = self.budgets.limiter
        if self.organization_id is not None:
            meters.saw_close_budget(self.organization_id, group)
        with guard(f"taking a request from the rate budget of {self.block_scope}"):
            blocked_ms = int(self.budgets.redis.pttl(self._blocked_key(group)))
            if blocked_ms > 0:
                return max(blocked_ms / 1000, MIN_WAIT_SECONDS)
            for limit in self.limits:
                ids = (limit.scope, group) if limit.per_group else (limit.scope,)
                if not limiter.hit(limit.item, *ids):
                    reset = limiter.get_window_stats(limit.item, *ids).reset_time
                    return max(reset - time.time(), MIN_WAIT_SECONDS)
        return 0.0

    def block(self, group: str, seconds: float) -> None:
        """No one takes a request of `group` for `seconds` (never shortening a longer block).

        Best effort: a response already answered must not be lost because Redis failed here;
        then only the other processes miss the lesson, and meet the limit themselves.
        """
        seconds = min(seconds, MAX_BLOCK_SECONDS)
        milliseconds = math.ceil(seconds * 1000)
        if milliseconds <= 0:
            return
        key = self._blocked_key(group)

        def apply(pipe: redis.client.Pipeline) -> None:
            left = int(pipe.pttl(key))
            pipe.multi()
            if left < milliseconds:
                pipe.set(key, f"{seconds:g}", px=milliseconds)

        try:
            with guard(f"sharing a rate-limit reset of {self.block_scope}"):
                watched(self.budgets.redis, key, apply)
        except StoreUnavailable as error:
            log.warning("a rate-limit reset was not shared with the other processes: %s", error)
