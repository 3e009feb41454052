"""A whole closesync against the sandbox: Services on a real Redis, an engine with a fake sleep.

Shared by the engine tests and the property tests. The expected Close side is computed from what
the sandbox's Calendly holds, through the mapping (tested on its own in test_mapping).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis

from closesync.core.calendly_payloads import EventType
from closesync.core.mapping import MappingOptions, map_event_types
from closesync.core.report import RunMode, RunReport
from closesync.sandbox import (
    Sandbox,
)
from closesync.sandbox.connections import sandbox_connection, sandbox_settings
from closesync.sandbox.records import SeededUser
from closesync.settings import Settings
from closesync.store.secretbox import generate_key
from closesync.sync.engine import SyncEngine
from closesync.wiring.services import Services

LinkView = tuple[str, str, str | None, str, int | None]


def settings_for(sandbox: Sandbox, redis_url: str, prefix: str, **overrides: Any) -> Settings:
    """Settings pointing every API at `sandbox` and Redis at `redis_url` under `prefix`."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": prefix,
        "http_connect_timeout": 2.0,
        "http_read_timeout": 5.0,
        # Grants are sealed as in production: loopback URLs never mean "store in the clear".
        "closesync_encryption_keys": generate_key(),
        **sandbox_settings(sandbox),
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class Harness:
    sandbox: Sandbox
    services: Services
    sleeps: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, sandbox: Sandbox, redis_url: str, prefix: str, **overrides: Any) -> Harness:
        settings = settings_for(sandbox, redis_url, prefix, **overrides)
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        services = Services.build(settings, redis_client=client)
        # These runs sleep on a fake clock, which the shared budget (Redis's and the host's
        # clocks) would not see; the budget has tests of its own (store, apis, e2e).
        services.budgets = None
        return cls(sandbox, services)

    def sleep(self, seconds: float) -> None:
        """Fake sleep: moves the sandbox clock instead of waiting."""
        self.sleeps.append(seconds)
        self.sandbox.world.advance_clock(seconds)

    def engine(self, wait_budget: float = 60.0) -> SyncEngine:
        # The sandbox's clock: a test moves time for both sides with `sandbox.world.advance_clock`.
        now = self.sandbox.world.now
        return self.services.engine(
            wait_budget=wait_budget, sleep=self.sleep, clock=now, shared_clock=now
        )

    def add(self, user: SeededUser, **grant_overrides: Any) -> str:
        """Store a connection for a sandbox user pair (as `connections add` would)."""
        connection, grants = sandbox_connection(user, time.time())
        if grant_overrides:
            close = grants.close.model_copy(update=grant_overrides)
            grants = grants.model_copy(update={"close": close})
        self.services.connections.save(connection, grants)
        return connection.id

    def run(self, connection_id: str, **kwargs: Any) -> RunReport:
        return self.engine().run(connection_id, **kwargs)

    def backfill(self, connection_id: str) -> RunReport:
        return self.engine().run(connection_id, mode=RunMode.BACKFILL)

    # -- the two sides -----------------------------------------------------------------------

    def calendly_types(self, user: SeededUser) -> list[EventType]:
        """The user's event types as the sandbox's Calendly lists them (every page)."""
        listed = self.sandbox.world.list_event_types(user.calendly_user_uuid, None)
        return [EventType.model_validate(item) for item in listed]

    def expected(
        self, user: SeededUser, options: MappingOptions | None = None
    ) -> dict[str, LinkView]:
        result = map_event_types(
            user.calendly_user_uuid, self.calendly_types(user), options or MappingOptions()
        )
        return {
            sid: (p.name, p.url, p.description, p.source_type, p.duration_in_minutes)
            for sid, p in result.links.items()
        }

    def close_side(self, user: SeededUser) -> dict[str, LinkView]:
        """closesync's links of the user as Close holds them; duplicates fail loudly."""
        ours: dict[str, LinkView] = {}
        for link in self.sandbox.world.close_links(user.close_user_id):
            if link["source"] != "THIRD_PARTY":
                continue
            assert link["source_id"] not in ours, f"duplicate link {link['source_id']}"
            ours[link["source_id"]] = (
                link["name"],
                link["url"],
                link["description"],
                link["source_type"],
                link["duration_in_minutes"],
            )
        return ours

    def close_writes(self) -> int:
        counts = self.sandbox.world.request_counts()
        return sum(
            v for k, v in counts.items() if k.startswith("close ") and "scheduling_link" in k
        )

    def calendly_calls(self, path: str = "/event_types") -> int:
        counts = self.sandbox.world.request_counts()
        return counts.get(f"calendly GET {path}", 0)
