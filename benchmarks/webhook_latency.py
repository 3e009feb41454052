"""Change-to-Close latency: how long an event-type change in Calendly takes to show in Close.

With the sandbox (latency injected on every API request), a real Redis, `closesync web` (gunicorn,
the webhook receiver), a real `closesync worker` and N connections whose Calendly webhook
subscriptions `closesync webhooks ensure --all` made, it makes `--changes` event-type changes one
at a time through the sandbox's admin API (a rename, an added type, a deleted type, in turn, over
the connections) and, for each, measures the time from the admin call to the moment the
sandbox's Close shows it (polled every 20 ms). The sandbox delivers its signed `event_type.*`
webhooks to the web process as Calendly would.

Then the same with webhooks off (WEBHOOKS_ENABLED=false: no subscription, poll only) and a real
`closesync scheduler` at the default SYNC_CRON (every 5 minutes, a tick spread over half of it):
`--poll-changes` changes spread evenly over one cron interval, each measured the same way. That
takes one interval and a half (about 8 minutes); `--poll-changes 0` skips it.

    python -m benchmarks.webhook_latency                     # 100 changes, 5 connections, 100 ms
    python -m benchmarks.webhook_latency --changes 30 --poll-changes 0

Numbers, not assertions: one table on stdout (p50 / p95 / max seconds), the machine beside it;
progress on stderr. Every wait is bounded (`--timeout` per change). Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from benchmarks.fleet import redis_for_benchmark, stop_embedded
from benchmarks.procfs import machine_line
from closesync.sandbox import (
    CALENDLY_CLIENT_ID,
    CALENDLY_CLIENT_SECRET,
    CLOSE_CLIENT_ID,
    CLOSE_CLIENT_SECRET,
    Sandbox,
    SandboxConfig,
    SeededUser,
)
from closesync.sandbox.connections import sandbox_connection
from closesync.settings import Settings
from closesync.store.secretbox import generate_key
from closesync.wiring.services import Services

CLOSESYNC = str(Path(sys.executable).with_name("closesync"))
POLL_SECONDS = 0.02
START_SECONDS = 60.0


def log(message: str) -> None:
    print(f"[latency {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Deployment:
    """closesync's processes against one sandbox, one Redis prefix."""

    sandbox: Sandbox
    env: dict[str, str]
    workdir: Path
    procs: list[subprocess.Popen[bytes]]

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        name = "-".join(args[:1])
        with (self.workdir / f"{name}-{len(self.procs)}.log").open("ab") as out:
            popen = subprocess.Popen(
                [CLOSESYNC, *args],
                env=self.env,
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(popen)
        return popen

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLOSESYNC, *args],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    def stop(self) -> None:
        for popen in self.procs:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGTERM)
        for popen in self.procs:
            try:
                popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()


def environment(sandbox: Sandbox, redis_url: str, web_port: int, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),  # noqa: S108 - only where the processes may look
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": f"latency-{uuid.uuid4().hex[:6]}",
        "CLOSESYNC_ENCRYPTION_KEYS": generate_key(),
        **sandbox.env(),
        "CLOSE_CLIENT_ID": CLOSE_CLIENT_ID,
        "CLOSE_CLIENT_SECRET": CLOSE_CLIENT_SECRET,
        "CALENDLY_CLIENT_ID": CALENDLY_CLIENT_ID,
        "CALENDLY_CLIENT_SECRET": CALENDLY_CLIENT_SECRET,
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{web_port}",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "WARNING",
        **extra,
    }


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Poll `check` until true; the seconds it took. SystemExit naming `what` at the deadline."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_SECONDS)
    return time.monotonic() - started


@contextlib.contextmanager
def deployment(
    sandbox: Sandbox, redis_url: str, workdir: Path, webhooks: bool, connections: int
) -> Iterator[Deployment]:
    port = free_port()
    env = environment(sandbox, redis_url, port, WEBHOOKS_ENABLED=str(webhooks).lower())
    deploy = Deployment(sandbox, env, workdir, [])
    settings = Settings(
        _env_file=None,
        redis_url=redis_url,
        redis_prefix=env["REDIS_PREFIX"],
        closesync_encryption_keys=env["CLOSESYNC_ENCRYPTION_KEYS"],
    )
    services = Services.build(settings)
    try:
        for user in sandbox.users[:connections]:
            connection, grants = sandbox_connection(user, time.time())
            services.connections.save(connection, grants)
        first = deploy.cli("sync", "--all")
        if first.returncode != 0:
            raise SystemExit(f"the first sync failed: {first.stdout[-500:]}{first.stderr[-500:]}")
        if webhooks:
            deploy.start("web", "--port", str(port), "--workers", "2", "--threads", "8")
            wait_until("closesync web", lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 60)
            ensured = deploy.cli("webhooks", "ensure", "--all")
            if ensured.returncode != 0:
                raise SystemExit(f"webhooks ensure failed: {ensured.stdout[-800:]}")
        deploy.start("worker")
        if not webhooks:
            deploy.start("scheduler")
        yield deploy
    finally:
        deploy.stop()
        services.close()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


@dataclass
class Change:
    """One change made through the admin API, and how to see it in Close."""

    kind: str
    user: SeededUser
    apply: Callable[[], Any]
    shows: Callable[[list[dict[str, Any]]], bool]


class Changes:
    """Renames, additions and deletions of the connected users' event types, in turn."""

    def __init__(self, sandbox: Sandbox, users: list[SeededUser]) -> None:
        self.sandbox = sandbox
        self.users = users
        self.admin = requests.Session()
        self.admin.trust_env = False
        self.count = 0

    def _url(self, path: str) -> str:
        return f"{self.sandbox.calendly_api_url}/_sandbox/{path}"

    def links(self, user: SeededUser) -> list[dict[str, Any]]:
        answer = self.admin.get(
            self._url("close/links"), params={"user_id": user.close_user_id}, timeout=10
        )
        answer.raise_for_status()
        links: list[dict[str, Any]] = answer.json()
        return links

    def _own_types(self, user: SeededUser) -> list[str]:
        world = self.sandbox.world
        with world.lock:
            return sorted(
                uuid_
                for uuid_, et in world.event_types.items()
                if et.members == [user.calendly_user_uuid]
                and et.active
                and et.deleted_at is None
                and et.type == "StandardEventType"
            )

    def next(self) -> Change:
        user = self.users[self.count % len(self.users)]
        kind = ("rename", "create", "delete")[self.count % 3]
        self.count += 1
        if kind == "create" or (kind == "delete" and len(self._own_types(user)) < 2):
            name = f"Added {self.count}"

            def create() -> Any:
                return self.admin.post(
                    self._url("calendly/event_types"),
                    json={"user_uuid": user.calendly_user_uuid, "name": name, "duration": 30},
                    timeout=10,
                ).raise_for_status()

            return Change("create", user, create, lambda links: _named(links, name))
        target = self._own_types(user)[0]
        if kind == "rename":
            name = f"Renamed {self.count}"

            def rename() -> Any:
                return self.admin.patch(
                    self._url(f"calendly/event_types/{target}"), json={"name": name}, timeout=10
                ).raise_for_status()

            return Change("rename", user, rename, lambda links: _named(links, name))

        def delete() -> Any:
            return self.admin.delete(
                self._url(f"calendly/event_types/{target}"), timeout=10
            ).raise_for_status()

        return Change("delete", user, delete, lambda links: not _holds(links, target))


def _named(links: list[dict[str, Any]], name: str) -> bool:
    return any(link.get("name") == name for link in links)


def _holds(links: list[dict[str, Any]], event_type_uuid: str) -> bool:
    return any(str(link.get("source_id", "")).endswith(":" + event_type_uuid) for link in links)


def one_at_a_time(changes: Changes, count: int, timeout: float) -> list[float]:
    """Each change made once the previous one showed; its seconds to show."""
    seconds = []
    for i in range(count):
        change = changes.next()
        started = time.monotonic()
        change.apply()
        wait_until(
            f"change {i + 1} ({change.kind}) to show in Close",
            lambda change=change: change.shows(changes.links(change.user)),  # type: ignore[misc]
            timeout,
        )
        seconds.append(time.monotonic() - started)
        if (i + 1) % 10 == 0:
            log(f"{i + 1}/{count} changes shown, p50 so far {statistics.median(seconds):.2f} s")
    return seconds


def spread_over(changes: Changes, count: int, interval: float, timeout: float) -> list[float]:
    """`count` changes made at even steps over `interval` seconds, without waiting for any; the
    seconds each took to show. Each change has a user of its own (a later change to the same
    event type would hide an earlier one)."""
    made: list[tuple[Change, float]] = []
    pending: dict[int, tuple[Change, float]] = {}
    shown: dict[int, float] = {}
    step = interval / count
    started = time.monotonic()
    deadline = started + interval + timeout
    while (len(made) < count or pending) and time.monotonic() < deadline:
        if len(made) < count and time.monotonic() >= started + len(made) * step:
            change = changes.next()
            at = time.monotonic()  # timed from before the change, as one_at_a_time does
            change.apply()
            made.append((change, at))
            pending[len(made) - 1] = made[-1]
        for index, (change, at) in list(pending.items()):
            if change.shows(changes.links(change.user)):
                shown[index] = time.monotonic() - at
                del pending[index]
        time.sleep(POLL_SECONDS * 5)
    if pending:
        raise SystemExit(f"{len(pending)} of {count} poll-only changes never showed")
    return [shown[i] for i in sorted(shown)]


def row(label: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return (
        f"| {label} | {len(ordered)} | {statistics.median(ordered):.2f} | {p95:.2f} | "
        f"{ordered[-1]:.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=100, help="changes with webhooks")
    parser.add_argument("--poll-changes", type=int, default=10, help="changes poll-only (0: skip)")
    parser.add_argument("--connections", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a change may take")
    args = parser.parse_args(argv)
    if args.changes < 1 or args.connections < 1 or args.poll_changes < 0:
        parser.error("--changes and --connections must be at least 1, --poll-changes at least 0")
    rows = []
    with tempfile.TemporaryDirectory(prefix="closesync-latency-") as tmp:
        workdir = Path(tmp)
        redis_url = redis_for_benchmark(workdir)
        try:
            users_needed = max(args.connections, args.poll_changes)
            config = SandboxConfig(users=users_needed, event_types=3, latency_ms=args.latency_ms)
            with Sandbox.start(config) as sandbox:
                log(f"webhooks on: {args.connections} connections, {args.changes} changes")
                with deployment(sandbox, redis_url, workdir, True, args.connections):
                    changes = Changes(sandbox, sandbox.users[: args.connections])
                    one_at_a_time(changes, 2, args.timeout)  # warm: worker and web processes
                    rows.append(row("webhooks", one_at_a_time(changes, args.changes, args.timeout)))
            if args.poll_changes:
                interval = 300.0  # SYNC_CRON's default, */5
                config = SandboxConfig(
                    users=args.poll_changes, event_types=3, latency_ms=args.latency_ms
                )
                with Sandbox.start(config) as sandbox:
                    log(f"poll only: {args.poll_changes} changes over {interval:.0f} s")
                    with deployment(sandbox, redis_url, workdir, False, args.poll_changes):
                        changes = Changes(sandbox, sandbox.users[: args.poll_changes])
                        seconds = spread_over(changes, args.poll_changes, interval, interval)
                        rows.append(row("poll only, SYNC_CRON */5", seconds))
        finally:
            stop_embedded(workdir)
    print(f"Change-to-Close latency, {args.latency_ms:g} ms per API request ({machine_line()})")
    print("| mode | changes | p50 s | p95 s | max s |")
    print("|---|---|---|---|---|")
    for line in rows:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
