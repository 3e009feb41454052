"""A worker's proof of progress: a heartbeat file per worker, touched whenever a task completes.

Why: a Celery worker on Redis can lose its consumer after a broker reset and keep running
(celery/celery#10205): its process is alive, it may even answer a ping, and it takes no task.
Only throughput tells: `closesync health --worker` fails when tasks wait in the queues and the
local worker has completed none for WORKER_STALL_SECONDS (`stalled`).

Why a file and not Redis: the heartbeat must outlive the very fault it detects. A Redis that was
reset (its data gone) would take a heartbeat kept in it along, and the check could no longer
tell a stuck worker from a new one. The health check runs on the worker's host (the container's
health check), so a file in DATA_DIR is what both see: `{DATA_DIR}/worker-heartbeats/{node}`,
`node` being the worker's Celery node name (`closesync-<pid>@<host>`), holding the Unix time of
its last completed task (or of its start, before the first). The file is written whole and
renamed into place, so a reader never sees half a number.

The same Celery signals count the tasks for Prometheus (`closesync_tasks_completed_total`) and,
under `--pool prefork`, tell prometheus_client that a pool process exited.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.signals import task_postrun, worker_process_shutdown, worker_ready, worker_shutdown

from closesync import meters
from closesync.settings import Settings
from closesync.wiring.metrics import pool_process_exited

log = logging.getLogger(__name__)

HEARTBEAT_DIR = "worker-heartbeats"


def heartbeat_dir(settings: Settings) -> Path:
    """Where this host's workers keep their heartbeats: {DATA_DIR}/worker-heartbeats."""
    return Path(settings.data_dir).resolve() / HEARTBEAT_DIR


def _file(directory: Path, node: str) -> Path:
    if not node or "/" in node or node.startswith("."):
        raise ValueError(f"not a worker node name: {node!r}")
    return directory / node


def beat(directory: Path, node: str, now: float) -> None:
    """Record that worker `node` made progress (completed a task, or started) at `now`."""
    directory.mkdir(parents=True, exist_ok=True)
    target = _file(directory, node)
    partial = target.with_name(f".{node}.{os.getpid()}.tmp")
    partial.write_text(f"{now:.3f}\n")
    partial.replace(target)


def last_beat(directory: Path, node: str) -> float | None:
    """When worker `node` last made progress; None: no heartbeat (or an unreadable one)."""
    try:
        return float(_file(directory, node).read_text().strip())
    except (OSError, ValueError):
        return None


def forget(directory: Path, node: str) -> None:
    """Worker `node` stopped cleanly: its heartbeat goes with it."""
    _file(directory, node).unlink(missing_ok=True)


@dataclass(frozen=True)
class Stall:
    """A worker that has let queued work wait: what the health check reports."""

    node: str
    waiting: int
    # Seconds since its last progress; None: it has no heartbeat at all.
    idle: float | None


def stalled(
    directory: Path, nodes: list[str], waiting: int, now: float, limit: float
) -> list[Stall]:
    """The workers of `nodes` that completed no task for more than `limit` seconds while
    `waiting` messages wait in the queues (none when nothing waits: an idle worker is fine)."""
    if waiting <= 0:
        return []
    found = []
    for node in nodes:
        at = last_beat(directory, node)
        if at is None:
            found.append(Stall(node, waiting, None))
        elif now - at > limit:
            found.append(Stall(node, waiting, now - at))
    return found


# --- the Celery signals -----------------------------------------------------------------------


def connect(settings: Settings, clock: Callable[[], float] = time.time) -> None:
    """Connect the heartbeat, the task counter and the prefork metrics cleanup to this worker
    process's Celery signals (before the pool forks, so its processes inherit them)."""
    directory = heartbeat_dir(settings)

    def safely(node: str | None, action: Callable[[Path, str], None]) -> None:
        if not node:
            return
        try:
            action(directory, node)
        except (OSError, ValueError) as error:
            # A full disk must not fail the task; the health check then sees the worker as stuck.
            log.warning("the worker heartbeat could not be written: %s", error)

    def on_ready(sender: Any = None, **_: Any) -> None:
        safely(getattr(sender, "hostname", None), lambda d, n: beat(d, n, clock()))

    def on_task_done(
        sender: Any = None, task: Any = None, state: str | None = None, **_: Any
    ) -> None:
        task = task or sender
        meters.count_task(str(getattr(task, "name", "unknown")), state or "UNKNOWN")
        node = getattr(getattr(task, "request", None), "hostname", None)
        safely(node, lambda d, n: beat(d, n, clock()))

    def on_shutdown(sender: Any = None, **_: Any) -> None:
        safely(getattr(sender, "hostname", None), forget)

    def on_pool_process_exit(**_: Any) -> None:
        pool_process_exited(os.getpid())

    worker_ready.connect(on_ready, weak=False)
    task_postrun.connect(on_task_done, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
    worker_process_shutdown.connect(on_pool_process_exit, weak=False)
