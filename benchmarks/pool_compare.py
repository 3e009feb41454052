"""A tick of N connections on each worker pool: seconds and worker RSS, same run, same machine.

For each pool it starts a real `closesync worker --pool P [--concurrency C]` against the sandbox
(every answer delayed by LATENCY_MS) and a Redis server of its own, under a key prefix of its
own (so every pool makes the same first run), enqueues one `sync_connection` per connection
(no spread), and times until every connection has its report: first the first run (the list
call and one upsert per event type), then a steady-state tick (one list call, no Close call).
It samples the worker's RSS (its children included) meanwhile. Inline `closesync sync --all`
is timed at the end, steady state, with the --concurrency values given. Numbers, not assertions.

    .venv/bin/python -m benchmarks.pool_compare [--connections 1000] [--types 6]
        [--latency-ms 100] [--pools prefork threads:64] [--inline 16]

A pool is `NAME[:CONCURRENCY]`, NAME one of `closesync worker --pool`'s choices.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from tests.redis_server import RedisServer

from closesync.sandbox import (
    CALENDLY_CLIENT_ID,
    CALENDLY_CLIENT_SECRET,
    CLOSE_CLIENT_ID,
    CLOSE_CLIENT_SECRET,
    Sandbox,
    SandboxConfig,
)
from closesync.sandbox.connections import sandbox_connection
from closesync.settings import Settings
from closesync.store.secretbox import generate_key
from closesync.wiring.services import Services
from closesync.worker import celery_app as names
from closesync.worker.celery_app import create_app

CLOSESYNC = str(Path(sys.executable).with_name("closesync"))


@dataclass
class Peak:
    """The largest RSS (bytes) of a process and its children seen by a sampling thread."""

    pid: int
    peak: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> int:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            return 0

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.peak = max(self.peak, self.sample())


def environment(sandbox: Sandbox, redis_url: str, prefix: str, key: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        **sandbox.env(),
        "CLOSE_CLIENT_ID": CLOSE_CLIENT_ID,
        "CLOSE_CLIENT_SECRET": CLOSE_CLIENT_SECRET,
        "CALENDLY_CLIENT_ID": CALENDLY_CLIENT_ID,
        "CALENDLY_CLIENT_SECRET": CALENDLY_CLIENT_SECRET,
        "CLOSESYNC_ENCRYPTION_KEYS": key,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }


def services_for(env: dict[str, str]) -> Services:
    values = {k.lower(): v for k, v in env.items() if k != "PATH"}
    return Services.build(Settings(_env_file=None, **values))  # type: ignore[call-arg]


def wait_reports(services: Services, conns: list[str], count: int, timeout: float) -> float:
    """Seconds until every connection has `count` reports (or the timeout)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        pipe = services.redis.pipeline(transaction=False)
        for conn in conns:
            pipe.llen(services.keys.reports(conn))
        if all(n >= count for n in pipe.execute()):
            return time.perf_counter() - started
        time.sleep(0.1)
    return float("nan")


def tick(services: Services, conns: list[str], count: int, timeout: float) -> float:
    app = create_app(services.settings)
    started = time.perf_counter()
    for conn in conns:
        app.send_task(names.SYNC_CONNECTION, args=[conn, f"bench-{count}"])
    app.close()
    waited = wait_reports(services, conns, count, timeout)
    return waited if math.isnan(waited) else time.perf_counter() - started


def measure_pool(
    sandbox: Sandbox, redis_url: str, spec: str, key: str, workdir: Path, timeout: float
) -> str:
    pool, _, concurrency = spec.partition(":")
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    env = environment(sandbox, redis_url, prefix, key)
    services = services_for(env)
    now = time.time()
    conns = []
    for user in sandbox.users:
        connection, grants = sandbox_connection(user, now)
        services.connections.save(connection, grants)
        conns.append(connection.id)
    args = [CLOSESYNC, "worker", "--pool", pool]
    if concurrency:
        args += ["--concurrency", concurrency]
    log = (workdir / f"worker-{pool}-{concurrency or 'default'}.log").open("wb")
    worker = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak = Peak(worker.pid)
    sampler = threading.Thread(target=peak.run, daemon=True)
    try:
        app = create_app(services.settings)
        while not app.control.ping(timeout=1.0):
            if worker.poll() is not None:
                return f"{spec:>12}  worker exited {worker.returncode}"
        app.close()
        idle = peak.sample()
        sampler.start()
        first = tick(services, conns, 1, timeout)
        steady = tick(services, conns, 2, timeout)
        peak.stop.set()
        sampler.join()
        failed = sum(
            1
            for conn in conns
            if (r := services.state.reports(conn, 1))
            and r[0].outcome.value not in ("ok", "partial")
        )
        return (
            f"{spec:>12} {first:>9.1f} {steady:>9.1f} {idle / 1e6:>9.0f} {peak.peak / 1e6:>9.0f}"
            f" {failed:>7}"
        )
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
        services.redis.close()


def measure_inline(sandbox: Sandbox, redis_url: str, key: str, concurrency: int) -> str:
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    env = environment(sandbox, redis_url, prefix, key)
    services = services_for(env)
    now = time.time()
    for user in sandbox.users:
        connection, grants = sandbox_connection(user, now)
        services.connections.save(connection, grants)
    seconds = []
    for _ in ("first", "steady"):
        started = time.perf_counter()
        done = subprocess.run(
            [CLOSESYNC, "sync", "--all", "--json", "--concurrency", str(concurrency)],
            env=env,
            capture_output=True,
            check=False,
        )
        seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            return f"inline {concurrency:>4}  exit {done.returncode}: {done.stderr[-300:]!r}"
    services.redis.close()
    return f"{'inline ' + str(concurrency):>12} {seconds[0]:>9.1f} {seconds[1]:>9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--types", type=int, default=6)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--pools", nargs="*", default=["prefork", "threads:64"])
    parser.add_argument("--inline", nargs="*", type=int, default=[16])
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="closesync-pools-"))
    config = SandboxConfig(
        seed=11,
        users=args.connections,
        event_types=args.types,
        latency_ms=args.latency_ms,
        # The fleet's rate limits are another benchmark's subject: here they must not bind.
        close_rate_limit=10**7,
        calendly_rate_limit=10**7,
    )
    sandbox = Sandbox.start(config)
    key = generate_key()
    print(
        f"{args.connections} connections x {args.types} event types, {args.latency_ms:g} ms per "
        f"request; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; logs in {workdir}",
        flush=True,
    )
    print(
        f"{'pool':>12} {'first s':>9} {'steady s':>9} {'idle MB':>9} {'peak MB':>9} {'failed':>7}"
    )
    try:
        with RedisServer() as redis_server:
            for spec in args.pools:
                print(
                    measure_pool(sandbox, redis_server.url, spec, key, workdir, args.timeout),
                    flush=True,
                )
            for concurrency in args.inline:
                print(measure_inline(sandbox, redis_server.url, key, concurrency), flush=True)
    finally:
        sandbox.stop()
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
