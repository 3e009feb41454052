"""One worker command, one Celery worker process per core: the split and the supervisor.

A run of the threads pool spends its waiting in threads but its CPU (parsing, Redis replies,
Celery's bookkeeping) under one interpreter lock, so a single process uses one core however
many threads it has: on a 2-core host the second core idled while the first was the limit
(benchmarks/fleet.py). `closesync worker` therefore starts WORKER_PROCESSES Celery workers (by
default one per core it may run on) and shares WORKER_CONCURRENCY, the runs at once of the whole
command, between them; with one process it runs Celery itself, as before.

The parent only supervises: it hands SIGTERM and SIGINT on to the children (each stops warm, as
Celery does), and when one child ends on its own it stops the others and exits with that
child's code, so that whatever restarts the command (compose, systemd, Kubernetes) restarts all.
Children die with their parent (PR_SET_PDEATHSIG, which each child asks for as it starts): a parent
killed outright leaves no worker running unsupervised, and their unacknowledged tasks return to the
queue as any killed worker's do.

What is decided here is pure (`split`); the process handling is the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Split:
    """How many worker processes to start, and the runs each makes at once."""

    processes: int
    concurrency: int


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container limits it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def split(concurrency: int, processes: int, cores: int) -> Split:
    """Share `concurrency` runs at once between `processes` (0: one per core of `cores`).

    Never more processes than runs (`--concurrency 1` is one process, one run at a time); each
    process takes an equal share, rounded up.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    wanted = processes if processes > 0 else max(1, cores)
    count = max(1, min(wanted, concurrency))
    return Split(processes=count, concurrency=math.ceil(concurrency / count))


def die_with_parent(parent: int) -> None:
    """In a worker process `supervise` started, as it starts: be killed when the parent dies
    (Linux), or exit if it already did (it died before this line)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent still stops its children on SIGTERM
    if os.getppid() != parent:
        os._exit(1)


def supervise(argv: Sequence[str], count: int, env: dict[str, str]) -> int:
    """Run `count` copies of the command `argv` (a `closesync worker` of one process each) until
    they stop: signalled, or one ended on its own. The exit code of the first that ended (0 when
    every child stopped cleanly after a signal)."""
    parent = os.getpid()
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop_all(signum: int) -> None:
        for child in children.values():
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        # Always a warm stop: on a terminal the children got Ctrl-C's SIGINT themselves, and a
        # second SIGINT would make Celery stop cold, killing the runs in flight.
        stop_all(signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    ended: queue.Queue[subprocess.Popen[bytes]] = queue.Queue()
    try:
        for _ in range(count):
            if stopping:
                break  # signalled while starting: start no more
            child = subprocess.Popen([*argv, f"--parent-pid={parent}"], env=env)
            children[child.pid] = child
        if stopping:
            stop_all(signal.SIGTERM)  # those started after the signal never got it
        count = len(children)
        for child in children.values():
            # A waiter per child (not os.wait, which would reap `closesync run`'s scheduler and
            # embedded Redis too); the main thread blocks on the queue, signals still reach it.
            threading.Thread(target=_wait_then_put, args=(child, ended), daemon=True).start()
        log.info("started %d worker processes", count, extra={"pids": sorted(children)})
        code: int | None = None
        for _ in range(count):
            child = ended.get()
            if not stopping:
                # A worker stopped by itself (a crash, an OOM kill): stop the others, so that the
                # command's own supervisor restarts the whole worker.
                log.warning(
                    "worker process %d exited with %d: stopping the others",
                    child.pid,
                    child.returncode,
                )
                stopping = True
                stop_all(signal.SIGTERM)
            if code is None or (code == 0 and child.returncode != 0):
                code = child.returncode
        return _exit_code(code)
    finally:
        stop_all(signal.SIGKILL)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_then_put(
    child: subprocess.Popen[bytes], ended: queue.Queue[subprocess.Popen[bytes]]
) -> None:
    child.wait()
    ended.put(child)


def _exit_code(code: int | None) -> int:
    """A child's exit code as the command's: a child killed by a signal counts as failed."""
    if code is None:
        return 0
    return code if code >= 0 else 128 - code


def worker_argv(pool: str, concurrency: int, queues: str) -> list[str]:
    """The command line of one worker process of a split."""
    return [
        sys.executable,
        "-m",
        "closesync",
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--queues={queues}",
        "--processes=1",
    ]
