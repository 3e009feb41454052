"""Two real `closesync scheduler` processes at once enqueue each tick exactly once."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from tests._broker import queued
from tests.e2e.conftest import Deployment, wait_for

pytestmark = pytest.mark.e2e


def enqueued_slots(deployment: Deployment) -> list[str]:
    """The slot of every sync_all message waiting in the `fanout` queue, oldest first."""
    messages = queued(deployment.services.redis, deployment.settings.redis_prefix, "fanout")
    assert {message.task for message in messages} <= {"closesync.sync_all"}
    return [message.args[0] for message in messages]


def test_scheduler_two_processes_each_tick_enqueued_once(
    deploy: Callable[..., Deployment],
) -> None:
    """Two schedulers on a one-second cron: every tick once, and ticks go on when one stops."""
    deployment = deploy()  # SYNC_CRON: every second; no worker, so messages stay queued
    first = deployment.start("scheduler")
    second = deployment.start("scheduler")

    wait_for("three ticks", lambda: len(enqueued_slots(deployment)) >= 3, 15)
    first.kill_group(signal.SIGTERM)  # a clean stop hands the leadership over at once
    first.popen.wait(timeout=10)
    before = len(enqueued_slots(deployment))
    wait_for("three more ticks", lambda: len(enqueued_slots(deployment)) >= before + 3, 15)
    second.stop()

    slots = enqueued_slots(deployment)
    assert len(slots) == len(set(slots)), f"a tick was enqueued twice: {slots}"
    assert slots == sorted(slots)
    claims = deployment.services.redis.keys(
        f"{deployment.settings.redis_prefix}:tick:enqueue-sync:*"
    )
    assert len(claims) == len(slots)
    logs = first.output() + second.output()
    assert "leading: this scheduler enqueues the ticks" in logs
