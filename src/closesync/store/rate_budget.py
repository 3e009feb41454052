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
the current window (0 while blocked), for the `closesync_rate_budget_remaining` gauge. Which
organizations and groups to report is kept in Redis (`Keys.rate_budgets_seen`), not in a
process's memory: under `--pool prefork` the pool processes take from the budgets while the
worker's main process serves the scrape. Each process notes a pair at most once a minute
(`NOTE_EVERY_SECONDS`); a pair no one took from for `QUIET_SECONDS` drops out.
`close_remaining_seen` reads every noted pair in two round trips, whatever their number.
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

from closesync.core.errors import StoreUnavailable
from closesync.settings import Settings
from closesync.store.client import guard
from closesync.store.keys import Keys, watched

log = logging.getLogger(__name__)

# Seconds: the least wait `take` answers, so that a caller whose window frees "now" (a race with
# another taker, clocks a hair apart) retries after a pause instead of spinning on Redis.
MIN_WAIT_SECONDS = 0.01
# Seconds between two notes of one (organization, group) pair by one process: a ZADD a minute,
# not one per request.
NOTE_EVERY_SECONDS = 60.0
# Seconds after its last note that a pair drops out of the gauge (an organization gone quiet).
QUIET_SECONDS = 600.0
# Pairs kept at most: far more than one deployment's organizations times Close's endpoint groups.
MAX_BUDGETS_SEEN = 2000
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
        self.storage = storage
        self.close_org = close_org
        self.close_user = close_user
        self.calendly_user = calendly_user
        # (organization, group) -> when this process last noted it in Redis.
        self._noted: dict[tuple[str, str], float] = {}

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

    def note_close_budget(self, organization_id: str, group: str, now: float) -> None:
        """This process took from `organization_id`'s budget of `group`: keep the pair in the
        gauge's set (at most once per NOTE_EVERY_SECONDS per process; best effort)."""
        pair = (organization_id, group)
        if now - self._noted.get(pair, -math.inf) < NOTE_EVERY_SECONDS:
            return
        self._noted[pair] = now
        key = self.keys.rate_budgets_seen()
        try:
            with guard("noting a Close rate budget for the metrics"), self.redis.pipeline() as pipe:
                pipe.zadd(key, {f"{organization_id}\t{group}": now})
                pipe.zremrangebyrank(key, 0, -(MAX_BUDGETS_SEEN + 1))
                pipe.expire(key, int(QUIET_SECONDS))
                pipe.execute()
        except StoreUnavailable as error:
            log.debug("a rate budget was not noted for the metrics: %s", error)

    def close_remaining_seen(self, now: float) -> dict[tuple[str, str], int]:
        """`close_remaining` of every (organization, group) pair taken from in the last
        QUIET_SECONDS, in two round trips (the pairs, then all their windows and blocks)."""
        key = self.keys.rate_budgets_seen()
        with guard("reading the Close rate budgets"):
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(key, "-inf", now - QUIET_SECONDS)
                pipe.zrange(key, 0, MAX_BUDGETS_SEEN - 1)
                _, members = pipe.execute()
            pairs = []
            for member in members:
                text = member.decode() if isinstance(member, bytes) else str(member)
                organization, _, group = text.partition("\t")
                pairs.append((organization, group))
            item = self.close_org
            with self.redis.pipeline(transaction=False) as pipe:
                for organization, group in pairs:
                    scope = f"close-org:{organization}"
                    pipe.pttl(self.keys.rate_blocked(scope, group))
                    window = self.storage.prefixed_key(item.key_for(scope, group))
                    # The `limits` moving window's own read (get_window_stats), pipelined.
                    self.storage.lua_moving_window(
                        [window], [time.time() - item.get_expiry(), item.amount], client=pipe
                    )
                answers = pipe.execute()
        found = {}
        for index, pair in enumerate(pairs):
            blocked, window = answers[2 * index], answers[2 * index + 1]
            taken = int(window[1]) if window else 0
            found[pair] = 0 if int(blocked) > 0 else max(0, item.amount - taken)
        return found

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
            self.budgets.note_close_budget(self.organization_id, group, time.time())
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
