"""Bounded queueing with real `closesync worker` processes: asks coalesce, fan-outs jump the queue.

Asks during a run are made in this process (`ask_for_syncs`, what `closesync sync ID --enqueue`
runs), so that three of them land within it; runs and queues are read from the deployment's
Redis.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from closesync.sandbox import Sandbox
from closesync.worker import celery_app as names
from closesync.worker.celery_app import create_app
from closesync.worker.enqueue import ask_for_syncs, enqueue_tick
from closesync.worker.publish import Message, publish
from tests._broker import queue_key, queued
from tests.e2e.conftest import Deployment, expected_links, wait_for

pytestmark = pytest.mark.e2e

# Logged by a task whose connection does not exist, and by a fan-out.
NOTHING_TO_RUN = "the connection no longer exists: nothing to run"
FANNED_OUT = "scheduled 0 connections"


def test_worker_three_asks_while_queued_or_running_make_one_extra_run(
    deploy: Callable[..., Deployment], sandbox: Sandbox
) -> None:
    """Three asks before the worker starts queue one task; three more during its run make
    exactly one more run (the second worker slot hands it to the running one), then nothing."""
    deployment = deploy()
    services = deployment.services
    user = sandbox.users[0]
    conn_id = deployment.add_connection(user)
    app = create_app(deployment.settings)
    prefix = deployment.settings.redis_prefix
    try:
        asks = [deployment.cli("sync", conn_id, "--enqueue", "--json") for _ in range(3)]
        assert [json.loads(ask.stdout) for ask in asks] == [
            {"task": "sync", "enqueued": [conn_id], "already_queued": []},
            {"task": "sync", "enqueued": [], "already_queued": [conn_id]},
            {"task": "sync", "enqueued": [], "already_queued": [conn_id]},
        ]
        assert len(queued(services.redis, prefix, "sync")) == 1

        # Every answer takes a second: the first run (a listing and four creates) lasts seconds.
        sandbox.world.update_config(latency_ms=1000)
        deployment.start("worker", "--concurrency", "2")
        lock = services.keys.run_lock(conn_id)
        wait_for("the run to start", lambda: services.redis.exists(lock), 30, 0.02)
        assert [ask_for_syncs(services, app, [conn_id]) for _ in range(3)] == [[conn_id], [], []]
        assert services.redis.exists(lock), "the run ended before the asks; raise the latency"
    finally:
        app.close()

    def settled() -> bool:
        redis = services.redis
        return not (
            redis.exists(lock)
            or redis.exists(services.keys.queued(conn_id))
            or redis.llen(queue_key(prefix, "sync"))
            or redis.hlen(f"{prefix}:celery:unacked")
        )

    wait_for("every run to end, nothing queued or owed", settled, 60, 0.1)
    reports = services.state.reports(conn_id)
    assert [r.outcome.value for r in reports] == ["ok", "ok"]
    assert (reports[0].created, reports[1].created) == (0, len(expected_links(sandbox, user)))


def test_worker_sync_all_published_behind_a_thousand_runs_runs_before_them(
    deploy: Callable[..., Deployment],
) -> None:
    """A tick enqueued while 1,000 per-connection runs wait on `sync` is fanned out first: it
    has a queue of its own, which every worker takes."""
    deployment = deploy()
    app = create_app(deployment.settings)
    try:
        backlog = [
            Message(names.SYNC_CONNECTION, [f"conn_{n:012x}", None], f"backlog-{n}")
            for n in range(1000)
        ]
        publish(app, backlog)
        _, enqueued = enqueue_tick(deployment.services, app, "sync")
        assert enqueued
    finally:
        app.close()

    worker = deployment.start("worker", "--concurrency", "1")
    wait_for("the tick to be fanned out", lambda: FANNED_OUT in worker.output(), 60, 0.1)
    lines = worker.output().splitlines()
    before = lines[: next(i for i, line in enumerate(lines) if FANNED_OUT in line)]
    # Kombu's round robin over the worker's queues takes `fanout` by the second message at most.
    assert sum(NOTHING_TO_RUN in line for line in before) <= 2
