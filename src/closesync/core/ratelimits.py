"""Rate-limit headers of both APIs, read into one shape; how long a 429 asks us to wait. Pure.

Close: `RateLimit: limit=100, remaining=50, reset=0.25` (reset in seconds, may be fractional) and
`Retry-After` on a 429. Calendly: `X-RateLimit-Limit`, `X-RateLimit-Remaining`,
`X-RateLimit-Reset` (seconds until reset). The rule: never come back sooner than asked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

# A 429 without any usable header: wait this long (seconds) rather than hammering.
FALLBACK_RATE_LIMIT_WAIT = 5.0

_RATELIMIT_PART = re.compile(r"\s*([a-zA-Z-]+)\s*=\s*([0-9.]+)\s*")


@dataclass(frozen=True)
class RateLimitInfo:
    """A parsed rate-limit header: requests allowed, left, and seconds until the window resets."""

    limit: int | None
    remaining: int | None
    reset_seconds: float | None


def parse_close_ratelimit(value: str | None) -> RateLimitInfo | None:
    """Parse Close's `RateLimit: limit=100, remaining=50, reset=0.25` (reset may be fractional)."""
    if not value:
        return None
    parts: dict[str, float] = {}
    for chunk in re.split(r"[,;]", value):
        match = _RATELIMIT_PART.fullmatch(chunk)
        if not match:
            continue
        try:
            parts[match.group(1).lower()] = float(match.group(2))
        except ValueError:
            continue
    if not parts:
        return None
    limit = parts.get("limit")
    remaining = parts.get("remaining")
    return RateLimitInfo(
        limit=int(limit) if limit is not None else None,
        remaining=int(remaining) if remaining is not None else None,
        reset_seconds=parts.get("reset"),
    )


def parse_calendly_ratelimit(headers: Mapping[str, str]) -> RateLimitInfo | None:
    """Parse Calendly's `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`."""

    def number(name: str) -> float | None:
        raw = headers.get(name)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            return None
        return value if math.isfinite(value) and value >= 0 else None

    limit, remaining, reset = (
        number("X-RateLimit-Limit"),
        number("X-RateLimit-Remaining"),
        number("X-RateLimit-Reset"),
    )
    if limit is None and remaining is None and reset is None:
        return None
    return RateLimitInfo(
        limit=int(limit) if limit is not None else None,
        remaining=int(remaining) if remaining is not None else None,
        reset_seconds=reset,
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header given in seconds; None for dates or garbage."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def rate_limit_of(api: str, headers: Mapping[str, str]) -> RateLimitInfo | None:
    """The rate-limit state a response announces, in the dialect of its API."""
    if api == "Close":
        return parse_close_ratelimit(headers.get("RateLimit"))
    return parse_calendly_ratelimit(headers)


def wait_from_429(api: str, headers: Mapping[str, str]) -> float:
    """How long a 429 asks us to wait: the rate-limit reset, else Retry-After, else a fallback."""
    info = rate_limit_of(api, headers)
    candidates = [
        info.reset_seconds if info is not None else None,
        parse_retry_after(headers.get("Retry-After")),
    ]
    waits = [c for c in candidates if c is not None]
    # Both headers present: honour the longer one, so we never come back sooner than asked.
    return max(waits) if waits else FALLBACK_RATE_LIMIT_WAIT
