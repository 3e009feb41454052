"""`connections remove` against real worker processes: no run of the removed connection writes.

The remove runs as its own process while a worker runs the same connection (its Close write held
by a sandbox hang), and before a worker that was killed mid-run has its task redelivered. After
it, no link of the connection may come back in the sandbox's Close and no Redis key of it but
its removal mark (which expires) may exist.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from closesync.sandbox import Sandbox
from closesync.worker import celery_app as names
from closesync.worker.celery_app import create_app
from tests.e2e.conftest import Deployment, Proc, expected_links, our_links, wait_for
from tests.e2e.test_worker_e2e import enqueue_next_tick

pytestmark = pytest.mark.e2e

UPSERT = "close POST /api/v1/scheduling_link/integration/"
# Logged by the engine when a run finds the removal mark (before it writes anything more).
STOPPED = "the connection is being removed"


def keys_of(deployment: Deployment, conn_id: str) -> list[str]:
    """Every Redis key of the deployment that names the connection."""
    services = deployment.services
    return sorted(services.redis.scan_iter(f"{services.keys.prefix}:*{conn_id}*"))


def assert_removed_for_good(deployment: Deployment, sandbox: Sandbox, conn_id: str) -> None:
    """No link of the connection in Close, no key of it in Redis but the expiring mark."""
    user = sandbox.users[0]
    keys = deployment.services.keys
    assert our_links(sandbox, user) == []
    assert [key for key in keys_of(deployment, conn_id) if key.startswith(keys.conn(conn_id))] == []
    assert not deployment.services.redis.exists(keys.close_user(user.close_user_id))
    mark = keys.removed(conn_id)
    assert keys_of(deployment, conn_id) == [mark]
    assert deployment.services.redis.ttl(mark) > 0


def remove(deployment: Deployment, conn_id: str) -> dict[str, object]:
    """`closesync connections remove ID --delete-links --json`, as its own process."""
    done = deployment.cli("connections", "remove", conn_id, "--delete-links", "--json")
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def test_remove_during_worker_run_waits_for_it_then_nothing_comes_back(
    deploy: Callable[..., Deployment], sandbox: Sandbox
) -> None:
    """A remove while a worker writes the links waits for the run to stop, and wins for good."""
    # The second link's write hangs until the worker's read timeout: the run is mid-write when
    # the remove starts, and would go on writing the other links after it.
    deployment = deploy(HTTP_READ_TIMEOUT="8")
    user = sandbox.users[0]
    assert len(expected_links(sandbox, user)) >= 3
    conn_id = deployment.add_connection(user)
    sandbox.world.add_fault(
        api="close", kind="hang", method="POST", path_prefix="/api/v1/scheduling_link/", skip=1
    )
    worker = deployment.start("worker", "--concurrency", "1")
    enqueue_next_tick(deployment)
    wait_for(
        "the run to hang in its second write",
        lambda: sandbox.world.request_counts().get(UPSERT, 0) >= 2,
        30,
        0.02,
    )
    assert len(our_links(sandbox, user)) == 1

    answer = remove(deployment, conn_id)
    at_return = worker.output()

    wait_for(
        "the worker's run to end",
        lambda: STOPPED in worker.output() or "run finished" in worker.output(),
        30,
    )
    assert_removed_for_good(deployment, sandbox, conn_id)
    # The run stopped, and let go of the lock, before the remove deleted anything: the link it
    # was writing when it hung (written by its retry, or not) was deleted with the first.
    assert STOPPED in at_return
    assert answer["links_deleted"] in (1, 2)

    # A task of the connection queued after the remove (the CLI no longer knows the id, a
    # message already in the queue still does) does nothing either.
    create_app(deployment.settings).send_task(names.SYNC_CONNECTION, args=[conn_id, None])
    wait_for("the late task to run", lambda: worker.output().count(STOPPED) >= 2, 20)
    assert_removed_for_good(deployment, sandbox, conn_id)


def test_remove_after_worker_killed_redelivered_task_does_nothing(
    deploy: Callable[..., Deployment], sandbox: Sandbox
) -> None:
    """A remove after a worker died mid-run waits out its lock; the redelivery writes nothing."""
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
    wait_for("the run to write a link", lambda: len(our_links(sandbox, user)) >= 1, 20, 0.02)
    first.kill_group()
    first.popen.wait()
    written = len(our_links(sandbox, user))
    assert written < len(expected_links(sandbox, user)), "the run finished; raise the latency"
    sandbox.world.update_config(latency_ms=0)

    answer = remove(deployment, conn_id)
    # The write the killed worker had in flight still lands in the sandbox after its latency.
    assert answer["links_deleted"] in (written, written + 1)
    assert our_links(sandbox, user) == []

    second: Proc = deployment.start("worker", "--concurrency", "1")
    wait_for("the killed run's task to be redelivered", lambda: STOPPED in second.output(), 40)
    assert "ConnectionNotFound" not in second.output()
    assert_removed_for_good(deployment, sandbox, conn_id)
