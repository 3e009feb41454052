"""A run on the shared rate budget its Services wire: stopped by a spent budget, resumed whole."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from closesync.core.report import Outcome
from closesync.sandbox import Sandbox, SandboxConfig
from closesync.store.rate_budget import RateBudgets
from tests.sync_harness import Harness

UPSERT = "POST /scheduling_link/integration/"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    sb = Sandbox.start(SandboxConfig(seed=5, users=2, event_types=3, freeze_clock=True))
    try:
        yield sb
    finally:
        sb.stop()


@pytest.fixture
def harness(sandbox: Sandbox, redis_url: str) -> Harness:
    """The harness with the shared budgets Services.build wires (the harness turns them off)."""
    built = Harness.build(sandbox, redis_url, f"budget-{uuid.uuid4().hex[:8]}")
    services = built.services
    services.budgets = RateBudgets.from_settings(services.redis, services.keys, services.settings)
    return built


def test_engine_run_organization_budget_blocked_stops_then_next_run_writes_each_once(
    harness: Harness,
) -> None:
    """Another process's 429 blocks the org: the run stops rate_limited, unwritten; then resumes."""
    alice, bob = harness.sandbox.users
    first = harness.add(alice)
    services = harness.services
    assert services.budgets is not None
    # Bob's run, elsewhere, met a 429 on the upserts: Alice's organization waits 30 s.
    services.budgets.close(bob.close_organization_id, bob.close_user_id).block(UPSERT, 30)
    stopped = harness.engine(wait_budget=1).run(first)
    assert (stopped.outcome, stopped.failure) == (Outcome.FAILED, "rate_limited")
    assert stopped.retry_after is not None
    assert 25 < stopped.retry_after <= 30
    assert harness.close_writes() == 0
    assert harness.sleeps == []

    blocked = services.keys.rate_blocked(f"close-org:{alice.close_organization_id}", UPSERT)
    services.redis.delete(blocked)  # the reset has passed
    done = harness.run(first)
    assert done.outcome is Outcome.OK
    assert harness.close_side(alice) == harness.expected(alice)
    assert harness.close_writes() == done.created == len(harness.expected(alice))
