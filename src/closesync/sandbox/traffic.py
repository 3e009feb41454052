"""The World's traffic controls: queued faults, the random error rate, rate-limit buckets and
request counts.

A mixin of World (which supplies the lock, the clock and the fault random generator), kept
apart so that the state module stays about state. Every method takes the World's lock.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from typing import Any

from closesync.sandbox.config import SandboxConfig
from closesync.sandbox.faults import FaultBook, FaultRule, fault_response, random_error
from closesync.sandbox.ratelimit import FixedWindowLimiter, RateVerdict
from closesync.sandbox.routing import Response


class TrafficBook:
    """Faults, limits and counts; state lives on the World."""

    lock: threading.RLock
    config: SandboxConfig
    fault_rng: random.Random
    faults: FaultBook
    limiter: FixedWindowLimiter
    counts: Counter[str]
    rate_limited: Counter[str]
    error_rate: dict[str, float]

    def now(self) -> float:
        raise NotImplementedError

    def add_fault(self, rule: FaultRule | None = None, **fields_: Any) -> FaultRule:
        """Queue a fault rule (a FaultRule, or its fields as keywords)."""
        rule = rule or FaultRule.from_dict(fields_)
        with self.lock:
            self.faults.add(rule)
            return rule

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        with self.lock:
            self.faults.clear()

    def list_faults(self) -> list[dict[str, Any]]:
        """The queued rules with their remaining counts."""
        with self.lock:
            return [rule.to_dict() for rule in self.faults.rules]

    def draw_fault(
        self, api: str, method: str, path: str, page: int | None, random_ok: bool = True
    ) -> Response | None:
        """The fault answer for this request, if a queued rule or the error rate hits it.

        `random_ok` False exempts browser endpoints (authorize) from the random error rate.
        """
        with self.lock:
            rule = self.faults.take(api, method, path, page)
            if rule is not None:
                config = self.config
                limit = config.calendly_rate_limit if api == "calendly" else config.close_rate_limit
                return fault_response(api, rule, limit)
            rate = self.error_rate[api]
            if random_ok and rate > 0 and self.fault_rng.random() < rate:
                return random_error(api, self.fault_rng.choice((500, 502, 503)))
            return None

    def hit_rate(self, buckets: list[tuple[Any, int]], window: float) -> RateVerdict:
        """Spend one request from rate-limit buckets (see ratelimit.py)."""
        with self.lock:
            return self.limiter.hit(buckets, window, self.now())

    def count(self, key: str) -> None:
        """Count one API request under "api METHOD template"."""
        with self.lock:
            self.counts[key] += 1

    def request_counts(self) -> dict[str, int]:
        """Requests per "api METHOD template" since the last reset."""
        with self.lock:
            return dict(self.counts)

    def count_rate_limited(self, key: str) -> None:
        """Count one 429 the emulated limits answered (never an injected one) under its key."""
        with self.lock:
            self.rate_limited[key] += 1

    def rate_limited_counts(self) -> dict[str, int]:
        """The emulated limits' 429 answers per "api METHOD template" since the last reset."""
        with self.lock:
            return dict(self.rate_limited)

    def reset_request_counts(self) -> None:
        """Start counting from zero (requests and rate-limited answers)."""
        with self.lock:
            self.counts.clear()
            self.rate_limited.clear()
