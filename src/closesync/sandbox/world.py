"""The sandbox's whole state, behind one lock: both vendors' users, Calendly event types,
Close scheduling links, credentials, the clock, faults, rate-limit counters and request counts.

State layout (all in memory, gone when the sandbox stops):
- `cal_users`   Calendly user uuid -> CalendlyUser (one organization, `calendly_org_uuid`;
                the first user is its owner).
- `event_types` event type uuid -> EventType; soft-deleted ones keep `deleted_at`, purged
                ones are gone. `members` lists the users whose listings include the type.
- `close_users` Close user id -> CloseUser (one organization, `close_org_id`).
- `links`       Close link id -> Link, every source; THIRD_PARTY links are keyed for upsert
                by (oauth client, user, source_id).
- `subscriptions` webhook subscription uuid -> WebhookSubscription (webhook_subscriptions.py);
                `deliverer` the queue and threads that POST their deliveries (deliveries.py),
                with its own lock, taken after this one, never before.
- `tokens`      TokenStore: PATs, API keys, OAuth grants and codes with their expiry.
- `faults`      FaultBook of queued rules; `latency_ms` / `error_rate` per API.
- `limiter`     fixed-window counters; `counts` requests per "api METHOD template";
                `rate_limited` the 429s the emulated limits (not injected faults) answered.
- `clock`       wall time (or frozen) plus whatever `advance` added.

Every public method takes the lock, so the HTTP threads, tests and admin calls can share one
World. Methods return rendered JSON copies, never live records.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import fields, replace
from typing import Any

from closesync.sandbox.config import APIS, CLOSE_CLIENT_ID, SandboxConfig
from closesync.sandbox.event_types import EventTypeBook
from closesync.sandbox.faults import FaultBook
from closesync.sandbox.links import LinkBook
from closesync.sandbox.ratelimit import FixedWindowLimiter
from closesync.sandbox.records import (
    JSON,
    CalendlyUser,
    CloseUser,
    EventType,
    SeededUser,
    render_calendly_user,
    render_close_user,
    render_event_type,
    render_membership,
)
from closesync.sandbox.tokens import Token, TokenStore
from closesync.sandbox.traffic import TrafficBook
from closesync.sandbox.webhook_subscriptions import WebhookBook

_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# What a Calendly credential may do unless its OAuth request asked for less; config
# `calendly_withheld_scopes` takes scopes away from every token at run time.
CALENDLY_SCOPE = "users:read event_types:read organizations:read webhooks:read webhooks:write"
CLOSE_SCOPE = "all.full_access offline_access"


class Clock:
    """Sandbox time in epoch seconds: wall time (unless frozen) plus advanced seconds."""

    def __init__(self, frozen: bool) -> None:
        self._start = time.time()
        self._mono = time.monotonic()
        self._frozen = frozen
        self.offset = 0.0

    def now(self) -> float:
        """Current sandbox time."""
        elapsed = 0.0 if self._frozen else time.monotonic() - self._mono
        return self._start + elapsed + self.offset


class World(WebhookBook, EventTypeBook, LinkBook, TrafficBook):
    """All sandbox state; see the module docstring for the layout."""

    def __init__(self, config: SandboxConfig, calendly_base: str, close_base: str) -> None:
        self.lock = threading.RLock()
        self.config = replace(config)
        self.rng = random.Random(config.seed)
        self.fault_rng = random.Random(f"faults-{config.seed}")
        self.clock = Clock(config.freeze_clock)
        self.stop_event = threading.Event()
        self.calendly_base = calendly_base
        self.close_base = close_base
        self.calendly_org_uuid = self.new_uuid()
        self.close_org_id = self.new_id("orga_")
        self.close_org_name = "Sandbox Corp"
        self.cal_users: dict[str, CalendlyUser] = {}
        self.close_users: dict[str, CloseUser] = {}
        self.event_types: dict[str, EventType] = {}
        self.tokens = TokenStore(self.rng)
        self.faults = FaultBook()
        self.limiter = FixedWindowLimiter()
        self.counts: Counter[str] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.seeded: list[SeededUser] = []
        self.latency_ms = dict.fromkeys(APIS, config.latency_ms)
        self.error_rate = dict.fromkeys(APIS, config.error_rate)
        self._oauth_next: dict[str, tuple[str | None, bool, str | None]] = {}
        EventTypeBook.__init__(self)
        LinkBook.__init__(self)
        WebhookBook.__init__(self)

    # ids and time -------------------------------------------------------------------------

    def new_uuid(self) -> str:
        """A Calendly-style uuid from the seeded generator."""
        bits = f"{self.rng.getrandbits(128):032x}"
        return f"{bits[:8]}-{bits[8:12]}-4{bits[13:16]}-a{bits[17:20]}-{bits[20:]}"

    def new_id(self, prefix: str) -> str:
        """A Close-style id (`user_…`, `orga_…`, `schlnk_…`) from the seeded generator."""
        return prefix + "".join(self.rng.choice(_ALPHABET) for _ in range(24))

    def now(self) -> float:
        """Sandbox time in epoch seconds."""
        with self.lock:
            return self.clock.now()

    def advance_clock(self, seconds: float) -> float:
        """Move the sandbox clock forward (expiring tokens, codes and rate windows)."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self.lock:
            self.clock.offset += seconds
            return self.clock.now()

    @property
    def calendly_org_uri(self) -> str:
        """The one Calendly organization's URI."""
        return f"{self.calendly_base}/organizations/{self.calendly_org_uuid}"

    # users --------------------------------------------------------------------------------

    def create_user(
        self, email: str | None = None, name: str | None = None, created_at: float | None = None
    ) -> SeededUser:
        """A new user pair (Calendly and Close, same email) with every credential."""
        with self.lock:
            index = len(self.cal_users)
            email = email or f"user{index}@example.com"
            name = name or f"User {index}"
            if any(u.email == email for u in self.cal_users.values()):
                raise ValueError(f"a user with email {email} exists")
            now = self.clock.now()
            created = now if created_at is None else created_at
            cal = CalendlyUser(
                uuid=self.new_uuid(),
                name=name,
                slug=email.split("@")[0].lower(),
                email=email,
                role="owner" if index == 0 else "user",
                membership_uuid=self.new_uuid(),
                created_at=created,
                updated_at=created,
            )
            self.cal_users[cal.uuid] = cal
            first, _, last = name.partition(" ")
            close = CloseUser(
                self.new_id("user_"),
                email,
                first,
                last,
                self.close_org_id,
                self.new_id("membership_"),
            )
            self.close_users[close.id] = close
            pat = self.tokens.issue("calendly", "pat", cal.uuid, now, scope=CALENDLY_SCOPE)
            ttl = self.config.access_token_ttl_close
            grant = self.tokens.issue_grant(
                "close", close.id, CLOSE_CLIENT_ID, CLOSE_SCOPE, ttl, now, self.close_org_id
            )
            key = self.tokens.issue("close", "api_key", close.id, now, scope=CLOSE_SCOPE)
            seeded = SeededUser(
                email=email,
                name=name,
                calendly_user_uuid=cal.uuid,
                calendly_user_uri=f"{self.calendly_base}/users/{cal.uuid}",
                calendly_token=pat.value,
                close_user_id=close.id,
                close_organization_id=self.close_org_id,
                close_access_token=grant.access.value,
                close_refresh_token=grant.refresh.value,
                close_api_key=key.value,
                calendly_organization_uri=self.calendly_org_uri,
            )
            self.seeded.append(seeded)
            return seeded

    def users(self) -> list[SeededUser]:
        """Every user pair created so far, seeded or added."""
        with self.lock:
            return list(self.seeded)

    def calendly_user(self, uuid: str) -> JSON | None:
        """A rendered Calendly user."""
        with self.lock:
            user = self.cal_users.get(uuid)
            if user is None:
                return None
            return render_calendly_user(user, self.calendly_base, self.calendly_org_uuid)

    def calendly_role(self, uuid: str) -> str | None:
        """The user's organization role, None for a stranger."""
        with self.lock:
            user = self.cal_users.get(uuid)
            return user.role if user else None

    def memberships(self, email: str | None = None) -> list[JSON]:
        """Rendered organization memberships, optionally for one email."""
        with self.lock:
            return [
                render_membership(u, self.calendly_base, self.calendly_org_uuid)
                for u in self.cal_users.values()
                if email is None or u.email.lower() == email.lower()
            ]

    def close_me(self, user_id: str) -> JSON | None:
        """Close's /me/ for a user."""
        with self.lock:
            user = self.close_users.get(user_id)
            return render_close_user(user, self.close_org_name) if user else None

    def user_by_email(self, api: str, email: str) -> str | None:
        """The Calendly uuid or Close id of the user with this email."""
        with self.lock:
            users = self.cal_users.values() if api == "calendly" else self.close_users.values()
            for user in users:
                if user.email.lower() == email.lower():
                    return user.uuid if isinstance(user, CalendlyUser) else user.id
            return None

    def render_type(self, et: EventType) -> JSON:
        """Render an event type (call with the lock held)."""
        return render_event_type(et, self.calendly_base, self.cal_users.get(et.owner_uuid))

    # credentials --------------------------------------------------------------------------

    def has_scope(self, token: Token, scope: str) -> bool:
        """Whether a Calendly token carries `scope` (a token without scopes carries all) and
        the scope is not withheld by config `calendly_withheld_scopes`."""
        with self.lock:
            if scope in self.config.calendly_withheld_scopes.split():
                return False
            return not token.scope or scope in token.scope.split()

    def expire_token(self, token: str | None = None, all: bool = False) -> int:
        """Make an access token (or every one, with all=True) answer 401 expired."""
        if token is None and not all:
            raise ValueError("give a token or all=True")
        with self.lock:
            return self.tokens.expire(None if all else token, self.clock.now())

    def revoke_token(self, token: str) -> bool:
        """Revoke any credential (e.g. a refresh token, to force re-authorization)."""
        with self.lock:
            return self.tokens.revoke(token)

    # OAuth approval -------------------------------------------------------------------------

    def set_oauth_next(
        self,
        api: str,
        user_email: str | None = None,
        deny: bool = False,
        organization_id: str | None = None,
    ) -> None:
        """Decide the NEXT authorization on `api`: approve as `user_email`, or deny.

        `organization_id` (Close only): the organization the user picks on the consent screen,
        one of theirs; by default the user's first. Applies once, then authorizations go back
        to approving as the first seeded user.
        """
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}")
        if user_email is not None and self.user_by_email(api, user_email) is None:
            raise ValueError(f"no {api} user with email {user_email}")
        with self.lock:
            if organization_id is not None:
                if api != "close":
                    raise ValueError("only a Close authorization picks an organization")
                email = user_email or (self.seeded[0].email if self.seeded else "")
                user = self.close_users.get(self.user_by_email("close", email) or "")
                if user is None or organization_id not in self._organizations_of(user):
                    raise ValueError(f"the user is not a member of {organization_id}")
            self._oauth_next[api] = (user_email, deny, organization_id)

    def take_oauth_next(self, api: str) -> tuple[str | None, bool, str | None]:
        """The user (Calendly uuid / Close id) to authorize as, whether to deny, and (Close) the
        organization the token is for."""
        with self.lock:
            email, deny, organization = self._oauth_next.pop(api, (None, False, None))
            if email is None:
                email = self.seeded[0].email if self.seeded else None
            user = self.user_by_email(api, email) if email else None
            if api == "close" and user is not None and organization is None:
                organization = self.close_users[user].organization_id
            return user, deny, organization

    def join_close_organization(
        self, close_user_id: str, organization_id: str, name: str | None = None
    ) -> None:
        """Make a Close user a member of another organization too (listed first by /me/)."""
        with self.lock:
            user = self.close_users[close_user_id]
            user.other_organizations[organization_id] = name or organization_id

    @staticmethod
    def _organizations_of(user: CloseUser) -> list[str]:
        return [user.organization_id, *user.other_organizations]

    def update_config(self, api: str | None = None, **changes: Any) -> dict[str, Any]:
        """Change latency, error rate, limits or TTLs at run time; `api` narrows the first two.
        Every change is checked before any is applied: a bad one changes nothing."""
        known = {f.name for f in fields(SandboxConfig)}
        typed: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown config field: {key}")
            typed[key] = _typed(key, getattr(self.config, key), value)
        with self.lock:
            for key, value in typed.items():
                if key in ("latency_ms", "error_rate"):
                    target = getattr(self, key)
                    for name in [api] if api else APIS:
                        target[name] = float(value)
                if api is None or key not in ("latency_ms", "error_rate"):
                    setattr(self.config, key, value)
            return {
                **vars(self.config),
                "latency_ms": self.latency_ms,
                "error_rate": self.error_rate,
            }


def _typed(key: str, current: Any, value: Any) -> Any:
    """`value` converted to the type of config field `key` (now `current`); a boolean only from
    true/false (JSON or the strings), since bool("false") would be True."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"config field {key} must be true or false, not {value!r}")
    try:
        return type(current)(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"config field {key} must be a {type(current).__name__}, not {value!r}"
        ) from None
