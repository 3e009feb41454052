"""`closesync health --worker` end to end: a real worker on a Redis of its own, reset under it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from closesync.sandbox import Sandbox
from closesync.worker.celery_app import SYNC_QUEUE, create_app
from closesync.worker.liveness import HEARTBEAT_DIR
from tests.e2e.conftest import Deployment, Proc, wait_for
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e

# Short, so that a stuck worker shows within a few seconds (the default is 600).
STALL_SECONDS = "2"


@pytest.fixture
def broker() -> Iterator[RedisServer]:
    """A redis-server for this test alone: it is reset under the worker."""
    with RedisServer() as server:
        yield server


def health(deployment: Deployment) -> subprocess.CompletedProcess[str]:
    return deployment.cli("health", "--worker")


def node_of(deployment: Deployment, worker: Proc) -> str:
    """The worker's Celery node name, once its heartbeat (written when it is ready) exists."""
    directory = Path(deployment.settings.data_dir) / HEARTBEAT_DIR

    def ready() -> str | None:
        mine = [p.name for p in directory.glob(f"closesync-{worker.popen.pid}@*")]
        return mine[0] if mine else None

    return wait_for("the worker to be ready", ready, 30)


def test_health_worker_after_a_broker_reset_then_a_lost_consumer_fails_until_restarted(
    deploy: Callable[..., Deployment], sandbox: Sandbox, broker: RedisServer
) -> None:
    """A Redis reset under a worker: the check passes once the worker reconnected and ran the
    work queued after the reset (Celery 5.7 reconnects by itself). A worker that stays alive
    and answers pings but consumes nothing (the lost consumer) fails the check for as long as
    work waits, until its supervisor restarts it."""
    deployment = deploy(REDIS_URL=broker.url, WORKER_STALL_SECONDS=STALL_SECONDS)
    user = sandbox.users[0]
    deployment.add_connection(user)
    # One Celery worker process (no supervisor): its node is named after the pid started.
    worker = deployment.start("worker", "--concurrency", "2", "--processes", "1")
    node = node_of(deployment, worker)
    assert health(deployment).returncode == 0

    # The broker reset: every key is gone, the worker's connections are cut.
    broker.restart()
    conn_id = deployment.add_connection(user)  # the reset took the connection with it
    assert deployment.cli("sync", conn_id, "--enqueue").returncode == 0
    wait_for(
        "the worker to run the work queued after the reset",
        lambda: deployment.services.state.reports(conn_id),
        30,
    )
    ok = wait_for("the check to pass again", lambda: health(deployment).returncode == 0, 30, 0.5)
    assert ok

    # The lost consumer: alive, answering pings, taking nothing from the sync queue.
    app = create_app(deployment.settings, broker.url)
    try:
        app.control.cancel_consumer(SYNC_QUEUE, destination=[node], reply=True, timeout=5)
    finally:
        app.close()
    assert deployment.cli("sync", conn_id, "--enqueue").returncode == 0

    def stuck() -> subprocess.CompletedProcess[str] | None:
        done = health(deployment)
        return done if done.returncode == 1 else None

    failed = wait_for("the check to see the stuck worker", stuck, 30, 0.5)
    assert f"worker {node} made no progress for" in failed.stderr
    assert "1 tasks wait in its queues" in failed.stderr
    # It keeps failing while the work waits: what makes a supervisor restart the worker.
    assert health(deployment).returncode == 1
    assert len(deployment.services.state.reports(conn_id)) == 1

    # The supervisor's restart: the new worker takes the waiting sync and the check passes.
    worker.stop()
    deployment.start("worker", "--concurrency", "2")
    wait_for(
        "the new worker to run the waiting sync",
        lambda: len(deployment.services.state.reports(conn_id)) == 2,
        30,
    )
    assert wait_for("the check to pass", lambda: health(deployment).returncode == 0, 30, 0.5)
