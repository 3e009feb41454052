"""The worker end to end: real `closesync worker` processes, real Redis, the sandbox."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from closesync.core.connection import ConnectionState
from closesync.sandbox import Sandbox
from closesync.worker.tasks import MAX_SOFT_LIMIT_RESUMES
from tests.e2e.conftest import Deployment, converged, expected_links, our_links, wait_for

pytestmark = pytest.mark.e2e


def enqueue_next_tick(deployment: Deployment) -> str:
    """`closesync sync --all --enqueue` until it enqueues a tick of its own (cron: every second)."""

    def attempt() -> str | None:
        done = deployment.cli("sync", "--all", "--enqueue", "--json")
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        return str(answer["slot"]) if answer["enqueued"] else None

    return wait_for("a tick of our own to enqueue", attempt, timeout=5, every=0.2)


def test_worker_tick_then_change_close_converges_each_tick(
    deploy: Callable[..., Deployment], sandbox: Sandbox
) -> None:
    """A tick syncs every connection; an edit in Calendly reaches Close with the next tick."""
    deployment = deploy()
    users = sandbox.users
    for user in users:
        deployment.add_connection(user)
    deployment.start("worker", "--concurrency", "2")

    first = enqueue_next_tick(deployment)
    again = deployment.cli("sync", "--all", "--enqueue", "--json")
    if json.loads(again.stdout)["slot"] == first:  # same second: the same tick, not enqueued
        assert json.loads(again.stdout)["enqueued"] is False
    wait_for("Close to equal Calendly", lambda: all(converged(sandbox, u) for u in users), 30)

    owner = users[0]
    with sandbox.world.lock:
        renamed = next(
            et for et in sandbox.world.event_types.values()
            if et.members == [owner.calendly_user_uuid] and et.active and et.deleted_at is None
        )  # fmt: skip
    sandbox.world.update_event_type(renamed.uuid, name="Renamed by the e2e test")
    sandbox.world.create_event_type(owner.calendly_user_uuid, name="Added by the e2e test")
    assert not converged(sandbox, owner)

    enqueue_next_tick(deployment)
    wait_for("the edit to reach Close", lambda: all(converged(sandbox, u) for u in users), 30)
    names = {link["name"] for link in our_links(sandbox, owner)}
    assert {"Renamed by the e2e test", "Added by the e2e test"} <= names


def test_worker_sigkill_mid_run_redelivered_run_completes(
    deploy: Callable[..., Deployment], sandbox: Sandbox
) -> None:
    """A worker killed with SIGKILL mid-run loses nothing: the redelivered task finishes it."""
    deployment = deploy(
        BROKER_VISIBILITY_TIMEOUT="8",
        TASK_SOFT_TIME_LIMIT="6",
        TASK_TIME_LIMIT="7",
        RUN_LOCK_TTL_SECONDS="5",
    )
    user = sandbox.users[0]
    conn_id = deployment.add_connection(user)
    # Slow answers: the run lasts a few seconds, so the kill lands in its middle.
    sandbox.world.update_config(latency_ms=400)
    first = deployment.start("worker", "--concurrency", "1")
    enqueue_next_tick(deployment)
    total = len(expected_links(sandbox, user))
    wait_for(
        "the run to write its first link", lambda: len(our_links(sandbox, user)) >= 1, 20, 0.02
    )
    written = len(our_links(sandbox, user))
    assert written < total, "the run finished before the kill; raise the latency"
    first.kill_group()
    first.popen.wait()

    sandbox.world.update_config(latency_ms=0)
    deployment.start("worker", "--concurrency", "1")
    wait_for("the redelivered run to finish", lambda: converged(sandbox, user), 40)
    # The report is pushed just after the last write reached Close.
    reports = wait_for("the run's report", lambda: deployment.services.state.reports(conn_id), 10)
    # One finished run: the killed one never finished, so this is the redelivered task.
    assert [r.outcome.value for r in reports] == ["ok"]
    assert len(our_links(sandbox, user)) == total


def test_worker_run_always_past_the_soft_limit_resumes_a_bounded_number_of_times(
    deploy: Callable[..., Deployment], sandbox: Sandbox
) -> None:
    """A step that always overruns the soft limit is resumed MAX times, then reported failed."""
    deployment = deploy(
        BROKER_VISIBILITY_TIMEOUT="10",
        TASK_SOFT_TIME_LIMIT="1",
        TASK_TIME_LIMIT="4",
        RUN_LOCK_TTL_SECONDS="5",
    )
    user = sandbox.users[0]
    conn_id = deployment.add_connection(user)
    # Every Calendly answer takes 2.5 s: the listing, the run's first step, always overruns 1 s.
    sandbox.world.update_config(api="calendly", latency_ms=2500)
    worker = deployment.start("worker", "--concurrency", "1")
    enqueued = deployment.cli("sync", conn_id, "--enqueue")
    assert enqueued.returncode == 0, enqueued.stderr
    attempts = MAX_SOFT_LIMIT_RESUMES + 1

    def settled() -> bool:
        runs = len(deployment.services.state.reports(conn_id))
        gave_up = "not resumed" in worker.output() and "succeeded in" in worker.output()
        return runs > attempts or gave_up

    wait_for("the soft-limited task to give up (or to loop)", settled, 60, 0.2)
    reports = deployment.services.state.reports(conn_id)
    assert len(reports) == attempts, [r.error for r in reports]
    assert all(r.outcome.value == "failed" for r in reports)
    # The threads pool does not enforce the soft limit: the engine's deadline at it stops the run.
    assert all(r.failure == "deadline" for r in reports)
    assert all("deadline (TASK_SOFT_TIME_LIMIT, 1 s)" in (r.error or "") for r in reports)
    assert our_links(sandbox, user) == []


def test_worker_revoked_refresh_token_needs_reauth_others_sync(
    deploy: Callable[..., Deployment], sandbox: Sandbox
) -> None:
    """A revoked refresh token ends its connection in needs_reauth; the others still sync."""
    deployment = deploy()
    revoked, *others = sandbox.users
    revoked_id = deployment.add_connection(revoked)
    for user in others:
        deployment.add_connection(user)
    sandbox.world.revoke_token(revoked.close_refresh_token)
    sandbox.world.expire_token(revoked.close_access_token)
    deployment.start("worker", "--concurrency", "2")
    enqueue_next_tick(deployment)

    def settled() -> bool:
        state = deployment.services.connections.get(revoked_id).state
        return state is ConnectionState.NEEDS_REAUTH and all(converged(sandbox, u) for u in others)

    wait_for("needs_reauth beside converged connections", settled, 30)
    assert our_links(sandbox, revoked) == []
    status = deployment.cli("status", "--json")
    assert status.returncode in (0, 1), status.stderr
    assert "needs_reauth" in status.stdout
