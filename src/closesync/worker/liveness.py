"""A worker's proof of progress: a heartbeat file per worker, touched whenever a task starts or
completes.

Why: a Celery worker on Redis can lose its consumer after a broker reset and keep running
(celery/celery#10205): its process is alive, it may even answer a ping, and it takes no task.
Only throughput tells: `closesync health --worker` fails when tasks wait in the queues this
worker consumes and it has made no progress for WORKER_STALL_SECONDS (`stalled`).

The stall is measured from the later of the worker's last progress and the moment the health
check first saw work waiting for it (a marker file the check keeps while work waits): a worker
idle for an hour is not stuck the instant work is enqueued, only once that work has waited the
limit. Progress is beaten when a task starts (task_prerun) as well as when it ends, so a long
run does not count as idle time.

Why a file and not Redis: the heartbeat must outlive the very fault it detects. A Redis that was
reset (its data gone) would take a heartbeat kept in it along, and the check could no longer
tell a stuck worker from a new one. The health check runs on the worker's host (the container's
health check), so a local directory is what both see: HEARTBEAT_DIR (default
`{DATA_DIR}/worker-heartbeats`), a file `{node}` per worker, `node` being its Celery node name
(`closesync-<pid>@<host>`), holding JSON: the Unix time of its last progress (or of its start)
and the queues it consumes. Files are written whole and renamed into place, so a reader never
sees half of one. The directory must be writable: the worker refuses to start otherwise
(`check_writable`), rather than run while the check restarts it for want of a heartbeat.

The same Celery signals count the tasks for Prometheus (`closesync_tasks_completed_total`) and,
under `--pool prefork`, tell prometheus_client that a pool process exited.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.signals import (
    task_postrun,
    task_prerun,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from celery.utils.dispatch import Signal
from pydantic import BaseModel, ConfigDict, ValidationError

from closesync import meters
from closesync.core.errors import ConfigError
from closesync.settings import Settings
from closesync.wiring.metrics import pool_process_exited

log = logging.getLogger(__name__)

HEARTBEAT_DIR = "worker-heartbeats"
# The health check's marker of when it first saw work waiting for worker `node`: dot-named, so
# that no glob of node names matches it.
_WAITING_PREFIX = ".waiting-"


class Heartbeat(BaseModel):
    """What a heartbeat file holds."""

    model_config = ConfigDict(frozen=True)

    at: float
    # The Celery queues the worker consumes (empty: unknown, read as all of them).
    queues: tuple[str, ...] = ()


def heartbeat_dir(settings: Settings) -> Path:
    """Where this host's workers keep their heartbeats: HEARTBEAT_DIR, else
    {DATA_DIR}/worker-heartbeats."""
    if settings.heartbeat_dir:
        return Path(settings.heartbeat_dir).resolve()
    return Path(settings.data_dir).resolve() / HEARTBEAT_DIR


def _file(directory: Path, node: str) -> Path:
    if not node or "/" in node or node.startswith("."):
        raise ValueError(f"not a worker node name: {node!r}")
    return directory / node


def _write(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    partial.write_text(text)
    partial.replace(target)


def check_writable(directory: Path) -> None:
    """ConfigError naming `directory` unless a heartbeat can be written there (a read-only root
    filesystem, a missing volume): the worker must not start without its proof of progress."""
    probe = directory / f".probe-{os.getpid()}"
    try:
        _write(probe, "probe\n")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"the worker heartbeat directory {directory} is not writable "
            f"({error.strerror or error}): set HEARTBEAT_DIR to a writable local directory"
        ) from None


def beat(directory: Path, node: str, now: float, queues: tuple[str, ...] | None = None) -> None:
    """Record that worker `node` made progress (started or completed a task, or started) at
    `now`; `queues`: the queues it consumes (None: keep those written before)."""
    target = _file(directory, node)
    if queues is None:
        previous = _read(directory, node)
        queues = previous.queues if previous is not None else ()
    _write(target, Heartbeat(at=now, queues=queues).model_dump_json() + "\n")


def _read(directory: Path, node: str) -> Heartbeat | None:
    try:
        text = _file(directory, node).read_text().strip()
    except OSError:
        return None
    try:
        return Heartbeat.model_validate_json(text)
    except ValidationError:
        try:
            return Heartbeat(at=float(text))  # a heartbeat of an older closesync: time only
        except ValueError:
            return None


def last_beat(directory: Path, node: str) -> float | None:
    """When worker `node` last made progress; None: no heartbeat (or an unreadable one)."""
    found = _read(directory, node)
    return None if found is None else found.at


def queues_of(directory: Path, node: str) -> tuple[str, ...]:
    """The queues worker `node` consumes, from its heartbeat (empty: unknown)."""
    found = _read(directory, node)
    return () if found is None else found.queues


def forget(directory: Path, node: str) -> None:
    """Worker `node` stopped cleanly: its heartbeat goes with it."""
    _file(directory, node).unlink(missing_ok=True)
    (directory / f"{_WAITING_PREFIX}{node}").unlink(missing_ok=True)


def waiting_since(directory: Path, node: str, waiting: int, now: float) -> float | None:
    """When work started waiting for `node`, as the health check saw it: the marker is written
    at the first check that sees `waiting` > 0 and removed at the first that sees none."""
    marker = directory / f"{_WAITING_PREFIX}{_file(directory, node).name}"
    if waiting <= 0:
        marker.unlink(missing_ok=True)
        return None
    try:
        return float(marker.read_text().strip())
    except (OSError, ValueError):
        _write(marker, f"{now:.3f}\n")
        return now


@dataclass(frozen=True)
class Stall:
    """A worker that has let queued work wait: what the health check reports."""

    node: str
    waiting: int
    # Seconds since its last progress; None: it has no heartbeat at all.
    idle: float | None


def stalled(
    directory: Path, nodes: list[str], waiting_for: Callable[[str], int], now: float, limit: float
) -> list[Stall]:
    """The workers of `nodes` that made no progress for more than `limit` seconds while
    messages waited in their queues (`waiting_for(node)`: how many), counted from the later of
    their last progress and when that work started waiting. None when nothing waits for them:
    an idle worker is fine."""
    found = []
    for node in nodes:
        waiting = waiting_for(node)
        since = waiting_since(directory, node, waiting, now)
        if since is None:
            continue
        at = last_beat(directory, node)
        if at is None:
            found.append(Stall(node, waiting, None))
        elif now - max(at, since) > limit:
            found.append(Stall(node, waiting, now - max(at, since)))
    return found


# --- the Celery signals -----------------------------------------------------------------------


def connect(
    settings: Settings, queues: tuple[str, ...] = (), clock: Callable[[], float] = time.time
) -> Callable[[], None]:
    """Connect the heartbeat, the task counter and the prefork metrics cleanup to this worker
    process's Celery signals (before the pool forks, so its processes inherit them). `queues`:
    those the worker consumes, written into its heartbeat. ConfigError if the heartbeat
    directory cannot be written. Returns what disconnects them again."""
    directory = heartbeat_dir(settings)
    check_writable(directory)

    def safely(node: str | None, action: Callable[[Path, str], None]) -> None:
        if not node:
            return
        try:
            action(directory, node)
        except (OSError, ValueError) as error:
            # A full disk must not fail the task; the health check then sees the worker as stuck.
            log.warning("the worker heartbeat could not be written: %s", error)

    def on_ready(sender: Any = None, **_: Any) -> None:
        safely(getattr(sender, "hostname", None), lambda d, n: beat(d, n, clock(), queues))

    def node_of(sender: Any, task: Any) -> str | None:
        task = task or sender
        return getattr(getattr(task, "request", None), "hostname", None)

    def on_task_start(sender: Any = None, task: Any = None, **_: Any) -> None:
        safely(node_of(sender, task), lambda d, n: beat(d, n, clock()))

    def on_task_done(
        sender: Any = None, task: Any = None, state: str | None = None, **_: Any
    ) -> None:
        meters.count_task(str(getattr(task or sender, "name", "unknown")), state or "UNKNOWN")
        safely(node_of(sender, task), lambda d, n: beat(d, n, clock()))

    def on_shutdown(sender: Any = None, **_: Any) -> None:
        safely(getattr(sender, "hostname", None), forget)

    def on_pool_process_exit(**_: Any) -> None:
        pool_process_exited(os.getpid())

    receivers: list[tuple[Signal, Callable[..., None]]] = [
        (worker_ready, on_ready),
        (task_prerun, on_task_start),
        (task_postrun, on_task_done),
        (worker_shutdown, on_shutdown),
        (worker_process_shutdown, on_pool_process_exit),
    ]
    for signal, receiver in receivers:
        signal.connect(receiver, weak=False)

    def disconnect() -> None:
        for signal, receiver in receivers:
            signal.disconnect(receiver)

    return disconnect
