"""`closesync worker` with several worker processes: all of them run tasks, and they live and
stop with the command that started them."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from closesync.sandbox import Sandbox
from closesync.worker.celery_app import create_app
from tests.e2e.conftest import Deployment, converged, wait_for
from tests.e2e.test_worker_e2e import enqueue_next_tick

pytestmark = pytest.mark.e2e


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_worker_two_processes_sync_and_stop_with_their_parent(
    deploy: Callable[..., Deployment], sandbox: Sandbox, stop: int
) -> None:
    """Two Celery workers answer, a tick converges, and signalling the command alone (not its
    process group) stops both: SIGTERM handed on, SIGKILL through the parent-death signal."""
    deployment = deploy()
    users = sandbox.users
    for user in users:
        deployment.add_connection(user)
    worker = deployment.start("worker", "--processes", "2", "--concurrency", "4")
    app = create_app(deployment.settings)
    try:
        replies = wait_for(
            "two worker processes to answer a ping",
            lambda: (found := app.control.ping(timeout=1.0)) and len(found) == 2 and found,
            timeout=60,
        )
    finally:
        app.close()
    names = {name for reply in replies for name in reply}
    children = _children(worker.popen.pid)
    assert len(names) == 2
    assert len(children) == 2
    assert {f"closesync-{pid}" for pid in children} == {name.split("@")[0] for name in names}

    enqueue_next_tick(deployment)
    wait_for("Close to equal Calendly", lambda: all(converged(sandbox, u) for u in users), 30)

    os.kill(worker.popen.pid, stop)
    worker.popen.wait(timeout=30)
    wait_for("both worker processes to stop", lambda: not any(map(_alive, children)), 30)
    if stop == signal.SIGTERM:
        assert worker.popen.returncode == 0
