"""Exposing closesync's Prometheus metrics: a port for the worker and the scheduler, a render
function for the web process, and the gauges read from Redis when Prometheus scrapes.

The counters and histograms are counted where things happen (`closesync.meters`); this module
adds what only Redis knows, read at scrape time so that nothing polls Redis between scrapes:

- `closesync_queue_depth{queue}`: messages ready in each Celery queue (one pipeline of LLENs);
- `closesync_rate_budget_remaining{organization,group}`: requests left in the current window of
  each Close organization's shared budget some process took from lately (the pairs are kept in
  Redis, so the prefork worker's main process sees what its pool spent);
- `closesync_connections{state}` and `closesync_sync_lag_seconds` (the fleet gauges): a read of
  every connection's record and newest reports, a few pipelines for 10,000 connections. Served by
  the scheduler and the web process, not by every worker: N workers would read the fleet N times
  for the same numbers.

The budgets and the fleet are read by a daemon thread per process every
METRICS_FLEET_REFRESH_SECONDS (`Background`), never by the scrape: a scrape serves the last read,
holds no lock across Redis calls, and a Redis that is down drops those gauges (once the last read
is stale) instead of holding the scrape past Prometheus's timeout.

A collector whose Redis read fails yields nothing for that scrape (and logs why) rather than
failing the whole scrape: the counters still arrive, and the missing gauges show the outage.

Under `--pool prefork` each pool process counts in its own memory-mapped files in
PROMETHEUS_MULTIPROC_DIR and the worker's main process serves their sum (prometheus_client's
multiprocess mode); the threads pool and every other process use the plain per-process registry.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, NoReturn, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from closesync import meters
from closesync.core.connection import ConnectionState
from closesync.core.errors import CloseSyncError, ConfigError
from closesync.settings import Settings
from closesync.store.broker_queues import queue_depths
from closesync.wiring.services import Services

log = logging.getLogger(__name__)

# The environment variable prometheus_client reads, at import, to count in files (prefork).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

Role = Literal["worker", "scheduler", "web"]


class QueueDepths(Collector):
    """`closesync_queue_depth{queue}`, read at each scrape."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        try:
            depths = queue_depths(self.services.redis, self.services.keys)
        except CloseSyncError as error:
            log.warning("metrics: the queue depths were not read: %s", error)
            return
        family = GaugeMetricFamily(
            "closesync_queue_depth",
            "Messages ready in a Celery queue (sync, backfill, fanout) that no worker has taken.",
            labels=["queue"],
        )
        for queue, depth in depths.items():
            family.add_metric([queue], depth)
        yield family


T = TypeVar("T")

# Seconds the first scrape of a process waits for the first background read: a Redis that is
# down must not hold the scrape past Prometheus's 10 s timeout (each later scrape waits for none).
FIRST_READ_WAIT_SECONDS = 2.0


class Background(Generic[T]):
    """A value read from Redis every `every` seconds by a daemon thread of its own, so that a
    scrape only ever reads the cached value: heavy reads stay off the scrape path, a slow or
    down Redis never fails a scrape. A value older than `stale_after` is not served (the
    missing gauge shows the outage)."""

    def __init__(self, name: str, read: Callable[[float], T], every: float) -> None:
        self.name = name
        self.read = read
        self.every = max(every, 1.0)
        self.stale_after = 3 * self.every + 10
        self._value: tuple[float, T] | None = None
        self._first = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    def _loop(self) -> None:
        while True:
            try:
                now = time.time()
                self._value = (now, self.read(now))
            except CloseSyncError as error:
                log.warning("metrics: the %s were not read: %s", self.name, error)
            except Exception:
                log.exception("metrics: reading the %s failed", self.name)
            finally:
                self._first.set()
            time.sleep(self.every)

    def latest(self) -> T | None:
        """The last value read, started on first use; None when none is fresh."""
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(
                    target=self._loop, name=f"metrics-{self.name}", daemon=True
                ).start()
        self._first.wait(FIRST_READ_WAIT_SECONDS)
        value = self._value
        if value is None or time.time() - value[0] > self.stale_after:
            return None
        return value[1]


class CloseBudgets(Collector):
    """`closesync_rate_budget_remaining{organization,group}` for every Close organization some
    process of the deployment took from lately (kept in Redis: under prefork the pool processes
    take, the main process serves). `background`: read by a thread, the scrape serves its last
    read; otherwise read at each collect (tests)."""

    def __init__(self, services: Services, background: bool = False) -> None:
        self.services = services
        self._background = (
            Background("rate budgets", self._read, services.settings.metrics_fleet_refresh_seconds)
            if background
            else None
        )

    def _read(self, now: float) -> dict[tuple[str, str], int]:
        budgets = self.services.budgets
        return {} if budgets is None else budgets.close_remaining_seen(now)

    def collect(self) -> Iterator[Metric]:
        if self.services.budgets is None:
            return
        if self._background is not None:
            remaining = self._background.latest()
            if remaining is None:
                return
        else:
            try:
                remaining = self._read(time.time())
            except CloseSyncError as error:
                log.warning("metrics: the rate budgets were not read: %s", error)
                return
        family = GaugeMetricFamily(
            "closesync_rate_budget_remaining",
            "Requests a Close organization has left of one endpoint group in the current "
            "one-second window of its shared budget (CLOSE_ORG_REQUESTS_PER_SECOND, all "
            "processes together); 0 while Close's announced reset blocks it. Organizations "
            "nothing took from for 10 minutes are left out.",
            labels=["organization", "group"],
        )
        for (organization, group), left in sorted(remaining.items()):
            family.add_metric([organization, group], left)
        yield family


@dataclass(frozen=True)
class FleetNumbers:
    """What the fleet gauges say, read at `at`."""

    at: float
    states: dict[str, int]
    # Seconds since the oldest last successful sync among active connections (0: none active).
    lag: float


def read_fleet(services: Services, now: float) -> FleetNumbers:
    """Connections by state and the sync lag, from every connection's record and newest reports.

    A connection whose Calendly organization's shared credential was refused counts as
    needs_reauth, as `closesync status` shows it. An active connection that never ran counts
    from when it was added.
    """
    connections = services.connections.list()
    refused = services.connections.shared_refused_of(
        c.calendly_grant_ref for c in connections if c.calendly_grant_ref is not None
    )
    states = {state.value: 0 for state in ConnectionState}
    active = []
    for connection in connections:
        state = connection.state
        if state is ConnectionState.ACTIVE and refused.get(connection.calendly_grant_ref or ""):
            state = ConnectionState.NEEDS_REAUTH
        states[state.value] += 1
        if state is ConnectionState.ACTIVE:
            active.append(connection)
    synced = services.state.last_synced(
        [c.id for c in active], depth=services.settings.reports_kept
    )
    oldest = min(
        (at if at is not None else c.created_at for c, at in zip(active, synced, strict=True)),
        default=None,
    )
    lag = 0.0 if oldest is None else max(0.0, now - oldest)
    return FleetNumbers(at=now, states=states, lag=lag)


class Fleet(Collector):
    """`closesync_connections{state}` and `closesync_sync_lag_seconds`, reused for `refresh`
    seconds between reads."""

    def __init__(
        self,
        services: Services,
        refresh: float,
        clock: Callable[[], float] = time.time,
        background: bool = False,
    ) -> None:
        self.services = services
        self.refresh = refresh
        self.clock = clock
        self._numbers: FleetNumbers | None = None
        self._lock = threading.Lock()
        # In a serving process the fleet is read by a thread every `refresh` seconds, never by
        # the scrape (10,000 connections' records and reports are no read to hold a scrape on).
        self._background = (
            Background("fleet gauges", lambda now: read_fleet(services, now), refresh)
            if background
            else None
        )

    def numbers(self) -> FleetNumbers | None:
        """The fleet's numbers, read again when older than `refresh`; None if Redis failed."""
        with self._lock:
            now = self.clock()
            if self._numbers is None or now - self._numbers.at >= self.refresh:
                try:
                    self._numbers = read_fleet(self.services, now)
                except CloseSyncError as error:
                    log.warning("metrics: the fleet gauges were not read: %s", error)
                    return None
            return self._numbers

    def collect(self) -> Iterator[Metric]:
        numbers = self.numbers() if self._background is None else self._background.latest()
        if numbers is None:
            return
        states = GaugeMetricFamily(
            "closesync_connections",
            "Stored connections by state: active (synced on schedule), paused, needs_reauth (a "
            "grant was refused: the user must connect again).",
            labels=["state"],
        )
        for state, count in numbers.states.items():
            states.add_metric([state], count)
        yield states
        yield GaugeMetricFamily(
            "closesync_sync_lag_seconds",
            "Seconds since the oldest last successful sync among active connections (one never "
            "synced counts from when it was added); 0 when none is active.",
            value=numbers.lag,
        )


# Seconds between two sync ticks of each polling cadence in use ("poll": SYNC_CRON; "webhooks":
# SYNC_CRON_WITH_WEBHOOKS, for connections whose webhooks are active), read from the cron
# expressions by whoever can parse them (the CLI hands `closesync.worker.schedule`'s in: this
# layer may not import the worker's).
SyncIntervals = Callable[[], dict[str, float]]
_sync_intervals: SyncIntervals | None = None


def use_sync_intervals(intervals: SyncIntervals) -> None:
    """Have this process's fleet gauges export `closesync_sync_interval_seconds{cadence}` from
    `intervals`: what the lag alert compares closesync_sync_lag_seconds with."""
    global _sync_intervals  # noqa: PLW0603 - set once per process by the CLI, before serving
    _sync_intervals = intervals


class SyncIntervalGauge(Collector):
    """`closesync_sync_interval_seconds{cadence}`: the expected interval of each cadence."""

    def __init__(self, intervals: SyncIntervals) -> None:
        self.intervals = intervals

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "closesync_sync_interval_seconds",
            "Seconds between two scheduled syncs of a connection, by cadence in use: poll "
            "(SYNC_CRON) and, with WEBHOOKS_ENABLED, webhooks (SYNC_CRON_WITH_WEBHOOKS, the "
            "safety-net poll of connections whose webhooks are active). The lag alert fires at "
            "twice the largest.",
            labels=["cadence"],
        )
        for cadence, seconds in sorted(self.intervals().items()):
            family.add_metric([cadence], seconds)
        yield family


def collectors(services: Services, role: Role) -> list[Collector]:
    """The Redis-reading collectors a process of `role` serves beside its counters."""
    found: list[Collector] = [QueueDepths(services)]
    if role == "worker":
        found.append(CloseBudgets(services, background=True))
    else:
        refresh = services.settings.metrics_fleet_refresh_seconds
        found.append(Fleet(services, refresh, background=True))
        if _sync_intervals is not None:
            found.append(SyncIntervalGauge(_sync_intervals))
    return found


class _ProcessCounters(Collector):
    """This process's own counters and histograms (prometheus_client's default registry)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


class Exposition:
    """What one process serves: its counters (or, under prefork, every pool process's, summed
    from the multiprocess directory) and the collectors of its role, in a registry of its own,
    so that nothing is added to prometheus_client's global one."""

    def __init__(self, extra: Iterable[Collector], multiproc_dir: str | None = None) -> None:
        self.registry = CollectorRegistry()
        if multiproc_dir is None:
            self.registry.register(_ProcessCounters())
        else:
            # prometheus_client leaves it untyped.
            MultiProcessCollector(self.registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
        for collector in extra:
            self.registry.register(collector)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format, and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def serve(services: Services, role: Role, port: int | None = None) -> Exposition | None:
    """Serve the metrics of this process on METRICS_PORT (or `port`) in a daemon thread; None
    when neither is set. Under prefork (PROMETHEUS_MULTIPROC_DIR set) it serves the pool's sum."""
    settings = services.settings
    port = port if port is not None else settings.metrics_port
    if port is None:
        return None
    meters.precreate()
    exposition = Exposition(collectors(services, role), os.environ.get(MULTIPROC_ENV))
    try:
        start_http_server(port, addr=settings.metrics_bind_address, registry=exposition.registry)
    except OSError as error:
        raise ConfigError(
            f"METRICS_PORT {port} could not be opened on {settings.metrics_bind_address}: "
            f"{error.strerror or error} (another process of this host has it?)"
        ) from None
    log.info("serving Prometheus metrics on %s:%d", settings.metrics_bind_address, port)
    return exposition


_web: tuple[Services, Exposition] | None = None
_web_lock = threading.Lock()


def render(services: Services) -> tuple[bytes, str]:
    """The web process's metrics (body, Content-Type), for its `GET /metrics` route.

    Framework-free: the web app answers 200 with these bytes and this Content-Type. The
    collectors are built once per process, on the first call.
    """
    global _web  # noqa: PLW0603 - one exposition per web process, like prometheus_client's REGISTRY
    with _web_lock:
        if _web is None or _web[0] is not services:
            meters.precreate()
            _web = (
                services,
                Exposition(collectors(services, "web"), os.environ.get(MULTIPROC_ENV)),
            )
        exposition = _web[1]
    return exposition.render()


# --- prefork: the multiprocess directory ------------------------------------------------------


def multiproc_dir_of(settings: Settings) -> str:
    """METRICS_MULTIPROC_DIR, else {DATA_DIR}/prometheus-multiproc, as an absolute path: the
    base under which each process that counts in files has a directory of its own."""
    chosen = settings.metrics_multiproc_dir or str(Path(settings.data_dir) / "prometheus-multiproc")
    return str(Path(chosen).resolve())


_PROCESS_DIR = re.compile(r"^(?:worker|web)-(?P<pid>\d+)@(?P<host>.+)$")


def process_multiproc_dir(settings: Settings, role: Literal["worker", "web"]) -> str:
    """This process's own multiprocess directory: `{base}/{role}-{pid}@{host}` (a worker's is
    named after its Celery node, `closesync-{pid}@{host}`). Two prefork workers, or a worker and
    a web process, on one DATA_DIR must never share one: each cleans its directory at start and
    would delete the other's live files. Directories of processes of this host that no longer
    run are removed on the way, so restarts leave none behind."""
    base = Path(multiproc_dir_of(settings))
    host = socket.gethostname()
    if base.is_dir():
        for sibling in base.iterdir():
            found = _PROCESS_DIR.match(sibling.name)
            if found and found["host"] == host and not _running(int(found["pid"])):
                shutil.rmtree(sibling, ignore_errors=True)
    return str(base / f"{role}-{os.getpid()}@{host}")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def clean_multiproc_dir(path: str) -> None:
    """Create `path`, and delete the sample files earlier processes left there (this process's
    own, made since it started, are kept): a restarted worker must not add a dead pool's
    counts to its own."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    own = f"_{os.getpid()}.db"
    for stale in directory.glob("*.db"):
        if not stale.name.endswith(own):
            stale.unlink(missing_ok=True)


def pool_process_exited(pid: int) -> None:
    """A prefork pool process `pid` stopped: drop its live-gauge files (its counters stay)."""
    if os.environ.get(MULTIPROC_ENV):
        mark_process_dead(pid)  # type: ignore[no-untyped-call]  # untyped in prometheus_client


# Set to the pid by a command that re-executes itself with PROMETHEUS_MULTIPROC_DIR: after the
# exec (same pid) the directory is known to be this command's own, not one inherited from the
# environment of every process of the host (another command's, whose files cleaning would delete).
REEXEC_MARK_ENV = "CLOSESYNC_METRICS_REEXEC"


def count_in_own_multiproc_dir(settings: Settings, role: Literal["worker", "web"]) -> None:
    """Make this command count in a multiprocess directory of its own, cleaned first.

    prometheus_client picks file-backed values when it is imported, which happened before any
    command runs: unless this very process set PROMETHEUS_MULTIPROC_DIR before re-executing
    itself, set it to `process_multiproc_dir(settings, role)` and exec this same command again
    (the pid stays, so does a worker's node name). An inherited value is never trusted: set for
    every process of a host, it would be another command's directory, whose live files
    cleaning would delete.
    """
    own = _reexecuted_dir()
    if own:
        clean_multiproc_dir(own)
        return
    directory = process_multiproc_dir(settings, role)
    clean_multiproc_dir(directory)
    _reexec_into(directory)


def _reexecuted_dir() -> str | None:
    """PROMETHEUS_MULTIPROC_DIR when this very process set it before re-executing itself."""
    if os.environ.get(REEXEC_MARK_ENV) == str(os.getpid()):
        return os.environ.get(MULTIPROC_ENV)
    return None


def _reexec_into(directory: str) -> NoReturn:
    """Run this command again (same pid) with `directory` as its multiprocess directory."""
    os.environ[MULTIPROC_ENV] = directory
    os.environ[REEXEC_MARK_ENV] = str(os.getpid())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, reexec_argv())  # noqa: S606


def reexec_argv() -> list[str]:
    """The argv that starts this very command again, interpreter flags (`-X`, `-W`, `-O`)
    included: Python's own record of how it was started (sys.orig_argv), run by the same
    interpreter."""
    return [sys.executable, *sys.orig_argv[1:]]
