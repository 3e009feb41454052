"""A rerun still owed when a run leaves is published as a fresh sync, not lost until the poll:
after the last rerun a task allows, and after an inline `closesync sync` (which never reruns).
Real Redis, the sandbox, a real Celery app publishing to Redis (the task runs eagerly)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import pytest

from closesync.cli.sync import _run_all
from closesync.core.report import RunMode, RunReport
from closesync.store.keys import Keys
from closesync.sync.engine import SyncEngine
from closesync.wiring.services import Services
from closesync.worker.celery_app import SYNC_CONNECTION, SYNC_QUEUE, create_app
from closesync.worker.tasks import MAX_RERUNS, sync_connection, use_services
from tests._broker import queued
from tests._sandbox import running_sandbox
from tests.sync_harness import Harness


class _AskedDuringEachRun:
    """The real engine, whose every run ends with a delivery's task having met its lock and
    handed over its ask (`request_rerun`, exactly what such a task does)."""

    def __init__(self, engine: SyncEngine, services: Services) -> None:
        self.engine, self.services, self.runs = engine, services, 0

    def run(self, connection_id: str, **options: Any) -> RunReport:
        report = self.engine.run(connection_id, **options)
        self.runs += 1
        self.services.state.request_rerun(connection_id)
        return report


@pytest.fixture
def harness(redis_url: str, keys: Keys) -> Iterator[Harness]:
    with running_sandbox() as sandbox:
        yield Harness.build(sandbox, redis_url, keys.prefix, task_inline_wait_seconds=0)


def _asking(harness: Harness) -> list[_AskedDuringEachRun]:
    """Make the harness's engines ask during each run; the engines made, for their counts."""
    services, real, made = harness.services, harness.services.engine, []

    def engine(**options: Any) -> _AskedDuringEachRun:
        made.append(_AskedDuringEachRun(real(**options), services))
        return made[-1]

    services.engine = engine  # type: ignore[method-assign]
    return made


def test_task_rerun_owed_after_the_last_allowed_rerun_is_published_afresh(
    harness: Harness, redis_url: str, keys: Keys
) -> None:
    """An ask handed over during the last rerun a task allows: the task publishes a fresh sync
    as it leaves (the marker names it), rather than leaving a `holder` marker nobody reruns."""
    conn = harness.add(harness.sandbox.users[0])
    app = create_app(harness.services.settings, broker_url=redis_url)
    made = _asking(harness)
    use_services(harness.services)
    try:
        assert sync_connection.apply(args=[conn, None], task_id="first").get() == "ok"
    finally:
        use_services(None)
        app.close()
    assert made[0].runs == 1 + MAX_RERUNS
    [fresh] = queued(harness.services.redis, keys.prefix, SYNC_QUEUE)
    assert (fresh.task, fresh.args) == (SYNC_CONNECTION, [conn, None])
    assert harness.services.redis.get(keys.queued(conn)) == f"queued:{fresh.task_id}"


def test_inline_sync_passes_on_an_ask_a_worker_handed_it(
    harness: Harness, redis_url: str, keys: Keys
) -> None:
    """A worker's task met the lock of an inline `closesync sync` and handed it its ask: the
    inline run does not rerun, so it publishes the sync as the command ends."""
    conn = harness.add(harness.sandbox.users[0])
    made = _asking(harness)
    args = argparse.Namespace(concurrency=1, json=True)
    assert _run_all(harness.services, [conn], RunMode.SYNC, args) == 0
    assert made[0].runs == 1
    [fresh] = queued(harness.services.redis, keys.prefix, SYNC_QUEUE)
    assert fresh.args == [conn, None]
    assert harness.services.redis.get(keys.queued(conn)) == f"queued:{fresh.task_id}"
