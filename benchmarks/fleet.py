"""The fleet benchmark: a real closesync worker syncing N connections, beside two naive peers.

For each N it starts the sandbox in a process of its own (latency injected on every API
request, N user pairs with 6 event types each), seeds N connections straight into a real Redis
(REDIS_URL if it is on loopback, else an embedded one of the benchmark's own), starts a real
`closesync worker` at its default settings and measures two phases, each "enqueue a sync_all
tick -> every connection has reported": the first run (every link created) and a steady-state
tick (nothing changed in Calendly). The naive peers (benchmarks/naive.py, sequential and on 16
threads) then do the same two passes, each against a fresh sandbox, so every peer starts from
an empty Close. Numbers, not assertions: one table, and the machine beside it.

One setting differs from the defaults: SYNC_SPREAD_FRACTION=0. By default sync_all spreads a
tick over half the cron interval (150 s for */5), on purpose; measured with it, a tick would
take 150 s whatever the worker can do. With 0 the tick is fanned out at once, and its length
is what the worker takes to get through the fleet.

The sequential naive peer is timed on its first --naive-sample connections and scaled to N (it
makes the same calls for every connection, one after another, so its time is linear in N); at
100 ms a call, all of 1,000 would take some 13 minutes per pass.

    python -m benchmarks.fleet                       # N = 1,000
    python -m benchmarks.fleet --n 100,1000,10000 --latency-ms 100 --timeout 900
    python -m benchmarks.fleet --n 10000 --peers closesync --close-rate 400   # first run faster

Every wait has a bound: a phase that does not finish within --timeout seconds is reported as
"timed out after X s (k/N reported)" and the steady phase after it is skipped. Traffic goes
only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from celery import Celery

from benchmarks.fleet_table import Phase, Row, describe_phase, table
from benchmarks.procfs import (
    cpu_seconds,
    descendants,
    machine_line,
    proc_threads,
    tree_cpu_seconds,
    tree_hwm_mb,
)
from closesync.sandbox import (
    CALENDLY_CLIENT_ID,
    CALENDLY_CLIENT_SECRET,
    CLOSE_CLIENT_ID,
    CLOSE_CLIENT_SECRET,
    SeededUser,
)
from closesync.sandbox.connections import sandbox_connection
from closesync.settings import Settings
from closesync.store.embedded import embedded
from closesync.wiring.services import Services
from closesync.worker import celery_app as names
from closesync.worker.celery_app import create_app
from closesync.worker.schedule import slot_of

CLOSESYNC = str(Path(sys.executable).with_name("closesync"))
# The helper processes run `python -m benchmarks.…`, which needs the repository as their cwd.
REPO = Path(__file__).resolve().parent.parent
TYPES_PER_USER = 6
NAIVE_THREADS = 16
# Seconds between two looks at the reports in Redis. Phase times do not depend on it: a phase
# ends at the latest report's finished_at, not when the poll noticed it.
POLL_SECONDS = 0.5
# Reports read per Redis round trip while polling.
POLL_BATCH = 2000
# Seconds to wait for the sandbox to seed and for the worker to answer a ping.
SANDBOX_START_SECONDS = 1800.0
WORKER_START_SECONDS = 60.0
# Seconds a stopping worker gets to finish its current tasks before it is killed.
WORKER_STOP_SECONDS = 20.0
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def log(message: str) -> None:
    """Progress on stderr; the table alone goes to stdout."""
    print(f"[fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the sandbox, in its own process -----------------------------------------------------------


@dataclass
class SandboxProcess:
    """`benchmarks.sandbox_host` running in a child process; admin calls over loopback."""

    popen: subprocess.Popen[str]
    info: dict[str, Any]
    data_file: Path
    http: requests.Session = field(default_factory=requests.Session)

    @classmethod
    @contextlib.contextmanager
    def running(
        cls, users: int, latency_ms: float, workdir: Path, close_rate: int | None = None
    ) -> Iterator[SandboxProcess]:
        data_file = workdir / f"sandbox-{users}-{uuid.uuid4().hex[:6]}.json"
        errors = (workdir / "sandbox.log").open("a")
        popen = subprocess.Popen(
            [
                *(sys.executable, "-m", "benchmarks.sandbox_host", "--users", str(users)),
                *("--event-types", str(TYPES_PER_USER), "--latency-ms", str(latency_ms)),
                *("--out", str(data_file)),
                *(("--close-rate-limit", str(close_rate)) if close_rate else ()),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            cwd=REPO,
        )
        try:
            _wait_ready(popen, SANDBOX_START_SECONDS)
            sandbox = cls(popen, json.loads(data_file.read_text()), data_file)
            sandbox.http.trust_env = False
            for url in (sandbox.info["calendly_api_url"], sandbox.info["close_api_url"]):
                if urlsplit(url).hostname not in _LOOPBACK:
                    raise SystemExit(f"the sandbox is not on loopback: {url}")
            yield sandbox
        finally:
            if popen.stdin:
                popen.stdin.close()
            popen.terminate()
            try:
                popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
            errors.close()

    @property
    def users(self) -> list[SeededUser]:
        return [SeededUser(**user) for user in self.info["users"]]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.popen.pid)

    def threads(self) -> int:
        """Its threads now: one per open client connection, plus the two accept loops."""
        return proc_threads(self.popen.pid)

    def _admin(self, method: str, path: str) -> Any:
        url = f"{self.info['calendly_api_url']}/_sandbox/{path}"
        response = self.http.request(method, url, timeout=30)
        response.raise_for_status()
        return response.json()

    def reset_counts(self) -> None:
        self._admin("POST", "requests/reset")

    def calls(self) -> tuple[int, int]:
        """API requests (Calendly, Close) since the last reset; admin calls are not counted."""
        counts: dict[str, int] = self._admin("GET", "requests")
        calendly = sum(v for k, v in counts.items() if k.startswith("calendly "))
        close = sum(v for k, v in counts.items() if k.startswith("close "))
        return calendly, close

    def env(self) -> dict[str, str]:
        return {
            "CALENDLY_API_URL": self.info["calendly_api_url"],
            "CALENDLY_AUTH_URL": self.info["calendly_auth_url"],
            "CLOSE_API_URL": self.info["close_api_url"],
            "CLOSE_OAUTH_URL": self.info["close_oauth_url"],
            "CLOSE_CLIENT_ID": CLOSE_CLIENT_ID,
            "CLOSE_CLIENT_SECRET": CLOSE_CLIENT_SECRET,
            "CALENDLY_CLIENT_ID": CALENDLY_CLIENT_ID,
            "CALENDLY_CLIENT_SECRET": CALENDLY_CLIENT_SECRET,
        }


def _wait_ready(popen: subprocess.Popen[str], timeout: float) -> None:
    """Wait for the child's `ready` line; fail if it exits or the deadline passes."""
    assert popen.stdout is not None  # noqa: S101 - stdout=PIPE above
    with selectors.DefaultSelector() as selector:
        selector.register(popen.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise SystemExit(f"the sandbox did not seed within {timeout:.0f} s")
    line = popen.stdout.readline().strip()
    if line != "ready":
        raise SystemExit(f"the sandbox did not start (exit {popen.poll()}): see sandbox.log")


# --- results -----------------------------------------------------------------------------------


# --- closesync ---------------------------------------------------------------------------------


def seed_connections(services: Services, users: list[SeededUser]) -> list[str]:
    """Store a connection per user pair, as `closesync connections add` would (no OAuth)."""
    now = time.time()
    ids = []
    for user in users:
        connection, grants = sandbox_connection(user, now)
        services.connections.save(connection, grants)
        ids.append(connection.id)
    return ids


@dataclass
class Worker:
    """A `closesync worker` process in its own session, its log in a file."""

    popen: subprocess.Popen[bytes]

    @classmethod
    def start(cls, env: dict[str, str], workdir: Path) -> Worker:
        with (workdir / "worker.log").open("ab") as out:
            popen = subprocess.Popen(
                [CLOSESYNC, "worker"],
                env=env,
                cwd=workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(popen)

    def wait_ready(self, app: Celery, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise SystemExit(f"closesync worker exited with {self.popen.returncode}")
            if app.control.ping(timeout=1.0):
                return
        raise SystemExit(f"closesync worker did not answer a ping within {timeout:.0f} s")

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


def _next_slot(previous: str | None) -> str:
    """A tick slot of its own: sync_all claims each slot once, so two phases need two."""
    for _ in range(30):
        slot = slot_of(datetime.now(UTC))
        if slot != previous:
            return slot
        time.sleep(0.1)
    raise RuntimeError("the clock did not move for 3 s")


def run_tick(
    services: Services,
    app: Celery,
    sandbox: SandboxProcess,
    worker: Worker,
    ids: list[str],
    slot: str,
    timeout: float,
    rss: list[float],
) -> Phase:
    """Enqueue one sync_all tick and wait until every connection reported a good run."""
    sandbox.reset_counts()
    sandbox_cpu0, worker_cpu0 = sandbox.cpu_seconds(), tree_cpu_seconds(worker.popen.pid)
    started_wall, started = time.time(), time.monotonic()
    app.send_task(names.SYNC_ALL, args=[slot])
    pending, last_finished, threads = list(ids), started_wall, 0
    while pending and time.monotonic() - started < timeout:
        time.sleep(POLL_SECONDS)
        if worker.popen.poll() is not None:
            raise SystemExit(f"closesync worker exited with {worker.popen.returncode}")
        rss.append(tree_hwm_mb(worker.popen.pid))
        threads = max(threads, sandbox.threads())
        still: list[str] = []
        for i in range(0, len(pending), POLL_BATCH):
            batch = pending[i : i + POLL_BATCH]
            with services.redis.pipeline(transaction=False) as pipe:
                for conn_id in batch:
                    pipe.lindex(services.keys.reports(conn_id), 0)
                raws = pipe.execute()
            for conn_id, raw in zip(batch, raws, strict=True):
                report = json.loads(raw) if raw else None
                # A failed run is retried by Celery: only a finished good run counts.
                if (
                    report is not None
                    and report["started_at"] >= started_wall
                    and report["outcome"] in ("ok", "partial")
                ):
                    last_finished = max(last_finished, float(report["finished_at"]))
                else:
                    still.append(conn_id)
        pending = still
    wall = time.monotonic() - started
    calendly, close = sandbox.calls()
    timed_out = bool(pending)
    return Phase(
        seconds=wall if timed_out else last_finished - started_wall,
        reported=len(ids) - len(pending),
        total=len(ids),
        calendly=calendly,
        close=close,
        sandbox_cpu_pct=100 * (sandbox.cpu_seconds() - sandbox_cpu0) / wall,
        peer_cpu_pct=100 * (tree_cpu_seconds(worker.popen.pid) - worker_cpu0) / wall,
        timed_out=timed_out,
        sandbox_threads=threads,
    )


def measure_closesync(n: int, args: argparse.Namespace, redis_url: str, workdir: Path) -> Row:
    # Here, not at the top: benchmarks.run_cpu imports this module under older versions too.
    from closesync.cli.worker_processes import split, usable_cores

    row = Row("closesync worker", n)
    with SandboxProcess.running(n, args.latency_ms, workdir, args.close_rate) as sandbox:
        prefix = f"fleet-{n}-{uuid.uuid4().hex[:6]}"
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(workdir),
            "REDIS_URL": redis_url,
            "REDIS_PREFIX": prefix,
            "DATA_DIR": str(workdir / "var"),
            # Loopback sandbox tokens: stored unencrypted, by explicit choice.
            "CLOSESYNC_ALLOW_PLAINTEXT_TOKENS": "true",
            "LOG_FORMAT": "json",
            # Fan the tick out at once: see the module docstring.
            "SYNC_SPREAD_FRACTION": "0",
            "NO_PROXY": "127.0.0.1,localhost",
            **sandbox.env(),
        }
        if args.close_rate:
            # The first run is bound by the Close budget alone: a larger one (the sandbox's limit
            # raised alike) makes a first run of 10,000 connections minutes, not half an hour.
            # A steady tick makes no Close call, so its figure does not depend on it.
            env["CLOSE_ORG_REQUESTS_PER_SECOND"] = str(args.close_rate)
        if args.concurrency:
            # Sizing experiments: the default is what the table is for.
            env["WORKER_CONCURRENCY"] = str(args.concurrency)
        values: dict[str, Any] = {k.lower(): v for k, v in env.items() if k not in ("PATH", "HOME")}
        settings = Settings(_env_file=None, **values)
        services = Services.build(settings)
        app = create_app(settings)
        log(f"N={n}: seeding {n} connections into Redis")
        ids = seed_connections(services, sandbox.users)
        worker = Worker.start(env, workdir)
        rss: list[float] = []
        try:
            worker.wait_ready(app, WORKER_START_SECONDS)
            children = len(descendants(worker.popen.pid))
            # The threads pool runs in its worker processes: the command's own when it has one,
            # else one child per core, each with its share of WORKER_CONCURRENCY.
            shares = split(settings.worker_concurrency, settings.worker_processes, usable_cores())
            pool = (
                f"threads, {shares.processes} procs x {shares.concurrency}"
                if children
                else f"threads, {settings.worker_concurrency}"
            )
            row.config = f"closesync worker (default: {pool})"
            slot: str | None = None
            for phase in ("first", "steady"):
                slot = _next_slot(slot)
                log(f"N={n}: closesync {phase} tick")
                result = run_tick(services, app, sandbox, worker, ids, slot, args.timeout, rss)
                row.phases[phase] = result
                log(f"N={n}: closesync {phase}: {describe_phase(result)}")
                if result.timed_out:
                    row.notes.append(f"closesync {phase} run, N={n}: {describe_phase(result)}")
                    break
            rss.append(tree_hwm_mb(worker.popen.pid))
        finally:
            worker.stop()
            app.close()
            services.redis.close()
        row.peak_rss_mb = max(rss, default=0.0)
    return row


# --- the naive peers ---------------------------------------------------------------------------


def run_naive(
    command: list[str], sandbox: SandboxProcess, timeout: float
) -> tuple[dict[str, Any], int]:
    """Run one naive pass (it bounds itself; `timeout` is the backstop); its result, and the
    most threads the sandbox had meanwhile."""
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=REPO) as proc,
    ):
        deadline, threads = time.monotonic() + timeout, 0
        while proc.poll() is None:
            if time.monotonic() >= deadline:
                proc.kill()
                raise SystemExit(f"the naive peer did not stop within {timeout:.0f} s")
            threads = max(threads, sandbox.threads())
            time.sleep(POLL_SECONDS)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"the naive peer failed ({proc.returncode}): {err.read()[-2000:]}")
        out.seek(0)
        return json.loads(out.read()), threads


def measure_naive(
    n: int, threads: int, sample: int | None, args: argparse.Namespace, workdir: Path
) -> Row:
    label = "naive sequential" if threads == 1 else f"naive {threads} threads"
    row = Row(label, n)
    with SandboxProcess.running(n, args.latency_ms, workdir) as sandbox:
        for phase in ("first", "steady"):
            log(f"N={n}: {label} {phase} pass" + (f" on {sample} connections" if sample else ""))
            sandbox.reset_counts()
            cpu0 = sandbox.cpu_seconds()
            command = [sys.executable, "-m", "benchmarks.naive", "--input", str(sandbox.data_file)]
            command += ["--threads", str(threads), "--timeout", str(args.timeout)]
            if sample:
                command += ["--limit", str(sample)]
            result, sandbox_threads = run_naive(command, sandbox, args.timeout + 60)
            calendly, close = sandbox.calls()
            seconds = float(result["seconds"])
            # Scaled only when it finished: a timed-out pass says how long it was given.
            scale = n / sample if sample and not result["timed_out"] else 1.0
            outcome = Phase(
                seconds=seconds * scale,
                reported=int(result["done"]),
                total=sample or n,
                calendly=calendly,
                close=close,
                sandbox_cpu_pct=100 * (sandbox.cpu_seconds() - cpu0) / seconds,
                peer_cpu_pct=100 * float(result["cpu_seconds"]) / seconds,
                timed_out=bool(result["timed_out"]),
                sample=sample,
                sandbox_threads=sandbox_threads,
            )
            row.phases[phase] = outcome
            row.peak_rss_mb = max(row.peak_rss_mb, float(result["peak_rss_mb"]))
            log(f"N={n}: {label} {phase}: {describe_phase(outcome)}")
            if result["errors"]:
                row.notes.append(f"{label} {phase} pass, N={n}: {result['errors']} failed")
            if outcome.timed_out:
                row.notes.append(f"{label} {phase} pass, N={n}: {describe_phase(outcome)}")
                break
    return row


# --- the table ---------------------------------------------------------------------------------


# --- main --------------------------------------------------------------------------------------


def redis_for_benchmark(workdir: Path) -> str:
    """REDIS_URL when it is on loopback, else an embedded Redis in the run's own directory."""
    url = os.environ.get("REDIS_URL")
    if not url:
        return embedded(str(workdir / "redis"))
    if urlsplit(url).hostname not in _LOOPBACK:
        raise SystemExit("REDIS_URL must be on 127.0.0.1: the benchmark sends nothing elsewhere")
    return url


def stop_embedded(directory: Path) -> None:
    """Stop the embedded Redis of this run before its directory is removed.

    embedded() would stop it at exit, but only after this process removed the directory under
    it; its pid is in `embedded.json` (see closesync.store.embedded).
    """
    registry = directory / "embedded.json"
    if not registry.exists():
        return
    pid = int(json.loads(registry.read_text())["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        time.sleep(0.05)


def parse_sizes(text: str) -> list[int]:
    sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("--n takes positive sizes, e.g. 100,1000")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=parse_sizes, default=[1000], help="fleet sizes, e.g. 100,1000")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="per request, both APIs")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per phase")
    parser.add_argument(
        "--close-rate",
        type=int,
        default=None,
        help="Close requests per second for closesync's budget and the sandbox's limit "
        "(default: the settings' 40 and the sandbox's own); the naive peers are not limited",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="WORKER_CONCURRENCY of the closesync worker (default: the setting's)",
    )
    parser.add_argument(
        "--naive-sample",
        type=int,
        default=50,
        help="connections the sequential naive peer is timed on, scaled to N (0: all of them)",
    )
    parser.add_argument(
        "--peers",
        default="closesync,sequential,threads",
        help="which configurations to run (comma-separated)",
    )
    args = parser.parse_args(argv)
    peers = {p.strip() for p in args.peers.split(",")}
    workdir = Path(tempfile.mkdtemp(prefix="closesync-fleet-"))
    machine = machine_line()
    rows: list[Row] = []
    try:
        redis_url = redis_for_benchmark(workdir)
        for n in args.n:
            if "closesync" in peers:
                rows.append(measure_closesync(n, args, redis_url, workdir))
            if "threads" in peers:
                rows.append(measure_naive(n, NAIVE_THREADS, None, args, workdir))
            if "sequential" in peers:
                sample = args.naive_sample if 0 < args.naive_sample < n else None
                rows.append(measure_naive(n, 1, sample, args, workdir))
    finally:
        stop_embedded(workdir / "redis")
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"fleet: {TYPES_PER_USER} event types per connection, {args.latency_ms:g} ms added to "
        "every API request, each pass from enqueue to the last connection reported"
    )
    for line in table(rows):
        print(line)
    print(machine)
    print(
        "pairs are first run / steady tick; peer CPU % is of one core (the whole worker tree for "
        "closesync); ~ = the sequential peer timed on its first "
        f"{args.naive_sample} connections and scaled to N"
    )
    for row in rows:
        for note in row.notes:
            print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
