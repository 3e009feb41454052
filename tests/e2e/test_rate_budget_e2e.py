"""Three worker processes share one Close organization's rate budget through Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from closesync.sandbox import Sandbox, SandboxConfig
from tests.e2e.conftest import Deployment, converged, expected_links, wait_for

pytestmark = pytest.mark.e2e

# The sandbox's Close limit: per token and endpoint group per second, and 3x that for the one
# organization every sandbox user belongs to (30 upserts a second for all 50 users together).
TOKEN_LIMIT = 10
INJECTED_429S = 2


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """50 users of one Close organization, four event types each, on wall-clock time."""
    config = SandboxConfig(seed=11, users=50, event_types=4, close_rate_limit=TOKEN_LIMIT)
    sb = Sandbox.start(config)
    try:
        yield sb
    finally:
        sb.stop()


def test_rate_budget_three_workers_one_organization_stay_within_its_limit(
    deploy: Callable[..., Deployment], sandbox: Sandbox
) -> None:
    """50 connections synced by three workers converge with no 429 but the injected ones."""
    # Two thirds of the sandbox's limits: the margin is for requests taken in one second and
    # arriving in the next (a busy machine), which a moving window cannot see.
    deployment = deploy(
        CLOSE_ORG_REQUESTS_PER_SECOND=str(3 * TOKEN_LIMIT * 2 // 3),
        CLOSE_USER_REQUESTS_PER_SECOND=str(TOKEN_LIMIT // 2),
    )
    users = sandbox.users
    ids = [deployment.add_connection(user) for user in users]
    # A 429 that a run meets holds back every worker of the organization for its reset.
    sandbox.world.add_fault(
        api="close",
        kind="429",
        method="POST",
        path_prefix="/api/v1/scheduling_link/integration/",
        count=INJECTED_429S,
        skip=20,
        reset=1,
    )
    workers = [deployment.start("worker", "--concurrency", "2") for _ in range(3)]
    asked = deployment.cli("sync", *ids, "--enqueue")
    assert asked.returncode == 0, asked.stderr

    def all_converged() -> bool:
        return all(converged(sandbox, user) for user in users)

    try:
        # About 15 s here (226 links at 20 a second); the deadline is for a crowded machine.
        wait_for("50 connections to converge", all_converged, timeout=80, every=0.5)
    except BaseException:
        for worker in workers:
            print(worker.output()[-4000:])
        raise
    assert sandbox.world.rate_limited_counts() == {}
    assert sandbox.world.list_faults() == []
    upserts = sandbox.world.request_counts()["close POST /api/v1/scheduling_link/integration/"]
    # Every link written once; the only calls made twice are the ones the faults refused.
    assert upserts == sum(len(expected_links(sandbox, u)) for u in users) + INJECTED_429S
